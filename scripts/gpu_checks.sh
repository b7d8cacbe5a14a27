#!/usr/bin/env bash
# Every GPU check and benchmark, appended to docs/benchmarks.md (device, versions, command, table).
# Runs on a CUDA host with Python 3.12 + PyTorch and no Ray, MLflow, megatron-core or TE: the
# `install` phase puts megatron-core 0.19.2 and TE 2.20.2 into /tmp/site (scripts/gpu_wheels.sh
# describes how the wheels and the shipped corpus get there).
#
#   scripts/gpu_checks.sh [phase ...]        default: all phases, in the order of the list at the end
#     install          wheels into /tmp/site (once)
#     tests            pytest -m gpu on every test file with GPU tests (FP8 recipes, TE loop, tiny FP8 training)
#     curves           FP8 vs bf16 loss curves, 200 steps on the shipped corpus: tiny and 360M MoR-3 (within 2%)
#     bench-360m-bf16  GPTModel baseline, vanilla, MoR-2, MoR-3 at the 360M shape (micro-batch 16, seq 2048)
#     bench-360m-fp8   the same in FP8 (MoR: tensorwise; vanilla and GPTModel also with delayed scaling)
#     bench-1p7b-bf16  the 1.7B shape (micro-batch 8)
#     bench-1p7b-fp8
#     inference        the paper's protocol at the 360M shapes (1,000 requests, mean length 256, bf16):
#                      MoR-4 against vanilla-34 at batch 32 and max batch (the 2x goal); est. 4-5 minutes
#     inference-nr23   the same for MoR-3 and MoR-2 against vanilla-32, one command (and table) each
# Each phase should stay under 10 minutes on one H100 (estimated; never run yet). With $OUT set (the device tool), docs/benchmarks.md
# and the logs are copied there after every phase.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="${MOR_GPU_SITE:-/tmp/site}:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MOR_CORPUS_DIR=${MOR_CORPUS_DIR:-${MOR_GPU_STASH:-/tmp/mor_gpu}/corpus}
DOC=${MOR_BENCH_DOC:-docs/benchmarks.md}
LOGS=${OUT:-/tmp/mor_gpu}/logs
mkdir -p "$LOGS"
STATUS=0

run() {  # run one command, log it, remember failures
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc)"; STATUS=1; }
  return "$rc"
}

bench() {  # bench SHAPE PRECISION
  local shape=$1 precision=$2
  local configs=(--config "configs/vanilla_$shape.yaml" --config "configs/mor_${shape}_nr2.yaml"
                 --config "configs/mor_${shape}_nr3.yaml")
  run "bench-$shape-$precision" "$PY" jobs/benchmark.py train "${configs[@]}" --baseline --append "$DOC" \
    "train.precision=$precision"
  if [ "$precision" = fp8 ]; then  # the reference GPTModel figures used delayed scaling
    run "bench-$shape-fp8-delayed" "$PY" jobs/benchmark.py train --config "configs/vanilla_$shape.yaml" --baseline \
      --append "$DOC" train.precision=fp8 train.fp8_recipe=delayed
  fi
}

infer() {  # infer N_r: MoR-N_r against vanilla of the same depth, the paper's protocol
  run "inference-nr$1" "$PY" jobs/benchmark.py inference --preset 360m --requests 1000 --mean-len 256 \
    --recursions "$1" --repeats 1 --append "$DOC"
}

phase() {
  case "$1" in
    install) run install scripts/gpu_wheels.sh install ;;
    tests)
      local files
      files=$(grep -l "pytest.mark.gpu" tests/test_*.py | xargs)
      run tests "$PY" -m pytest -m gpu -q -p no:cacheprovider -W ignore::DeprecationWarning $files
      tail -n 3 "$LOGS/tests.log" > "$LOGS/tests.tail"
      "$PY" -m mor_dist.bench.report "$DOC" "GPU tests" "python -m pytest -m gpu -q $files" "$LOGS/tests.tail" ;;
    curves)
      run curves "$PY" -m mor_dist.bench.fp8_check --config configs/tiny_mor.yaml --config configs/mor_360m_nr3.yaml \
        --steps 200 --append "$DOC" ;;
    bench-360m-bf16) bench 360m bf16 ;;
    bench-360m-fp8) bench 360m fp8 ;;
    bench-1p7b-bf16) bench 1p7b bf16 ;;
    bench-1p7b-fp8) bench 1p7b fp8 ;;
    inference) infer 4 ;;
    inference-nr23) infer 3; infer 2 ;;
    *) echo "unknown phase $1" >&2; return 2 ;;
  esac
}

phases=("$@")
# Most telling first: a device session is short, and whatever ran is already in docs/benchmarks.md.
[ ${#phases[@]} -gt 0 ] || phases=(install tests bench-360m-bf16 inference curves bench-360m-fp8 bench-1p7b-bf16
                                   bench-1p7b-fp8 inference-nr23)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
for p in "${phases[@]}"; do
  phase "$p"
  [ -z "${OUT:-}" ] || cp "$DOC" "$OUT/benchmarks.md"
  if [ "$p" = install ] && [ "$STATUS" -ne 0 ]; then echo "install failed; stopping" >&2; exit 1; fi
done
exit "$STATUS"
