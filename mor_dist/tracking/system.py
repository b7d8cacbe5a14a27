"""System metrics per node: MLflow's own monitor (CPU, memory, disk, network; GPUs through pynvml), one per host."""

from __future__ import annotations

import logging
import socket
import warnings
from typing import Any, Optional

import psutil  # MLflow's CPU monitor reads it; the node's size goes into the run's tags

from mor_dist.tracking.experiment import TrackingWarning


def gpus() -> list[str]:
    """This node's GPUs as `N x name` through NVML (the gpu extra's nvidia-ml-py, which MLflow's GPU monitor also
    reads), without starting CUDA; none without it or without a driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                 for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()
    return [f"{names.count(name)} x {name}" for name in dict.fromkeys(names)]


class NodeMonitor:
    """Samples this node every `interval` seconds into `system/node_<rank>/...` of a run, until `stop()`.

    Started by one process per host (local rank 0), so every node appears once. `node_<N>` is the id the MLflow UI
    groups and colours per node; the tag `system.node_<N>` names the host.
    """

    def __init__(self, uri: str, run_id: str, interval: float, node_rank: int) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # start/stop notes at INFO
        self.node = f"node_{node_rank}"
        self.monitor: Optional[Any] = SystemMetricsMonitor(run_id, sampling_interval=interval, node_id=self.node,
                                                           tracking_uri=uri, resume_logging=True)
        self.monitor.start()
        self._tag(uri, run_id)

    def _tag(self, uri: str, run_id: str) -> None:
        """The node's size, beside its metrics."""
        from mlflow import MlflowClient

        parts = [f"{psutil.cpu_count()} CPUs", f"{psutil.virtual_memory().total / 2**30:.0f} GiB memory", *gpus()]
        MlflowClient(tracking_uri=uri).set_tag(run_id, f"system.{self.node}", f"{socket.gethostname()}: "
                                               + ", ".join(parts))

    def stop(self) -> None:
        """Stop sampling and log a last sample: a run shorter than the interval still has one per node."""
        if self.monitor is None:
            return
        monitor, self.monitor = self.monitor, None
        try:
            monitor.finish()
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as err:
            warnings.warn(f"the last system metrics of {self.node} were not logged ({type(err).__name__}: {err})",
                          TrackingWarning, stacklevel=2)


def start_node_monitor(uri: str, run_id: Optional[str], interval: float, node_rank: int) -> Optional[NodeMonitor]:
    """A NodeMonitor, or None when turned off (interval 0), without a run, or if MLflow refuses (with a warning)."""
    if interval <= 0 or run_id is None:
        return None
    try:
        return NodeMonitor(uri, run_id, interval, node_rank)
    except Exception as err:  # a store this node cannot reach: training goes on
        warnings.warn(f"system metrics of {socket.gethostname()} are not logged to {uri} ({type(err).__name__}: "
                      f"{err})", TrackingWarning, stacklevel=2)
        return None
