"""The patch HDF5 writer/reader round trip for every codec."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.h5format import PatchFile, PatchFileError, write_patch_file


@pytest.mark.parametrize("codec", ["raw", "lzf", "gzip", "jpeg"])
def test_round_trip_any_order(tmp_path, codec):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    imgs = np.stack([np.dstack([xx * 8, yy * 8, np.full_like(xx, 40 * i)]) for i in range(5)]).astype(np.uint8)
    coords = rng.integers(0, 10_000, (5, 2))
    path = write_patch_file(tmp_path / "s.h5", imgs, coords, coords // 32, codec=codec)
    pf = PatchFile(path)
    got = pf.read_many([3, 1, 1, 4])
    tol = 0 if codec != "jpeg" else 12
    assert np.abs(got.astype(int) - imgs[[3, 1, 1, 4]]).mean() <= tol
    assert (pf.coords() == coords).all() and pf.slide_id == "s" and len(pf) == 5


def test_jpeg_batch_of_identical_patches(tmp_path):
    """Equal-length JPEG buffers must not be mistaken for a 2-D array by h5py."""
    imgs = np.full((3, 32, 32, 3), 255, np.uint8)
    path = write_patch_file(tmp_path / "blank.h5", imgs, np.zeros((3, 2)), np.zeros((3, 2)), codec="jpeg")
    assert (PatchFile(path).read_many([0, 1, 2]) >= 250).all()


def test_wrong_layout_names_the_file(tmp_path):
    import h5py

    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["features"] = np.zeros((2, 4))
    with pytest.raises(PatchFileError, match="bad.h5.*sgcl tile"):
        PatchFile(bad)


def test_coordinates_only_file(tmp_path):
    """codec=None: coords, grid and tissue fraction without `imgs`; reading a patch says how to get it."""
    import h5py

    from preprocessing.h5format import PatchWriter, is_patch_file

    coords = np.array([[0, 0], [224, 0], [0, 224]])
    writer = PatchWriter(tmp_path / "c.h5", 224, codec=None)
    writer.append(None, coords, coords // 224, np.array([0.5, 0.75, 1.0]))
    with pytest.raises(ValueError, match="imgs"):
        writer.append(np.zeros((1, 224, 224, 3), np.uint8), coords[:1], coords[:1], np.ones(1))
    writer.set_attrs({"slide_id": "c", "patch_size": 224})
    writer.close()
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert sorted(f.keys()) == ["coords", "grid", "tissue_fraction"]
    pf = PatchFile(tmp_path / "c.h5")
    assert is_patch_file(tmp_path / "c.h5") and not pf.has_pixels and pf.codec == "none" and pf.patch_size == 224
    assert len(pf) == 3 and (pf.coords() == coords).all() and pf.tissue_fraction().tolist() == [0.5, 0.75, 1.0]
    with pytest.raises(PatchFileError, match=r"c\.h5: coordinates only"):
        pf.read_many([0, 1])
