"""Filesystem faults and missing encoder paths: one line naming the path, exit code 2, never a traceback,
nothing half-written left behind (issue 13, items 3 and 9).

A read-only output folder is a ``chmod 555`` folder for a normal user; as root (CI containers), where
chmod does not stop writes, the same refusal is simulated: ``os.open`` / ``os.mkdir`` under the folder
raise ``EROFS``. A full disk is simulated the same way with ``ENOSPC`` (``{full}``: nothing can be
created) and by a filesystem that reports no free space (``{midfull}``: files can be created, the first
block of patches or features does not fit).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from _bad_input import BadInput, run_case
from conftest import DEMO_SLIDE

RO = r"cannot write \S+/ro/\w+: (Read-only file system|Permission denied) \(errno \d+\); choose another --out"
FULL = r"cannot write \S+/full/\w+: No space left on device \(errno 28\); free space there or choose another --out"
MID_FULL = r"cannot write \S+/midfull/\S+: No space left on device: [\d.]+ MB needed, 0.0 MB free \(errno 28\)"
NO_HUB = ("Hugging Face Hub repo", "hf-hub:/", "local-dir:/")  # timm's message for a path it took for a hub name
EXPORT = r"\(expected an export folder of `sgcl pretrain` with files: backbone\.safetensors, backbone\.json"
TILE = ("--workers", "0", "-q")
EXTRACT = ("--encoder", "test_resnet", "num_workers=0", "progress=false", "device=cpu")

CASES = [
    # -- read-only output folder: every command that writes, before any work ------------------------
    BadInput("tile-read-only", ("tile", "{slide}", "--out", "{ro}/tiles", *TILE), 2, "sgcl tile: " + RO),
    BadInput("pretrain-read-only", ("pretrain", "--config", "configs/pretrain/tiny_cpu.yaml", "--h5-dir", "{inputs}",
                                    "--out", "{ro}/run"), 2, "sgcl pretrain: " + RO),
    BadInput("extract-read-only", ("extract", "--inputs", "{inputs}", *EXTRACT, "--out", "{ro}/feats"), 2,
             "sgcl extract: " + RO),
    BadInput("eval-read-only", ("eval", "knn", "--features", "{inputs}/s1.h5", "--out", "{ro}/eval"), 2,
             "sgcl eval: " + RO),
    BadInput("heatmap-read-only", ("heatmap", "--slides", "{slide}", "--features", "{inputs}", "--scores", "{inputs}",
                                   "--out", "{ro}/heat"), 2, "sgcl heatmap: " + RO),
    BadInput("demo-read-only", ("demo", "--out", "{ro}/demo"), 2, "sgcl demo: " + RO),
    # -- full disk: nothing can be created, or the first block does not fit -------------------------
    BadInput("tile-disk-full", ("tile", "{slide}", "--out", "{full}/tiles", *TILE), 2, "sgcl tile: " + FULL),
    BadInput("extract-disk-full", ("extract", "--inputs", "{inputs}", *EXTRACT, "--out", "{full}/feats"), 2,
             "sgcl extract: " + FULL),
    BadInput("tile-disk-fills-during-slide", ("tile", "{slide_a}", "{slide_b}", "--out", "{midfull}/tiles", *TILE), 2,
             r"sgcl tile: " + MID_FULL + "; free space there", absent=("FAILED",)),
    BadInput("extract-disk-fills-during-slide", ("extract", "--inputs", "{inputs}", *EXTRACT, "--out", "{midfull}/feats"),
             2, r"sgcl extract: " + MID_FULL, absent=("FAILED",)),
    # -- missing encoder paths: "no such file or folder", before timm or the hub sees the name ------
    BadInput("encoder-weights-folder-missing", ("extract", "--inputs", "{inputs}", "--encoder", "uni", "--weights",
                                                "/no/such/dir", "--out", "{tmp}/f"), 2,
             r"uni: no such file or folder: /no/such/dir \(expected uni weights, files: pytorch_model\.bin, "
             r"published at huggingface\.co/MahmoodLab/UNI", absent=NO_HUB),
    BadInput("encoder-export-missing", ("extract", "--inputs", "{inputs}", "--encoder", "/no/such/export",
                                        "--out", "{tmp}/f"), 2, r"no such file or folder: /no/such/export " + EXPORT,
             absent=NO_HUB),
    BadInput("encoder-export-missing-with-weights", ("extract", "--inputs", "{inputs}", "--encoder", "/no/such/export",
                                                     "--weights", "/no/w.bin", "--out", "{tmp}/f"), 2,
             r"no such file or folder: /no/such/export " + EXPORT, absent=NO_HUB),
    BadInput("encoder-weights-file-missing", ("extract", "--inputs", "{inputs}", "--encoder",
                                              "/no/such/backbone.safetensors", "--out", "{tmp}/f"), 2,
             r"no such file or folder: /no/such/backbone\.safetensors " + EXPORT, absent=NO_HUB),
    BadInput("encoder-export-folder-empty", ("extract", "--inputs", "{inputs}", "--encoder", "{tmp}",
                                             "--out", "{tmp}/f"), 2,
             r"no such file or folder: \S+/backbone\.safetensors " + EXPORT, absent=NO_HUB),
    BadInput("encoder-hub-name", ("extract", "--inputs", "{inputs}", "--encoder", "hf-hub:MahmoodLab/UNI",
                                  "--out", "{tmp}/f"), 2,
             r"hf-hub:MahmoodLab/UNI: models are never fetched from the Hugging Face hub here \(nothing is downloaded\)"),
    BadInput("eval-encoder-export-missing", ("eval", "knn", "--encoder", "./no/such/export", "--data-root", "{classes}",
                                             "--out", "{tmp}/e"), 2,
             r"sgcl eval knn: error: no such file or folder: \./no/such/export " + EXPORT, absent=NO_HUB),
]


def _inside(path, folder: Path) -> bool:
    try:
        return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(folder)
    except TypeError:  # a file descriptor
        return False


def refuse_writes_under(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    """Creating a file or folder under ``folder`` fails with ``code`` (EROFS, ENOSPC), as on a
    read-only or full filesystem; reads are untouched."""
    real_open, real_mkdir = os.open, os.mkdir

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _inside(path, folder):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if _inside(path, folder):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def report_no_free_space_under(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    real = shutil.disk_usage

    def fake(path):
        usage = real(path)
        return usage._replace(free=0) if _inside(path, folder) else usage

    monkeypatch.setattr(shutil, "disk_usage", fake)


def never_reach_timm_with_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """timm (and through it the hub) must never be asked for a name that is a path or a hub id."""
    import timm

    real = timm.create_model

    def guarded(name, *args, **kwargs):
        assert "/" not in str(name) and ":" not in str(name), f"timm.create_model reached with {name!r}"
        return real(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", guarded)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Two tiny patch files (an extract / eval / heatmap input that is read before any output is written)."""
    from preprocessing.h5format import write_patch_file

    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for name in ("s1", "s2"):
        write_patch_file(folder / f"{name}.h5", rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8),
                         np.array([[0, 0], [32, 0]]), np.array([[0, 0], [1, 0]]))
    return folder


@pytest.fixture
def faulty(tmp_path, monkeypatch, inputs) -> dict:
    """The placeholders of every row: a read-only folder, a full one, one that fills up, the inputs."""
    ro, full, midfull = tmp_path / "ro", tmp_path / "full", tmp_path / "midfull"
    for folder in (ro, full, midfull):
        folder.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)  # the real refusal (root ignores it)
    else:
        refuse_writes_under(monkeypatch, ro, errno.EROFS)
    refuse_writes_under(monkeypatch, full, errno.ENOSPC)
    report_no_free_space_under(monkeypatch, midfull)
    never_reach_timm_with_a_path(monkeypatch)
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a", "b"):  # two slides: a full disk must not fail them one by one
        (slides / f"{name}.svs").symlink_to(DEMO_SLIDE)
    classes = tmp_path / "classes"
    for name in ("A", "B"):
        (classes / name).mkdir(parents=True)
        (classes / name / "1.png").write_bytes(b"")  # never read: the encoder path fails first
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the repo root: configs/ paths resolve
    yield {"tmp": tmp_path, "ro": ro, "full": full, "midfull": midfull, "inputs": inputs, "slide": DEMO_SLIDE,
           "slide_a": slides / "a.svs", "slide_b": slides / "b.svs", "classes": classes}
    ro.chmod(0o755)


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_filesystem_input(case: BadInput, capfd, faulty):
    run_case(case, capfd, **faulty)
    left = [p for p in faulty["tmp"].rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".lock")]
    assert not left, f"{case.id}: half-written or lock files left behind: {left}"


def test_a_full_disk_stops_the_cohort_at_the_first_slide(capfd, faulty):
    """The slide that hit the full disk is recorded as failed with the path; the next one is never started."""
    import pandas as pd

    case = next(c for c in CASES if c.id == "tile-disk-fills-during-slide")
    run_case(case, capfd, **faulty)
    out = faulty["midfull"] / "tiles"
    manifest = pd.read_csv(out / "manifest.csv")
    assert manifest["slide_id"].tolist() == ["a"]
    assert manifest.loc[0, "status"] == "failed" and "No space left on device" in manifest.loc[0, "error"]
    assert not list((out / "patches").iterdir())  # no partial patch file


def test_os_error_message_names_path_reason_and_fix():
    from sgcl.utils.atomic import UnwritableDirError, os_error_message

    assert os_error_message(OSError(errno.EROFS, "Read-only file system", "/x/out")) == (
        "cannot write /x/out: Read-only file system (errno 30); choose another --out or fix its permissions")
    hdf5 = OSError(errno.ENOSPC, "Can't close file (file write failed: time = ...\n, errno = 28, ...)")
    assert os_error_message(hdf5) == ("cannot write the output: No space left on device (errno 28); "
                                      "free space there or choose another --out")
    assert os_error_message(UnwritableDirError(errno.EACCES, "Permission denied", "/x/out")).startswith(
        "cannot write /x/out: Permission denied (errno 13); choose another --out")
    assert os_error_message(PermissionError(errno.EACCES, "Permission denied", "/x/labels.csv")) == (
        "cannot access /x/labels.csv: Permission denied (errno 13); fix its permissions")  # an input: no "write"


def test_ensure_writable_dir_creates_checks_and_leaves_nothing(tmp_path, monkeypatch):
    from sgcl.utils.atomic import UnwritableDirError, ensure_writable_dir

    assert ensure_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnwritableDirError, match="Not a directory") as exc:
        ensure_writable_dir(tmp_path / "file")
    assert exc.value.filename == str(tmp_path / "file")
    refuse_writes_under(monkeypatch, tmp_path / "a", errno.EROFS)
    with pytest.raises(UnwritableDirError) as exc:
        ensure_writable_dir(tmp_path / "a" / "b")  # exists, but nothing can be created in it
    assert exc.value.errno == errno.EROFS and exc.value.filename == str(tmp_path / "a" / "b")


def test_ensure_free_space_refuses_a_block_that_does_not_fit(tmp_path, monkeypatch):
    from sgcl.utils.atomic import FREE_SPACE_MARGIN, ensure_free_space

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=FREE_SPACE_MARGIN + 1000))
    ensure_free_space(tmp_path, 1000)
    with pytest.raises(OSError, match=r"No space left on device: 1\.0 MB needed, 1\.0 MB free") as exc:
        ensure_free_space(tmp_path, 1001)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(total=0, used=0, free=0))
    ensure_free_space(tmp_path, 10**9)  # a filesystem without statistics: not judged


def test_an_unknown_os_error_is_one_line_that_says_how_to_see_where(capfd, monkeypatch):
    """An OSError that is not a storage fault (e.g. HDF5's "file signature not found") is one line and exit 2,
    with the hint that SGCL_DEBUG=1 shows its traceback; with SGCL_DEBUG set it is raised."""
    import evaluation.heatmap_cli as heatmap_cli

    def fail(argv=None):
        raise OSError("Unable to open file (file signature not found)")

    monkeypatch.setattr(heatmap_cli, "main", fail)
    run_case(BadInput("unknown-os-error", ("heatmap",), 2,
                      r"^sgcl heatmap: Unable to open file \(file signature not found\) \(SGCL_DEBUG=1 shows where"), capfd)
    monkeypatch.setenv("SGCL_DEBUG", "1")
    from sgcl.cli import main

    with pytest.raises(OSError, match="file signature"):
        main(["heatmap"])
