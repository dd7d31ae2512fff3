#!/usr/bin/env bash
# Pack what benchmarks/quality_gpu.sh needs on a machine with no ../shared and no network:
# .qdata/tiles (the pretraining tiles, 96 px at 1 µm/px, JPEG q80 to fit the 64 MiB transfer),
# .qdata/shared/patches (the three labelled sets), .qdata/nuinsseg (the segmentation task at
# 0.5 µm/px) and .whl/ (faiss-cpu for Python 3.12, absent from the GPU image). Both folders are
# git-ignored (.gitignore). Also, in every mode, .qdata/gpucheck/demo.h5: the demo slide tiled at
# 0.5 µm/px, 224 px, JPEG (~1 MB), the source of benchmarks/gpu_check.sh's data (the GPU image has no OpenSlide).
#
#   bash benchmarks/quality_bundle.sh            # everything (needs ../shared/data)
#   bash benchmarks/quality_bundle.sh gpucheck   # only what gpu_check.sh needs: .qdata/gpucheck + .whl
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-../shared/data}
mkdir -p .whl .qdata
if [ "$MODE" != gpucheck ]; then
rm -rf .qdata && mkdir -p .qdata/shared/patches
cp -r "$SHARED"/patches/{crc-val-he-7k-sample,kather2016-sample,osteosarcoma-sample} .qdata/shared/patches/
OMP_NUM_THREADS=1 "$PY" - "$SHARED" <<'PYEOF'
import shutil, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from quality import count_patches, tile_pretraining_data
from quality_eval import build_seg_task
shared = Path(sys.argv[1])
h5 = tile_pretraining_data(shared, Path(".qdata/build"), 1.0, 96, False, jpeg_quality=80)
shutil.move(str(h5), ".qdata/tiles")
shutil.rmtree(".qdata/build")
print("tiles:", count_patches(Path(".qdata/tiles")), "patches")
print("segmentation task:", build_seg_task(shared, Path(".qdata/nuinsseg"), mpp=0.5))
PYEOF
fi
rm -rf .qdata/gpucheck && mkdir -p .qdata/gpucheck
OMP_NUM_THREADS=1 "$PY" - <<'PYEOF'
import sys, tempfile, shutil
from pathlib import Path
sys.path.insert(0, "benchmarks")
from train_step import tile_demo
with tempfile.TemporaryDirectory() as tmp:
    shutil.move(str(tile_demo(Path(tmp), 224)), ".qdata/gpucheck/demo.h5")
print("gpu check source: .qdata/gpucheck/demo.h5")
PYEOF
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl faiss-cpu==1.15.1
du -sh .qdata .whl
