# Shared environment setup of the prepared GPU scripts (quality_gpu.sh, gpu_check.sh), sourced, not run:
# the lent GPU machine has no network and no ../shared; its python3 holds torch, timm, h5py, cv2 ...
# but not faiss. Wheels bundled in .whl/ (benchmarks/quality_bundle.sh) are installed into /tmp/site,
# PYTHONPATH points at them and the repo, and the versions the run depends on are printed.
#   source benchmarks/gpu_env.sh || exit 1      # from the repo root
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then  # faiss-cpu (k-means of SGCL's inter term, kNN) is not in the GPU image
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${GPU_SITE:=/tmp/site}" .whl/*.whl \
    && export PYTHONPATH=$GPU_SITE:$PWD || return 1
fi
"$PY" - <<'PYEOF' || return 1
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("timm", "faiss", "h5py", "cv2", "skimage", "sklearn", "tifffile", "safetensors", "pandas", "matplotlib"):
    mod = importlib.import_module(m)
    print(m, getattr(mod, "__version__", "?"))
PYEOF
nproc
