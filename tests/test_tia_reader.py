"""The optional TIAToolbox reader (``reader="tiatoolbox"``) against OpenSlide and known pixels.

Runs where tiatoolbox is importable — the separate venv that ``.ci/tia_venv.sh`` builds (``.ci/run``
runs this file there); elsewhere every test skips with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_path

try:
    import tiatoolbox.wsicore.wsireader  # noqa: F401
except Exception as exc:  # noqa: BLE001 - absent, or installed without a dependency
    pytest.skip(f"tiatoolbox is not importable ({type(exc).__name__}: {exc}); build its venv with .ci/tia_venv.sh",
                allow_module_level=True)

import openslide  # noqa: E402
import tifffile  # noqa: E402

from _tile_fixtures import synthetic_he  # noqa: E402
from preprocessing.config import TileConfig  # noqa: E402
from preprocessing.h5format import PatchFile  # noqa: E402
from preprocessing.readers import open_slide  # noqa: E402
from preprocessing.slide_tiler import tile_slide  # noqa: E402


def test_cmu_slide_matches_openslide():
    path = shared_path("wsi", "cmu-1-small-region.svs")
    ref = openslide.OpenSlide(str(path))
    with open_slide(path, reader="tiatoolbox") as r:
        assert r.name == "tiatoolbox"
        assert r.dimensions == ref.dimensions
        assert r.level_count == ref.level_count
        assert float(r.properties["openslide.mpp-x"]) == pytest.approx(float(ref.properties["openslide.mpp-x"]))
        for x, y, w, h in ((0, 0, 256, 256), (1037, 811, 300, 200), (1900, 2700, 320, 267)):
            got = r.read_region(x, y, 0, w, h)
            want = np.asarray(ref.read_region((x, y), 0, (w, h)).convert("RGB"))
            assert got.shape == want.shape == (h, w, 3)
            np.testing.assert_array_equal(got, want)
    ref.close()


def test_ome_tiff_known_pixels(tmp_path):
    image = synthetic_he(768, 1024, seed=3)
    path = tmp_path / "synthetic.ome.tiff"
    tifffile.imwrite(path, image, photometric="rgb", tile=(256, 256), ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5,
                               "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
    with open_slide(path, reader="tiatoolbox") as r:
        assert r.dimensions == (1024, 768)
        assert float(r.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        np.testing.assert_array_equal(r.read_region(100, 50, 0, 300, 200), image[50:250, 100:400])
        np.testing.assert_array_equal(r.read_region(0, 0, 0, 1024, 768), image)


def test_tiling_through_tiatoolbox_equals_openslide(tmp_path):
    path = shared_path("wsi", "cmu-1-small-region.svs")
    outs = {}
    for reader in ("openslide", "tiatoolbox"):
        cfg = TileConfig(reader=reader)
        cfg.output.codec = "raw"
        tile_slide(path, tmp_path / f"{reader}.h5", cfg)
        outs[reader] = PatchFile(tmp_path / f"{reader}.h5")
    a, b = outs["openslide"], outs["tiatoolbox"]
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a.coords(), b.coords())
    np.testing.assert_array_equal(a.read_many(range(len(a))), b.read_many(range(len(b))))
