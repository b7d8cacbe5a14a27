"""Model FLOPs utilisation: achieved FLOP/s over the device's peak (the vendor's dense peak where known)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets, the denominator of MFU in
# Megatron-LM, torchtitan and the MoR paper. Matched against torch.cuda.get_device_name(), longest name first
# ("H100 NVL" before "H100"). fp32 runs have no entry: they use the measured peak.
VENDOR_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250.0, "fp8": 4500.0},
    "H200 NVL": {"bf16": 835.0, "fp8": 1671.0},
    "H200": {"bf16": 989.4, "fp8": 1978.9},
    "GH200": {"bf16": 989.4, "fp8": 1978.9},
    "H100 NVL": {"bf16": 835.0, "fp8": 1671.0},
    "H100 PCIe": {"bf16": 756.0, "fp8": 1513.0},
    "H100": {"bf16": 989.4, "fp8": 1978.9},  # SXM (HBM3)
    "H800": {"bf16": 989.4, "fp8": 1978.9},
    "A100": {"bf16": 312.0},
    "A800": {"bf16": 312.0},
    "L40S": {"bf16": 362.1, "fp8": 733.0},
    "L4": {"bf16": 121.0, "fp8": 242.0},
    "MI300X": {"bf16": 1307.4, "fp8": 2614.9},
}
MFU_VENDOR, MFU_MEASURED = "perf/mfu", "perf/mfu_measured_peak"


@dataclass(frozen=True)
class Peak:
    """One device's peak FLOP/s, where it comes from, and the MFU metric it defines."""

    flops: float
    source: str

    @property
    def metric(self) -> str:
        """`perf/mfu` against a vendor peak; `perf/mfu_measured_peak` against a timed matmul (CPUs, unknown GPUs)."""
        return MFU_MEASURED if self.source.startswith("measured") else MFU_VENDOR

    def mfu(self, tflops_per_s: float, world_size: int) -> float:
        """Job-wide achieved TFLOP/s as a fraction of world_size devices at this peak."""
        return tflops_per_s * 1e12 / (world_size * self.flops)

    def tags(self) -> dict[str, str]:
        """MLflow tags that state the denominator (tags: a resume on other hardware updates them)."""
        return {"mfu.peak_tflops_per_device": f"{self.flops / 1e12:.4g}", "mfu.peak_source": self.source}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vendor_peak(device_name: str, precision: str) -> float | None:
    """The datasheet's dense peak FLOP/s of a GPU at a precision (bf16, fp8), or None if not in the table."""
    for name in sorted(VENDOR_PEAK_TFLOPS, key=len, reverse=True):
        if name in device_name:
            tflops = VENDOR_PEAK_TFLOPS[name].get(precision)
            return tflops * 1e12 if tflops else None
    return None


def measured_peak(on_cuda: bool, precision: str) -> float:
    """Best FLOP/s of a timed large matmul: bf16 on GPUs, the run's dtype on CPUs."""
    if on_cuda:
        device, dtype, n, reps = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, 8192, 10
    else:
        device, dtype, n, reps = torch.device("cpu"), torch.float32 if precision == "fp32" else torch.bfloat16, 1024, 2
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    a @ b  # warm-up: kernel selection, thread pool start
    _sync(device)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2.0 * n**3 / best


@functools.cache
def device_peak(on_cuda: bool, precision: str) -> Peak:
    """This process's device peak (once per process): the vendor's dense peak for the GPU and precision, else a
    timed matmul, labelled as measured."""
    if on_cuda:
        name = torch.cuda.get_device_name()
        flops = vendor_peak(name, precision)
        if flops is not None:
            return Peak(flops, f"vendor dense {precision} peak of {name}")
        return Peak(measured_peak(True, precision), f"measured: bf16 matmul on {name} (not in the vendor table)")
    dtype = "fp32" if precision == "fp32" else "bf16"
    return Peak(measured_peak(False, precision), f"measured: {dtype} matmul on this CPU")
