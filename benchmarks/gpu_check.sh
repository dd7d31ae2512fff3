#!/usr/bin/env bash
# The prepared GPU check (issue 12 item 4) on a lent GPU machine: no network, no ../shared.
#
#   bash benchmarks/quality_bundle.sh gpucheck   # here: .qdata/gpucheck/demo.h5 (tiled demo slide) + .whl/ (faiss-cpu)
#   bash benchmarks/gpu_check.sh [DRIVER ARGS]   # there, e.g. through the device tool:
#       run(command="bash benchmarks/gpu_check.sh", carry=[".qdata/gpucheck", ".whl"], timeout_s=520)
#
# Environment: benchmarks/gpu_env.sh (shared with quality_gpu.sh). Then benchmarks/gpu_check.py --device cuda:
# loader / model / end-to-end img/s (MoCo v2, SGCL), torchrun DDP, extraction, faiss kNN, each step with its
# own timeout inside GPU_CHECK_BUDGET_S (default 420 s; the whole script stays under 8 minutes).
# Results: $OUT (the device tool's output folder) or docs/benchmarks: gpu_check_<date>.json and .md, and
# gpu_check_logs.tar.gz (every step's log).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-docs/benchmarks}
mkdir -p "$DEST"
source benchmarks/gpu_env.sh || exit 1
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
rm -rf "$WORK"
timeout -k 10 "${GPU_CHECK_TIMEOUT_S:-460}" "$PY" benchmarks/gpu_check.py --device "${GPU_CHECK_DEVICE:-cuda}" \
  --budget-s "${GPU_CHECK_BUDGET_S:-420}" --out "$DEST" --work "$WORK" "$@"
rc=$?
(cd "$WORK" && tar czf "$DEST/gpu_check_logs.tar.gz" --exclude='patches' --exclude='*.pt' --exclude='*.safetensors' \
  --exclude='tensorboard' *.log *.json runs/*/metrics.jsonl 2>/dev/null)
exit "$rc"
