"""Bad and empty slides through every stage (issue 13): a slide without patches, two inputs with one
slide id, a corrupt HDF5 chunk and stalled reads in `sgcl extract`; empty slides in pretraining, MIL and
heatmaps; integer patch counts in the tile manifest; no duplicated metric rows after a resume.

The stalled reads are real: the dataset's storage is an HDF5 *external file* that is a FIFO without a
writer, so h5py blocks inside ``Dataset.__getitem__`` for good (as a hung network file system does)."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from _bad_input import BadInput, run_case
from conftest import REPO, shared_path

torch.set_num_threads(1)
# a DataLoader that reports its killed readers from __del__ would print a traceback in a real run
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
ENC = ("--encoder", "test_resnet", "progress=false", "batch_size=8")
IN_PROCESS = ENC + ("num_workers=0",)
ISOLATED = ENC + ("num_workers=1",)


def _patch_file(path: Path, n: int, codec: str = "raw", p: int = 32) -> Path:
    from preprocessing.h5format import write_patch_file

    rng = np.random.default_rng(n)
    grid = np.stack([np.arange(n) % 8, np.arange(n) // 8], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_patch_file(path, rng.integers(0, 255, (n, p, p, 3), dtype=np.uint8), grid * p, grid, codec=codec)
    return path


def _zero_chunk(path: Path, row: int) -> None:
    """Overwrite the on-disk bytes of ``imgs``' chunk holding ``row`` with zeros."""
    with h5py.File(path, "r") as f:
        info = f["imgs"].id.get_chunk_info_by_coord((row, 0, 0, 0))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\0" * info.size)


def _stalling_file(path: Path, stalled: str) -> Path:
    """A patch file whose ``stalled`` dataset ("imgs" or "coords") is stored in a FIFO nobody writes."""
    fifo = path.with_suffix(".fifo")
    os.mkfifo(fifo)
    n, p = 4, 32
    data = {"imgs": np.zeros((n, p, p, 3), np.uint8), "coords": np.arange(2 * n).reshape(n, 2) * p,
            "grid": np.arange(2 * n, dtype=np.int32).reshape(n, 2), "tissue_fraction": np.ones(n, np.float32)}
    with h5py.File(path, "w") as f:
        for name, value in data.items():
            if name == stalled:
                f.create_dataset(name, shape=value.shape, dtype=value.dtype, external=[(str(fifo), 0, h5py.h5f.UNLIMITED)])
            else:
                f.create_dataset(name, data=value)
        f["imgs"].attrs["codec"] = "raw"
        f["coords"].attrs["patch_size_level0"] = p
        f.attrs["slide_id"], f.attrs["patch_size"] = path.stem, p
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_slides")
    # an empty JPEG patch file without a patch_size attr: the file that made extract fail with
    # "IndexError: Index (0) out of range for empty dimension"
    files = {"empty": _patch_file(root / "empty" / "boxes.h5", 0, codec="jpeg"),
             "dup_a": _patch_file(root / "a" / "x.h5", 2), "dup_b": _patch_file(root / "b" / "x.h5", 3),
             "corrupt": _patch_file(root / "corrupt.h5", 4, codec="gzip"),
             "stall": _stalling_file(root / "stall.h5", "imgs"),
             "stall_coords": _stalling_file(root / "stall_coords.h5", "coords")}
    _zero_chunk(files["corrupt"], 1)
    with h5py.File(root / "clam_empty.h5", "w") as f:  # CLAM coords without patches, its slide nowhere
        f.create_dataset("coords", data=np.zeros((0, 2), np.int64)).attrs.update(patch_size=256, patch_level=0)
    return {**files, "clam_empty": root / "clam_empty.h5", "out": root / "out"}


X = ("extract", "--out", "{out}/{case_id}")
CASES = [
    BadInput("empty-slide", X + ("--inputs", "{empty}") + IN_PROCESS, 0, r"'done': 1, 'skipped': 0, 'failed': 0"),
    BadInput("empty-slide-isolated-trident", X + ("--inputs", "{empty}", "--layout", "trident") + ISOLATED, 0,
             r"'done': 1, 'skipped': 0, 'failed': 0"),
    BadInput("empty-clam-coords-without-slide", X + ("--inputs", "{clam_empty}") + ISOLATED, 0,
             r"'done': 1, 'skipped': 0, 'failed': 0"),
    BadInput("duplicate-slide-ids", X + ("--inputs", "{dup_a}", "{dup_b}") + IN_PROCESS, 2,
             r"duplicate slide id 'x': \S*/a/x\.h5 and \S*/b/x\.h5\. Slide ids name the output files"),
    BadInput("corrupt-chunk", X + ("--inputs", "{corrupt}", "{empty}", "--slide-timeout", "30") + ISOLATED, 1,
             r"corrupt\.h5: FAILED: OSError: Can't synchronously read data \(filter returned failure during read\)"),
    BadInput("stalled-patch-read", X + ("--inputs", "{stall}", "{empty}", "--slide-timeout", "3") + ISOLATED, 1,
             r"stall\.h5: FAILED: timed out: still running after 3 s \(slide_timeout_s\); its patch reads were stopped"),
    BadInput("stalled-coords-read", X + ("--inputs", "{stall_coords}", "{empty}", "--slide-timeout", "2") + ISOLATED, 1,
             r"stall_coords\.h5: FAILED: timed out: still running after 2 s \(slide_timeout_s\); the worker was killed"),
    BadInput("zero-slide-timeout", X + ("--inputs", "{empty}", "--slide-timeout", "0") + IN_PROCESS, 2,
             r"slide_timeout_s: 0\.0 is out of range; allowed: > 0"),
]
# (slide id, status, error regex) of the manifest rows each case must leave
ROWS = {
    "corrupt-chunk": [("corrupt", "failed", r"^OSError: Can't synchronously read data"), ("boxes", "done", r"^$")],
    "stalled-patch-read": [("stall", "failed", r"^timed out: still running after 3 s"), ("boxes", "done", r"^$")],
    "stalled-coords-read": [("stall_coords", "failed", r"^timed out: still running after 2 s"), ("boxes", "done", r"^$")],
}


def _manifest(folder: Path) -> dict[str, dict]:
    with open(folder / "manifest.csv", newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input_slides(case: BadInput, inputs, capfd):
    t0 = time.monotonic()
    run_case(case, capfd, case_id=case.id, **inputs)
    if case.id.startswith("stalled"):  # stopped at its limit, not hung (the reads block for good)
        assert time.monotonic() - t0 < 20, f"{case.id} took {time.monotonic() - t0:.0f} s"
    for sid, status, error in ROWS.get(case.id, []):
        row = _manifest(inputs["out"] / case.id)[sid]
        assert row["status"] == status and __import__("re").search(error, row["error"]), row
    if case.code == 2:
        assert not (inputs["out"] / case.id / "manifest.csv").exists()


def _check_empty_features(out: Path, layout: str, dim: int) -> None:
    h5 = out / ("h5_files" if layout == "default" else f"features_{'test_resnet'}") / "boxes.h5"
    with h5py.File(h5, "r") as f:
        assert f["features"].shape == (0, dim) and f["features"].dtype == np.float32
        assert f["coords"].shape == (0, 2) and f["grid"].shape == (0, 2)
    pt = out / "pt_files" / "boxes.pt"
    if layout == "default":
        assert torch.load(pt, weights_only=True).shape == (0, dim)
    else:
        assert not pt.exists()
    row = _manifest(out)["boxes"]
    assert row["n_patches"] == "0" and row["note"].startswith("no patches: empty feature file")


def test_empty_slide_gives_empty_feature_files_in_every_layout_and_resumes(inputs, tmp_path):
    from evaluation.extract import main as extract_main

    for layout in ("default", "trident"):
        out = tmp_path / layout
        argv = ["--inputs", str(inputs["empty"]), "--out", str(out), "--layout", layout, *IN_PROCESS]
        assert extract_main(argv) == 0
        _check_empty_features(out, layout, 96)
        assert extract_main(argv) == 0  # resume: the empty file counts as done
        assert _manifest(out)["boxes"]["status"] == "done"  # the computing run's row is kept


def test_real_zero_patch_slide_tiles_and_extracts(tmp_path):
    """boxes.tiff (a synthetic slide without tissue) through `sgcl tile` then `sgcl extract`."""
    from sgcl.cli import main

    boxes = shared_path("wsi", "openslide-fixtures", "boxes.tiff")
    assert main(["tile", str(boxes), "--assume-mpp", "0.5", "--out", str(tmp_path / "tiles"), "--quiet", "--no-qc"]) == 0
    assert main(["extract", "--inputs", str(tmp_path / "tiles"), "--out", str(tmp_path / "feats"), *IN_PROCESS]) == 0
    _check_empty_features(tmp_path / "feats", "default", 96)


def test_pretraining_ignores_empty_slides_with_a_count(inputs, tmp_path, capsys):
    from sgcl.config import load_config
    from sgcl.data.dataset import PatchDataset
    from sgcl.train.config import PretrainConfig
    from sgcl.train.trainer import Trainer

    data = tmp_path / "patches"
    _patch_file(data / "full.h5", 40, p=64)
    (data / "boxes.h5").symlink_to(inputs["empty"])
    ds = PatchDataset(data)
    assert ds.empty_slides == ["boxes"] and len(ds) == 40 and ds.num_slides == 1
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "tiny_cpu.yaml",
                      [f"data.h5_dir={data}", f"train.out_dir={tmp_path / 'run'}", "train.progress=false", "data.batch_size=8"])
    Trainer(cfg).setup()
    assert "[sgcl pretrain] ignored 1 slide with no patches: boxes" in capsys.readouterr().err


def _bag(path: Path, x: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=x)
        f.create_dataset("coords", data=np.zeros((len(x), 2), np.int64))


def test_mil_ignores_empty_slides_with_a_count(tmp_path, capsys):
    from evaluation.mil.cli import main as mil_main

    rng = np.random.default_rng(0)
    rows = ["slide_id,label"]
    for i in range(8):
        _bag(tmp_path / "feats" / "h5_files" / f"s{i}.h5", rng.normal(size=(6, 8)).astype(np.float32) + i % 2)
        rows.append(f"s{i},{'ab'[i % 2]}")
    _bag(tmp_path / "feats" / "h5_files" / "boxes.h5", np.zeros((0, 8), np.float32))
    (tmp_path / "labels.csv").write_text("\n".join(rows + ["boxes,a"]) + "\n")
    out = tmp_path / "mil"
    assert mil_main(["--features", str(tmp_path / "feats"), "--labels", str(tmp_path / "labels.csv"), "--out", str(out),
                     "--model", "mean", "progress=false", "train.epochs=2", "cv.folds=2", "report.bootstrap=0",
                     "report.plots=false"]) == 0
    assert "sgcl eval mil: ignored 1 slide with no patches: boxes" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["ignored_empty_slides"] == ["boxes"]
    assert "boxes" not in {s for fold in config["fold_slides"].values() for part in fold.values() for s in part}


def test_tile_manifest_writes_patch_counts_as_integers(tmp_path):
    from preprocessing.cohort import MANIFEST_COLUMNS, update_manifest

    path = tmp_path / "manifest.csv"
    update_manifest(path, [{"slide_id": "a", "status": "done", "n_patches": 43, "finished_utc": "2026-01-01T00:00:01"},
                           {"slide_id": "b", "status": "failed", "n_patches": None, "finished_utc": "2026-01-01T00:00:02"}])
    update_manifest(path, [{"slide_id": "c", "status": "done", "n_patches": 0, "finished_utc": "2026-01-01T00:00:03"}])  # re-read + merge
    with open(path, newline="") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert list(rows["a"]) == MANIFEST_COLUMNS
    assert (rows["a"]["n_patches"], rows["b"]["n_patches"], rows["c"]["n_patches"]) == ("43", "", "0")


class _Killed(Exception):
    pass


def test_resume_after_a_kill_does_not_duplicate_metric_rows(tmp_path, monkeypatch):
    """A run killed at step 5 with its last checkpoint at step 4: the resumed run redoes step 5 and
    metrics.csv / metrics.jsonl hold every step once, in order."""
    from sgcl.config import load_config
    from sgcl.train.checkpoint import load_checkpoint
    from sgcl.train.config import PretrainConfig
    from sgcl.train.trainer import Trainer

    data = _patch_file(tmp_path / "p" / "s.h5", 64, p=64)
    over = [f"data.files=[{data}]", f"train.out_dir={tmp_path / 'run'}", "train.progress=false", "data.batch_size=8",
            "train.max_steps=7", "train.ckpt_every=4", "train.log_every=1", "train.export=false"]
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "tiny_cpu.yaml", over)
    first = Trainer(cfg)
    first.setup()
    after_step = first.method.on_after_step

    def dies_in_step_6(out):
        if first.global_step == 5:  # step 6 is under way: rows 1-5 are logged, the checkpoint is step 4's
            raise _Killed
        after_step(out)

    monkeypatch.setattr(first.method, "on_after_step", dies_in_step_6)
    with pytest.raises(_Killed):
        first.fit()
    first.close()
    run = tmp_path / "run"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["global_step"] == 4
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    Trainer(load_config(PretrainConfig, REPO / "configs" / "pretrain" / "tiny_cpu.yaml", over)).fit()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    with open(run / "metrics.csv", newline="") as fh:
        csv_steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == csv_steps == list(range(1, 8))


def test_heatmap_ignores_empty_slides_with_a_count(tmp_path, capfd):
    from evaluation.extract import write_features_h5
    from evaluation.heatmap_cli import main as heatmap_main

    slide = REPO / "data" / "demo" / "CMU-1-Small-Region.svs"
    coords = np.array([[0, 0], [448, 0], [0, 448], [448, 448]], np.int64)
    fdir = tmp_path / "features" / "h5_files"
    write_features_h5(fdir / "CMU-1-Small-Region.h5", np.ones((4, 8), np.float32), coords, coords // 448,
                      {"patch_size_level0": 448}, {"slide_id": "CMU-1-Small-Region"})
    write_features_h5(fdir / "boxes.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64),
                      np.zeros((0, 2), np.int32), {"patch_size_level0": 448}, {"slide_id": "boxes"})
    (tmp_path / "s.csv").write_text("x,y,score\n" + "".join(f"{x},{y},{x + y}\n" for x, y in coords))
    out = tmp_path / "heat"
    # boxes' slide is not among --slides: an empty slide needs none
    assert heatmap_main(["--slides", str(slide), "--features", str(tmp_path / "features"), "--scores",
                         str(tmp_path / "s.csv"), "--out", str(out), "--mpp", "16", "--gallery", "0", "progress=false"]) == 0
    assert "sgcl heatmap: ignored 1 slide with no patches: boxes" in capfd.readouterr().err
    assert (out / "CMU-1-Small-Region_heatmap.png").is_file() and not list(out.glob("boxes*"))
