"""`sgcl extract`: CLAM-readable outputs, stored vs on-the-fly equality on the real demo slide,
resume, one bad slide, float16, load balancing, and torchrun with two ranks."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from evaluation.extract import assign_by_load, main as extract_main

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ENC = ["--encoder", "test_resnet", "num_workers=0", "progress=false", "batch_size=16"]


@pytest.fixture(scope="module")
def demo_tiles(tmp_path_factory):
    """The real demo slide tiled by the tiling stage (raw pixels stored), plus a CLAM-style
    coords-only copy of the same file."""
    from preprocessing.config import TileConfig
    from preprocessing.slide_tiler import tile_slide

    root = tmp_path_factory.mktemp("demo")
    slide = REPO / "data" / "demo" / "CMU-1-Small-Region.svs"
    cfg = TileConfig()
    cfg.output.codec, cfg.output.qc = "raw", False
    tile_slide(slide, root / "patches" / "CMU-1-Small-Region.h5", cfg)
    clam = root / "clam" / "patches" / "CMU-1-Small-Region.h5"
    clam.parent.mkdir(parents=True)
    with h5py.File(root / "patches" / "CMU-1-Small-Region.h5", "r") as src, h5py.File(clam, "w") as dst:
        c = dst.create_dataset("coords", data=src["coords"][:], chunks=(1, 2), maxshape=(None, 2))
        for k in ("patch_size", "patch_level", "downsample", "name", "level_dim"):
            c.attrs[k] = src["coords"].attrs[k]
    return root, slide


def _manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def test_outputs_open_like_clam_and_on_the_fly_equals_stored(demo_tiles, tmp_path):
    root, slide = demo_tiles
    stored, fly, clam = tmp_path / "stored", tmp_path / "fly", tmp_path / "clam"
    assert extract_main(["--inputs", str(root / "patches"), "--out", str(stored), *ENC]) == 0
    assert extract_main(["--inputs", str(root / "patches"), "--out", str(fly), "read_from=slide", *ENC]) == 0
    assert extract_main(["--inputs", str(root / "clam" / "patches"), "--out", str(clam),
                         "--slide-dir", str(slide.parent), *ENC]) == 0

    # a plain script written the way CLAM's MIL dataset reads features
    def clam_loader(feat_dir: Path, slide_id: str):
        features = torch.load(os.path.join(feat_dir, "pt_files", f"{slide_id}.pt"))
        with h5py.File(os.path.join(feat_dir, "h5_files", f"{slide_id}.h5"), "r") as hdf5_file:
            h5_features = hdf5_file["features"][:]
            coords = hdf5_file["coords"][:]
        return features, torch.from_numpy(h5_features), coords

    feats, h5_feats, coords = clam_loader(stored, "CMU-1-Small-Region")
    with h5py.File(root / "patches" / "CMU-1-Small-Region.h5", "r") as f:
        n, tile_coords, tile_grid = len(f["coords"]), f["coords"][:], f["grid"][:]
        coords_attrs = dict(f["coords"].attrs)
    assert n > 20 and feats.shape == (n, 96) and feats.dtype == torch.float32
    assert torch.equal(feats, h5_feats)
    np.testing.assert_array_equal(coords, tile_coords)
    with h5py.File(stored / "h5_files" / "CMU-1-Small-Region.h5", "r") as f:
        np.testing.assert_array_equal(f["grid"][:], tile_grid)
        assert f["coords"].attrs["patch_level"] == coords_attrs["patch_level"]
        assert f["coords"].attrs["patch_size"] == coords_attrs["patch_size"]
        a = dict(f.attrs)
        assert a["encoder"] == "test_resnet" and len(a["weights_sha256"]) == 64
        assert a["mpp"] == pytest.approx(0.499, abs=1e-3) and a["patch_size"] == 224 and a["sgcl_version"]
        assert "items_per_second" in a["timings"]
        assert f["features"].chunks[0] > 1  # not CLAM's one-row chunks
    # on-the-fly reading (our file, and CLAM's coords-only file) gives the stored patches' features
    fly_feats = torch.load(fly / "pt_files" / "CMU-1-Small-Region.pt", weights_only=True)
    clam_feats = torch.load(clam / "pt_files" / "CMU-1-Small-Region.pt", weights_only=True)
    torch.testing.assert_close(fly_feats, feats, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(clam_feats, feats, rtol=1e-4, atol=1e-4)
    assert _manifest(fly)["CMU-1-Small-Region"]["read_mode"] == "slide"
    with h5py.File(clam / "h5_files" / "CMU-1-Small-Region.h5", "r") as f:
        np.testing.assert_array_equal(f["grid"][:] - f["grid"][:].min(0), tile_grid - tile_grid.min(0))


def test_resume_bad_slide_float16_and_export_folder(demo_tiles, tmp_path):
    from preprocessing.h5format import write_patch_file
    from sgcl.models.backbone import create_backbone, export_backbone

    root, _ = demo_tiles
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("a", 5), ("b", 3)):
        write_patch_file(inputs / f"{name}.h5", rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8),
                         np.arange(2 * n).reshape(n, 2) * 64, np.arange(2 * n).reshape(n, 2))
    (inputs / "broken.h5").write_bytes(b"not an hdf5 file")
    out = tmp_path / "out"
    assert extract_main(["--inputs", str(inputs), "--out", str(out), *ENC]) == 1  # one failed -> non-zero
    m = _manifest(out)
    assert m["a"]["status"] == "done" and m["b"]["status"] == "done" and m["a"]["n_patches"] == "5"
    assert m["broken"]["status"] == "failed" and "broken.h5" in m["broken"]["error"] + m["broken"]["source"]
    mtime = (out / "h5_files" / "a.h5").stat().st_mtime_ns
    # resume: done slides are skipped (file untouched); a fixed bad input is then done
    (inputs / "broken.h5").unlink()
    assert extract_main(["--inputs", str(inputs), "--out", str(out), *ENC]) == 0
    m = _manifest(out)
    assert m["a"]["status"] == "done" and (out / "h5_files" / "a.h5").stat().st_mtime_ns == mtime
    assert m["broken"]["status"] == "failed"  # the earlier row is kept until it is fixed
    # other parameters (float16 features, another encoder) -> recomputed, not skipped
    model = create_backbone("test_resnet")
    export_backbone(model, "test_resnet", tmp_path / "export")
    assert extract_main(["--inputs", str(inputs / "a.h5"), "--out", str(out), "--encoder", str(tmp_path / "export"),
                         "feature_dtype=float16", "num_workers=0", "progress=false"]) == 0
    assert (out / "h5_files" / "a.h5").stat().st_mtime_ns != mtime
    with h5py.File(out / "h5_files" / "a.h5", "r") as f:
        assert f["features"].dtype == np.float16
        import json

        assert f.attrs["weights_sha256"] == json.loads((tmp_path / "export" / "backbone.json").read_text())["sha256"]
    assert torch.load(out / "pt_files" / "a.pt", weights_only=True).dtype == torch.float16
    assert not list((out / "h5_files").glob(".*tmp")) and not list((out / "h5_files").glob("*.lock"))


def test_missing_slide_is_a_clear_failure(demo_tiles, tmp_path):
    root, _ = demo_tiles
    with h5py.File(root / "clam" / "patches" / "CMU-1-Small-Region.h5", "r") as src, \
            h5py.File(tmp_path / "lost-slide.h5", "w") as dst:
        c = dst.create_dataset("coords", data=src["coords"][:5])
        c.attrs["patch_size"] = 224
    assert extract_main(["--inputs", str(tmp_path / "lost-slide.h5"), "--out", str(tmp_path / "o"),
                         "--slide-dir", str(tmp_path), *ENC]) == 1
    err = _manifest(tmp_path / "o")["lost-slide"]["error"]
    assert "slide for 'lost-slide' not found" in err and "slide_dir" in err


def test_assign_by_load_is_greedy_largest_first():
    counts = [10, 70, 30, 30, 20, 5, 50]
    ranks = assign_by_load(counts, 3)
    assert sorted(i for r in ranks for i in r) == list(range(7))
    loads = [sum(counts[i] for i in r) for r in ranks]
    assert max(loads) - min(loads) <= max(counts[i] for r in ranks for i in r[-1:])
    assert ranks[0][0] == 1 and ranks[1][0] == 6  # the two largest start different ranks
    assert assign_by_load([3, 3], 4) == [[0], [1], [], []]


def test_torchrun_two_ranks_write_their_slides_and_merge_manifest(tmp_path):
    from preprocessing.h5format import write_patch_file

    rng = np.random.default_rng(1)
    for name, n in (("s1", 6), ("s2", 4), ("s3", 3)):
        write_patch_file(tmp_path / "in" / f"{name}.h5", rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
                         np.arange(2 * n).reshape(n, 2) * 32, np.arange(2 * n).reshape(n, 2))
    import socket

    with socket.socket() as sock:  # a free port, so parallel test runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "sgcl.cli", "extract", "--inputs", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
           "--device", "cpu", *ENC]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = _manifest(tmp_path / "out")
    assert {k: v["status"] for k, v in m.items()} == {"s1": "done", "s2": "done", "s3": "done"}
    assert m["s1"]["rank"] == "0" and m["s2"]["rank"] == "1" and m["s3"]["rank"] == "1"
    assert not list((tmp_path / "out").glob("manifest.rank*.csv"))


def _tile(slide, out, mpp=None, **keys):
    from preprocessing.config import TileConfig
    from preprocessing.slide_tiler import tile_slide

    cfg = TileConfig()
    cfg.output.codec, cfg.output.qc, cfg.tissue.max_background_fraction = "raw", False, 1.0  # same cells both ways
    for key, value in keys.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    tile_slide(slide, out, cfg, mpp_override=mpp)
    return out


@pytest.mark.parametrize("case", ["tcga_level0_pad_black", "cmu_resized"])
def test_no_pixels_file_reads_back_the_stored_raw_patches(case, tmp_path):
    """A --no-pixels file read from the slide (evaluation.sources.open_source -> SlidePatches) gives the
    stored raw patches pixel for pixel: same level, read size, resize and edge padding (edge cells of
    the TCGA slide padded black; CMU read at 224 px and resized to 112)."""
    from conftest import shared_path
    from evaluation.sources import SlidePatches, StoredPatches, open_source

    if case == "tcga_level0_pad_black":
        slide, mpp, keys = shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs"), 0.5, {"patch__edge": "pad_black"}
    else:
        slide, mpp, keys = shared_path("wsi", "cmu-1-small-region.svs"), None, {"patch__target_mpp": 1.0,
                                                                               "patch__patch_size": 112}
    stored = open_source(_tile(slide, tmp_path / "pix" / f"{slide.stem}.h5", mpp, **keys))
    fly = open_source(_tile(slide, tmp_path / "coords" / f"{slide.stem}.h5", mpp, output__store_pixels=False, **keys))
    assert isinstance(stored, StoredPatches) and isinstance(fly, SlidePatches)
    desc = fly.describe()
    with h5py.File(tmp_path / "pix" / f"{slide.stem}.h5", "r") as f:
        a = dict(f.attrs)
        np.testing.assert_array_equal(fly.coords, f["coords"][:])
    assert (desc["read_level"], desc["read_size"], desc["patch_size"]) == (a["read_level"], a["read_size"], a["patch_size"])
    assert len(fly) == len(stored) > 20
    got = np.stack([fly[i] for i in range(len(fly))])
    np.testing.assert_array_equal(got, stored.file.read_many(range(len(stored))))
    if case == "tcga_level0_pad_black":
        assert desc["background"] == "black"
        edge = fly.coords[:, 0] + 224 > a["level0_width"]
        assert edge.sum() == 4 and (got[edge][:, :, 187:] == 0).all()  # 4443 - 4256 = 187 px inside
    else:
        assert (a["read_size"], a["patch_size"], desc.get("background", "white")) == (224, 112, "white")


def test_no_pixels_features_equal_stored_features(tmp_path):
    from conftest import shared_path

    slide = shared_path("wsi", "cmu-1-small-region.svs")
    _tile(slide, tmp_path / "pix" / "cmu.h5")
    _tile(slide, tmp_path / "coords" / "cmu.h5", output__store_pixels=False)
    for name in ("pix", "coords"):
        assert extract_main(["--inputs", str(tmp_path / name), "--out", str(tmp_path / f"f_{name}"), *ENC]) == 0
    sid = slide.stem  # the slide id attr; the slide is found at the file's source_path attr
    stored = torch.load(tmp_path / "f_pix" / "pt_files" / f"{sid}.pt", weights_only=True)
    fly = torch.load(tmp_path / "f_coords" / "pt_files" / f"{sid}.pt", weights_only=True)
    assert stored.shape[0] > 30 and _manifest(tmp_path / "f_coords")[sid]["read_mode"] == "slide"
    assert torch.equal(fly, stored)


def test_clam_coords_are_padded_black_like_clam(tmp_path):
    """CLAM/TRIDENT coords (no read_level/read_size attrs) crossing the right/bottom edge: read as they read
    them, OpenSlide read_region(coord, patch_level, (patch_size,)*2).convert("RGB"), i.e. black outside
    the slide, pixel for pixel (level 0 of CMU-1, and TCGA's non-integer level 1 with partly transparent
    edge pixels)."""
    import openslide

    from conftest import shared_path
    from evaluation.sources import SlidePatches, open_source

    for name, level in (("cmu-1-small-region.svs", 0), ("tcga-cr-7395-01a-01-ts1.svs", 1)):
        slide = shared_path("wsi", name)
        wsi = openslide.OpenSlide(str(slide))
        w0, h0 = wsi.dimensions
        coords = np.array([[w0 - 100, 400], [400, h0 - 60], [w0 - 150, h0 - 150], [448, 448]], np.int64)
        path = tmp_path / str(level) / f"{slide.stem}.h5"
        path.parent.mkdir()
        with h5py.File(path, "w") as f:
            c = f.create_dataset("coords", data=coords)
            c.attrs["patch_size"], c.attrs["patch_level"] = 224, level
        src = open_source(path, [str(slide.parent)])
        assert isinstance(src, SlidePatches) and src.describe()["background"] == "black"
        for i, (x, y) in enumerate(coords):
            theirs = np.asarray(wsi.read_region((int(x), int(y)), level, (224, 224)).convert("RGB"))
            np.testing.assert_array_equal(src[i], theirs)
        inside = int(np.ceil((w0 - coords[0, 0]) / wsi.level_downsamples[level]))  # columns inside the slide
        assert (src[0][:, inside + 1:] == 0).all() and (src[0][:, :inside - 1] > 0).any(axis=-1).all()
        assert (src[1][61:] == 0).all() if level == 0 else (src[1][31:] == 0).all()
