#!/usr/bin/env bash
# The quality benchmark on a lent GPU machine, which has no network and no ../shared beside the repo.
#
#   bash benchmarks/quality_bundle.sh        # here: pack the data it needs into .qdata/ and .whl/
#   bash benchmarks/quality_gpu.sh probe     # there: environment + loader/GPU throughput (~2 min)
#   bash benchmarks/quality_gpu.sh full ARGS # there: benchmarks/quality.py --budget gpu on the bundle
#
# Results go to $OUT (the device tool's output folder) or runs/quality_gpu: quality.json/.csv/.md/.png
# and logs.tar.gz (every run's metrics.jsonl, health.json and log).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
shift || true
DEST=${OUT:-runs/quality_gpu}
mkdir -p "$DEST"
source benchmarks/gpu_env.sh || exit 1  # wheels from .whl/, PYTHONPATH, versions (shared with gpu_check.sh)
COMMON=(--tiles .qdata/tiles --seg-task .qdata/nuinsseg --shared .qdata/shared --device cuda --budget gpu)

if [ "$MODE" = probe ]; then
  # samples/s of the benchmark's settings: one run with many loader workers, then 4 and 6 runs at once
  python3 - "$DEST" <<'EOF'
import json, subprocess, sys, time, os
from pathlib import Path
sys.path.insert(0, "benchmarks")
import quality
dest = Path(sys.argv[1]); tiles = Path(".qdata/tiles").resolve()
b = quality.BUDGETS["gpu"]; n = quality.count_patches(tiles)
def launch(row, tag, workers, steps=60):
    run = Path("/tmp/probe") / tag
    ov = quality.common_overrides(b, tiles, run, 0, n, "cuda") + quality.ROWS[row] + [
        f"data.workers={workers}", f"train.max_steps={steps}", "train.log_every=20", "train.export=false", "train.health_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return run, subprocess.Popen([sys.executable, "-m", "sgcl.cli", "pretrain", *ov], env=env,
                                 stdout=open(f"/tmp/probe_{tag}.log", "w"), stderr=subprocess.STDOUT)
def rate(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    a, z = rows[-2], rows[-1]  # steps 40 -> 60: warm loader, epoch boundaries included
    return round(b.batch * (z["step"] - a["step"]) / max(1e-9, z["elapsed_s"] - a["elapsed_s"]), 1)
out = {}
for label, jobs in [("sgcl_x1_w14", [("sgcl", 14)]), ("moco_x1_w14", [("moco_v2", 14)]),
                    ("sgcl_x4_w3", [("sgcl", 3)] * 4), ("sgcl_x6_w2", [("sgcl", 2)] * 6),
                    ("igu_x1_w14", [("sgcl_dense_igu", 14)])]:
    t0 = time.time()
    procs = [launch(r, f"{label}_{i}", w) for i, (r, w) in enumerate(jobs)]
    codes = [p.wait() for _, p in procs]
    try:
        rates = [rate(run) for run, _ in procs]
    except Exception as exc:
        rates = [f"no metrics: {exc}"]
    out[label] = {"exit": codes, "img_per_s_each": rates, "wall_s": round(time.time() - t0, 1)}
    print(label, out[label], flush=True)
    if any(codes):
        print(open(f"/tmp/probe_{label}_0.log").read()[-3000:])
(dest / "probe.json").write_text(json.dumps(out, indent=1))
EOF
  # the evaluation path on the GPU (classification + quick segmentation) for one random-init encoder
  python3 benchmarks/quality.py --quick --rows random_init --tiles .qdata/tiles --seg-task .qdata/nuinsseg \
    --shared .qdata/shared --device cuda --out /tmp/probe_eval 2>&1 | tail -5
  exit 0
fi

timeout "${QUALITY_TIMEOUT_S:-540}" python3 benchmarks/quality.py "${COMMON[@]}" --out /tmp/quality "$@" 2>&1 | tee "$DEST/quality.log"
rc=${PIPESTATUS[0]}
cp /tmp/quality/quality.{json,csv,md,png} "$DEST"/ 2>/dev/null
(cd /tmp/quality && tar czf "$DEST/logs.tar.gz" --exclude='*.safetensors' --exclude='*.pt' --exclude='tensorboard' \
  --exclude='seg/*/predictions' --exclude='seg/*/overlays' pretrain/*/metrics.jsonl pretrain/*/health.json \
  pretrain/*/pretrain.log eval seg/*/results.json 2>/dev/null)
exit "$rc"
