"""PatchDataset over HDF5 patch files, its collate, and the resumable distributed sampler."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from preprocessing.h5format import write_patch_file
from sgcl.data.dataset import DatasetError, PatchDataset, SampleTransform, collate, resolve_sources
from sgcl.data.sampler import ResumableDistributedSampler
from sgcl.transforms.crops import RandomResizedCropPolicy
from sgcl.transforms.multicrop import QuadrantMultiCrop
from sgcl.transforms.views import ViewBuilder

from conftest import shared_path


def make_cohort(folder: Path, counts=(3, 5, 1, 4, 2), size: int = 32, codec: str = "raw") -> list[Path]:
    """Slides whose patch ``j`` of slide ``s`` is filled with value ``10*s + j`` (known answers)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, n in enumerate(counts):
        imgs = np.stack([np.full((size, size, 3), 10 * s + j, np.uint8) for j in range(n)])
        grid = np.stack([np.arange(n) % 3, np.arange(n) // 3], 1)
        paths.append(write_patch_file(folder / f"slide{s}.h5", imgs, grid * size, grid, codec=codec))
    return paths


def test_global_index_metadata_and_lru_handles(tmp_path):
    make_cohort(tmp_path / "h5")
    ds = PatchDataset(tmp_path / "h5", cache_files=2)
    assert len(ds) == 15 and ds.num_slides == 5
    assert ds.slide_ids == [f"slide{s}" for s in range(5)]
    meta = ds.meta()
    assert meta.num_patches == 15 and meta.num_slides == 5
    assert meta.slide_of.tolist() == [0] * 3 + [1] * 5 + [2] + [3] * 4 + [4] * 2
    assert meta.grid_of[3 + 4].tolist() == [1, 1]  # slide 1, patch 4 -> column 1, row 1
    assert ds.open_files == 0, "metadata must come from grid/coords only, without keeping handles"
    for index in list(range(15)) + list(range(14, -1, -1)):
        item = ds[index]
        slide, row = ds.locate(index)
        assert item["slide"] == slide and int(item["image"][0, 0, 0]) == 10 * slide + row
        assert ds.open_files <= 2
    ds.close()


def test_sources_folder_glob_list_and_duplicates(tmp_path):
    paths = make_cohort(tmp_path / "h5")
    listing = tmp_path / "slides.txt"
    listing.write_text("# cohort\n" + "\n".join(f"h5/{p.name}" for p in paths[:2]) + "\n")
    assert resolve_sources(listing) == paths[:2]
    assert resolve_sources(str(tmp_path / "h5" / "slide[34].h5")) == paths[3:]
    assert resolve_sources([tmp_path / "h5", paths[0]]) == paths


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty.*no \.h5 patch file"):
        PatchDataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match=r"nowhere\.h5 does not exist"):
        PatchDataset(tmp_path / "nowhere.h5")
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f.create_dataset("features", data=np.zeros((4, 8)))
    with pytest.raises(DatasetError, match=r"wrong\.h5: not an sgcl patch file"):
        PatchDataset(wrong)
    not_h5 = tmp_path / "broken.h5"
    not_h5.write_bytes(b"not an hdf5 file")
    with pytest.raises(DatasetError, match=r"broken\.h5: cannot open as HDF5"):
        PatchDataset(not_h5)
    good = make_cohort(tmp_path / "h5", counts=(2,))
    ds = PatchDataset([good[0], wrong], skip_bad=True)
    assert len(ds) == 2 and ds.bad_files[0][0] == str(wrong)


def test_views_and_collate_follow_the_batch_contract(tmp_path):
    make_cohort(tmp_path / "h5", size=64)
    builder = ViewBuilder(RandomResizedCropPolicy(32), photometric=None)
    local = QuadrantMultiCrop(ViewBuilder(RandomResizedCropPolicy(16, scale=(0.2, 0.56)), photometric=None))
    ds = PatchDataset(tmp_path / "h5", SampleTransform(builder, num_views=2, multicrop=local, normalize=False), seed=1)
    items = [ds[i] for i in (0, 4, 9)]
    batch = collate(items)
    assert [v.shape for v in batch["views"]] == [(3, 3, 32, 32)] * 2
    assert batch["views"][0].dtype == torch.uint8
    assert batch["local"].shape == (12, 3, 16, 16)
    assert batch["index"].tolist() == [0, 4, 9] and batch["slide"].tolist() == [0, 1, 3]
    assert batch["grid"].tolist() == [[0, 0], [1, 0], [0, 0]]
    assert [g.shape for g in batch["geoms"]] == [(3, 8)] * 2
    # local crops ordered [tl(B), tr(B), bl(B), br(B)]: row q*B + b is quadrant q of sample b
    for q in range(4):
        for b, item in enumerate(items):
            assert torch.equal(batch["local"][q * 3 + b], item["local"][q])
    assert torch.equal(collate([ds[4]])["views"][0], collate([ds[4]])["views"][0]), "views are seeded per (seed, epoch, index)"
    ds.set_epoch(1)
    assert not torch.equal(batch["geoms"][0][1], collate([ds[4]])["geoms"][0][0])


def test_real_patches_from_the_tiler(tmp_path):
    from preprocessing.config import TileConfig
    from preprocessing.slide_tiler import tile_slide

    cfg = TileConfig()
    cfg.patch.target_mpp, cfg.patch.patch_size = 2.0, 64
    out = tile_slide(shared_path("wsi", "cmu-1-small-region.svs"), tmp_path / "cmu1.h5", cfg)
    ds = PatchDataset(tmp_path / "cmu1.h5", SampleTransform(ViewBuilder(RandomResizedCropPolicy(48), None), num_views=1))
    assert len(ds) > 5
    item = ds[len(ds) - 1]
    assert item["views"][0].shape == (3, 48, 48) and item["views"][0].dtype == torch.float32
    assert out.n_patches == len(ds)
    with h5py.File(tmp_path / "cmu1.h5", "r") as f:
        assert np.array_equal(ds.grid_of, f["grid"][:].astype(np.int64))


def test_sampler_partitions_ranks_and_resumes_mid_epoch():
    n = 23
    samplers = [ResumableDistributedSampler(n, 2, r, seed=4) for r in range(2)]
    for s in samplers:
        s.set_epoch(3)
    a, b = list(samplers[0]), list(samplers[1])
    assert len(a) == len(b) == 11 and not set(a) & set(b)
    whole = ResumableDistributedSampler(n, 1, 0, seed=4)
    whole.set_epoch(3)
    full = list(whole)
    whole.advance(7)
    state = whole.state_dict()
    resumed = ResumableDistributedSampler(n, 1, 0, seed=4)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the trainer re-enters the restored epoch: the position is kept
    assert list(resumed) == full[7:]
    resumed.set_epoch(4)
    assert resumed.position == 0 and list(resumed) != full
    with pytest.raises(ValueError, match="dataset has 24"):
        ResumableDistributedSampler(24).load_state_dict(state)


def test_worker_count_does_not_change_the_batches(tmp_path):
    from torch.utils.data import DataLoader

    from sgcl.transforms.photometric import PhotometricAugment

    rng = np.random.default_rng(0)
    (tmp_path / "h5").mkdir()
    for s in range(3):  # textured JPEG patches (the tiler's default codec)
        imgs = rng.integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)
        grid = np.stack([np.arange(5), np.zeros(5, int)], 1)
        write_patch_file(tmp_path / "h5" / f"s{s}.h5", imgs, grid * 48, grid, codec="jpeg")
    builder = ViewBuilder(RandomResizedCropPolicy(24), PhotometricAugment())
    ds = PatchDataset(tmp_path / "h5", SampleTransform(builder, num_views=2), cache_files=2, seed=3)
    sampler = ResumableDistributedSampler(len(ds), seed=3)

    def batches(workers):
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=collate)
        return [b["views"][1] for b in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 4
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


def test_a_corrupt_patch_stops_by_default_and_is_replaced_with_skip_bad(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    grid = np.stack([np.arange(4), np.zeros(4, int)], 1)
    path = write_patch_file(tmp_path / "s.h5", imgs, grid * 32, grid, codec="jpeg")
    with h5py.File(path, "r+") as f:  # truncate the JPEG stream of patch 1
        f["imgs"][1] = f["imgs"][1][:20]
    with pytest.raises(DatasetError, match=r"s\.h5: cannot read patch 1"):
        PatchDataset(path)[1]
    ds = PatchDataset(path, skip_bad=True)
    with pytest.warns(RuntimeWarning, match="cannot read patch 1"):
        item = ds[1]
    assert item["index"] == 1 and np.array_equal(item["image"], ds[2]["image"])


def _tile(slide, out, store_pixels: bool, mpp=None):
    from preprocessing.config import TileConfig
    from preprocessing.slide_tiler import tile_slide

    cfg = TileConfig()
    cfg.patch.target_mpp, cfg.patch.patch_size = 1.0, 64
    cfg.output.codec, cfg.output.qc, cfg.output.store_pixels = "raw", False, store_pixels
    cfg.tissue.max_background_fraction = 1.0  # the same cells with and without pixels
    tile_slide(slide, out, cfg, mpp_override=mpp)
    return out


def test_coordinates_only_file_yields_the_stored_raw_pixels(tmp_path):
    """A --no-pixels file is read from its slide (found at its source_path attr, or in slide_dirs) and
    gives the same images, grid and slide ids as the stored raw file of the same slide."""
    slide = shared_path("wsi", "cmu-1-small-region.svs")
    stored = PatchDataset(_tile(slide, tmp_path / "pix" / "cmu.h5", True))
    coords = PatchDataset(_tile(slide, tmp_path / "coords" / "cmu.h5", False), cache_files=1)
    assert len(coords) == len(stored) > 100 and coords.slide_ids == stored.slide_ids == ["cmu-1-small-region"]
    np.testing.assert_array_equal(coords.grid_of, stored.grid_of)
    assert coords.open_files == 0
    for i in range(len(stored)):
        np.testing.assert_array_equal(coords[i]["image"], stored[i]["image"])
    assert coords.open_files == 1
    coords.close()
    # moved slides: the recorded path is gone -> a clear error at construction, fixed by slide_dirs
    moved = tmp_path / "moved" / "cmu.h5"
    moved.parent.mkdir()
    moved.write_bytes((tmp_path / "coords" / "cmu.h5").read_bytes())
    with h5py.File(moved, "r+") as f:
        f.attrs["source_path"] = str(tmp_path / "gone" / slide.name)
    with pytest.raises(DatasetError, match=r"moved/cmu\.h5: coordinates only.*data\.slide_dirs"):
        PatchDataset(moved)
    ds = PatchDataset(moved, slide_dirs=[str(slide.parent)])
    np.testing.assert_array_equal(ds[len(ds) - 1]["image"], stored[len(stored) - 1]["image"])


def test_tiny_pretraining_on_a_coordinates_only_folder(tmp_path):
    """sgcl pretrain trains from --no-pixels files (two real slides), reading patches in a loader worker."""
    from sgcl.config import load_config
    from sgcl.train.config import PretrainConfig
    from sgcl.train.trainer import Trainer

    folder = tmp_path / "coords"
    _tile(shared_path("wsi", "cmu-1-small-region.svs"), folder / "cmu1.h5", False)
    _tile(shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs"), folder / "tcga.h5", False, mpp=0.25)
    with h5py.File(folder / "tcga.h5", "r") as f:
        assert "imgs" not in f
    torch.set_num_threads(1)
    cfg = load_config(PretrainConfig, Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny_cpu.yaml",
                      [f"data.h5_dir={folder}", f"train.out_dir={tmp_path / 'run'}", "train.progress=false",
                       "train.max_steps=3", "train.export=false", "data.workers=1"])
    trainer = Trainer(cfg)
    rows = trainer.fit()
    assert trainer.dataset.num_slides == 2 and len(trainer.dataset) > 100
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
