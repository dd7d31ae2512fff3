"""Run TIAToolbox's patch extractor on a given grid (called by benchmarks/tiling.py with the
python of the TIAToolbox venv, see .ci/tia_venv.sh). Prints one JSON line.

usage: python _tia_patches.py SLIDE COORDS.npy PATCH_SIZE CHECK_N
COORDS.npy holds level-0 top-left (x, y) of each patch; patches are read at level 0.
"""

from __future__ import annotations

import json
import pathlib
import resource
import sys
import time
import types

import numpy as np


def _peak_rss_mb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    slide, coords_path, size, check_n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    import tiatoolbox

    # tiatoolbox/tools/__init__.py imports the model zoo (torchvision, timm, ...); load only the
    # patch-extraction module, which needs none of it.
    pkg = types.ModuleType("tiatoolbox.tools")
    pkg.__path__ = [str(pathlib.Path(tiatoolbox.__file__).parent / "tools")]
    sys.modules.setdefault("tiatoolbox.tools", pkg)
    from tiatoolbox.tools.patchextraction import get_patch_extractor

    coords = np.load(coords_path)
    centres = coords + (size - 1) // 2  # PointsPatchExtractor subtracts int((size - 1) / 2)
    t0 = time.perf_counter()
    extractor = get_patch_extractor("point", input_img=slide, locations_list=centres, patch_size=(size, size),
                                    resolution=0, units="level")
    checksum, n = 0, 0
    for i in range(len(coords)):
        patch = extractor[i]
        if i < check_n:
            checksum += int(np.asarray(patch, dtype=np.int64).sum())
        n += 1
    seconds = time.perf_counter() - t0
    print(json.dumps({"n": n, "seconds": seconds, "checksum": checksum, "tiatoolbox": tiatoolbox.__version__,
                      "peak_rss_mb": _peak_rss_mb()}))


if __name__ == "__main__":
    main()
