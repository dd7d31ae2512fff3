#!/usr/bin/env bash
# Build the optional TIAToolbox environment (the `tia` extra) in its own venv, reproducibly.
#
# tiatoolbox pins torch<2.13 and pulls a model zoo (torchvision, timm, transformers, umap, numba,
# jupyterlab, ...) that would mean gigabytes of CUDA wheels. Its slide reader (WSIReader) and its
# patch extractor need none of that, so every package here is pinned and installed with --no-deps
# (.ci/tia-requirements.txt), and torch is a local CPU wheel.
#
# usage: .ci/tia_venv.sh [VENV_DIR]           (default .venv-tia; prints the venv's python path)
# env:   SGCL_TORCH_CPU_WHEEL=/path/to/torch-*.whl   (default: the newest /opt/wheels/torch-2.13*+cpu*.whl)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-tia}
PY=${PYTHON:-python3}
WHEEL=${SGCL_TORCH_CPU_WHEEL:-$(ls /opt/wheels/torch-2.1[0-3]*+cpu*-cp3*.whl 2>/dev/null | sort | tail -1 || true)}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" --no-deps -r .ci/tia-requirements.txt
if [ -n "$WHEEL" ] && [ -f "$WHEEL" ]; then
  "${PIP[@]}" --no-deps "$WHEEL"
else
  # No local CPU wheel of torch<2.13: PyPI's build would pull the CUDA stack (gigabytes). Say so and
  # let the caller skip the TIAToolbox tests (exit 3) rather than download it.
  echo "tia_venv: no local CPU torch<2.13 wheel (set SGCL_TORCH_CPU_WHEEL=/path/to/torch-2.1x+cpu.whl);" \
       "not building the TIAToolbox venv" >&2
  exit 3
fi
# The test runner and sgcl's own light dependencies (its readers run inside this venv too).
"${PIP[@]}" pytest pytest-timeout h5py
# Fail here, not in the tests, if something the reader or the patch extractor imports is missing.
"$VENV/bin/python" - <<'PY'
import sys, types, pathlib
import tiatoolbox
from tiatoolbox.wsicore.wsireader import WSIReader  # noqa: F401
# tiatoolbox.tools/__init__ imports the model zoo; load the patch extractor module on its own.
pkg = types.ModuleType("tiatoolbox.tools")
pkg.__path__ = [str(pathlib.Path(tiatoolbox.__file__).parent / "tools")]
sys.modules.setdefault("tiatoolbox.tools", pkg)
from tiatoolbox.tools.patchextraction import get_patch_extractor  # noqa: F401
print(f"tiatoolbox {tiatoolbox.__version__} ready in {sys.prefix}")
PY
