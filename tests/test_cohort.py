"""The cohort runner: discovery, shards, locks, resume, crash isolation, SIGKILL safety, manifests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from _tile_fixtures import write_synthetic_slide
from conftest import REPO, shared_path
from preprocessing.cohort import (
    CohortError, SlideJob, discover, merge_manifests, parse_shard, run_cohort, run_isolated, select_shard,
)
from preprocessing.config import TileConfig
from preprocessing.h5format import PatchFile
from sgcl.utils.atomic import FileLock

N_SLIDES = 5


def make_cfg(inputs, out, **kw) -> TileConfig:
    cfg = TileConfig(inputs=[str(i) for i in inputs], out_dir=str(out))
    cfg.output.codec = "raw"
    cfg.output.qc = kw.pop("qc", False)
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """A folder of small synthetic pyramidal TIFFs (mpp 0.5 in the header), distinct content each."""
    folder = tmp_path_factory.mktemp("slides")
    for i in range(N_SLIDES):
        write_synthetic_slide(folder / f"s{i}.tiff", 1280 + 128 * i, 1536, mpp=0.5, seed=i)
    return folder


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory) -> Path:
    """One uninterrupted, unsharded run over ``slides`` (raw codec, so outputs compare exactly)."""
    out = tmp_path_factory.mktemp("reference")
    summary = run_cohort(make_cfg([slides], out), progress=False, log=lambda s: None)
    assert summary.count("done") == N_SLIDES and summary.patches > 0
    return out


def h5_content(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        data = {name: f[name][:] for name in ("imgs", "coords", "grid", "tissue_fraction")}
        data["params_hash"] = f.attrs["params_hash"]
        data["n_patches"] = int(f.attrs["n_patches"])
    return data


def assert_same_outputs(a: Path, b: Path) -> None:
    names_a = sorted(p.name for p in (a / "patches").iterdir())
    names_b = sorted(p.name for p in (b / "patches").iterdir())
    assert names_a == names_b and all(n.endswith(".h5") for n in names_a)
    for name in names_a:
        ca, cb = h5_content(a / "patches" / name), h5_content(b / "patches" / name)
        assert ca.keys() == cb.keys()
        for key in ca:
            np.testing.assert_array_equal(ca[key], cb[key], err_msg=f"{name}:{key}")


# -- discovery and shards -------------------------------------------------------------------
def test_discover_folders_csv_and_duplicates(slides, tmp_path):
    jobs = discover([slides])
    assert [j.slide_id for j in jobs] == [f"s{i}" for i in range(N_SLIDES)]
    # the same file twice (folder + file) counts once
    assert len(discover([slides, slides / "s0.tiff"])) == N_SLIDES

    nested = tmp_path / "nested" / "deeper"
    nested.mkdir(parents=True)
    shutil.copy(slides / "s1.tiff", nested / "s1.tiff")
    with pytest.raises(CohortError, match="no slide files.*--recursive"):
        discover([tmp_path / "nested"])
    with pytest.raises(CohortError) as info:
        discover([slides, tmp_path / "nested"], recursive=True)
    assert "duplicate slide id 's1'" in str(info.value)
    assert str(slides / "s1.tiff") in str(info.value) and str(nested / "s1.tiff") in str(info.value)

    csv = tmp_path / "cohort.csv"
    pd.DataFrame({"path": ["nested/deeper/s1.tiff", str(slides / "s1.tiff")], "slide_id": ["other", None],
                  "mpp": [0.25, None]}).to_csv(csv, index=False)
    got = discover([csv])
    assert [(j.slide_id, j.mpp) for j in got] == [("other", 0.25), ("s1", None)]
    assert got[0].path == tmp_path / "nested" / "deeper" / "s1.tiff"  # relative to the CSV's folder

    bad = tmp_path / "bad.csv"
    pd.DataFrame({"path": ["missing.svs"]}).to_csv(bad, index=False)
    with pytest.raises(CohortError, match="missing.svs does not exist"):
        discover([bad])
    pd.DataFrame({"file": ["x"]}).to_csv(bad, index=False)
    with pytest.raises(CohortError, match="needs a `path` column"):
        discover([bad])
    with pytest.raises(CohortError, match="does not exist"):
        discover([tmp_path / "nope"])


def test_dicom_folder_is_one_slide(tmp_path):
    src = shared_path("wsi", "openslide-fixtures")
    dicom = tmp_path / "case7"
    dicom.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(src / name, dicom / name)
    jobs = discover([tmp_path], recursive=True)
    assert [(j.slide_id, j.path.name) for j in jobs] == [("case7", "boxes_0.dcm")]


def test_shards_cover_every_slide_once():
    jobs = [SlideJob(f"slide{i:03d}", Path(f"/x/{i}.svs")) for i in (7, 3, 11, 0, 5, 2, 9)]
    for n in (1, 2, 3, 8):
        parts = [select_shard(reversed(jobs), i, n) for i in range(n)]
        ids = [j.slide_id for part in parts for j in part]
        assert sorted(ids) == sorted(j.slide_id for j in jobs) and len(ids) == len(set(ids))
        assert parts == [select_shard(jobs, i, n) for i in range(n)]  # independent of input order
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(CohortError):
            parse_shard(bad)


# -- resume, parameters, locks --------------------------------------------------------------
def test_rerun_skips_done_and_parameter_change_redoes(slides, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "patches").iterdir()}
    summary = run_cohort(make_cfg([slides], out), progress=False, log=lambda s: None)
    assert summary.count("skipped") == N_SLIDES and summary.count("done") == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "patches").iterdir()} == before
    manifest = pd.read_csv(out / "manifest.csv")
    assert set(manifest["status"]) == {"skipped"}
    assert (manifest["n_patches"] > 0).all()  # skipped rows still carry the slide's numbers
    assert manifest["warning"].str.contains("already done with the same parameters").all()

    cfg = make_cfg([slides], out)
    cfg.tissue.min_tissue_fraction = 0.9
    summary = run_cohort(cfg, progress=False, log=lambda s: None)
    assert summary.count("done") == N_SLIDES
    for name in before:
        old = h5_content(reference / "patches" / name)
        new = h5_content(out / "patches" / name)
        assert new["params_hash"] != old["params_hash"]
        assert 0 < new["n_patches"] <= old["n_patches"]
        assert (new["tissue_fraction"] >= 0.9).all()

    # --overwrite redoes even with unchanged parameters
    cfg.overwrite = True
    assert run_cohort(cfg, progress=False, log=lambda s: None).count("done") == N_SLIDES


def test_held_lock_makes_slide_busy(slides, tmp_path):
    out = tmp_path / "out"
    lock = FileLock(out / "locks" / "s2.lock")
    lock.acquire()  # another live process (this one) is tiling s2
    try:
        summary = run_cohort(make_cfg([slides], out), progress=False, log=lambda s: None)
    finally:
        lock.release()
    row = {r["slide_id"]: r for r in summary.rows}["s2"]
    assert row["status"] == "skipped" and row["warning"].startswith("busy:")
    assert summary.count("done") == N_SLIDES - 1 and summary.busy == 1
    assert not (out / "patches" / "s2.h5").exists()
    assert not list((out / "locks").glob("s*.lock"))  # our own locks are released
    # a lock left by a dead process is stale and taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "locks" / "s2.lock").write_text(
        f'{{"host": "{os.uname().nodename}", "pid": {int(dead.stdout)}, "time": {time.time()}}}')
    summary = run_cohort(make_cfg([slides], out), progress=False, log=lambda s: None)
    assert {r["slide_id"]: r["status"] for r in summary.rows}["s2"] == "done"


def test_truncated_slide_fails_others_finish(slides, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        shutil.copy(slides / f"s{i}.tiff", folder / f"s{i}.tiff")
    real = shared_path("wsi", "cmu-1-small-region.svs")
    data = real.read_bytes()
    (folder / "cmu-truncated.svs").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "preprocessing.tile", str(folder), "--out", str(out), "-q",
                           "--workers", "2", "--codec", "raw"], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    manifest = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    assert manifest.loc["cmu-truncated", "status"] == "failed"
    assert "cmu-truncated.svs" in manifest.loc["cmu-truncated", "error"]
    assert "FAILED cmu-truncated" in proc.stdout
    assert (manifest.loc[["s0", "s1"], "status"] == "done").all()
    assert sorted(p.name for p in (out / "patches").iterdir()) == ["s0.h5", "s1.h5"]


def _kill_self(key):
    if key == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if key == "raise":
        raise MemoryError("boom")
    if key == "stall":
        time.sleep(60)
    return {"key": key, "pid": os.getpid()}


def test_worker_crash_marks_only_that_item_failed():
    results = {}
    items = [(k, (k,)) for k in ("a", "crash", "b", "raise", "c")]
    run_isolated(items, _kill_self, 2, results.__setitem__, lambda key, reason: {"failed": reason})
    assert results["crash"] == {"failed": "worker process was killed by SIGKILL (likely out of memory) while tiling this slide"}
    assert results["raise"] == {"failed": "MemoryError: boom"}
    pids = {results[k]["pid"] for k in "abc"}
    assert len(pids) == 3 and os.getpid() not in pids  # one fresh process per item


# -- interruption ---------------------------------------------------------------------------
def _check_visible(patches: Path, seen: set) -> list[Path]:
    """Every ``.h5`` visible under ``patches/`` is complete: it opens and holds all its rows."""
    visible = sorted(patches.glob("*.h5")) if patches.is_dir() else []
    for p in visible:
        if p.name not in seen:
            with PatchFile(p) as pf:
                assert len(pf) == int(pf.attrs["n_patches"]) > 0
            seen.add(p.name)
    return visible


def test_sigkill_midway_then_rerun_equals_uninterrupted(slides, reference, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "preprocessing.tile", str(slides), "--out", str(out), "-q", "--codec", "raw",
           "--no-qc", "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    patches, seen = out / "patches", set()
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            if _check_visible(patches, seen):
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail("the run finished before any .h5 appeared")
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= len(list(patches.glob("*.h5"))) < N_SLIDES, "kill was not midway"
    # the killed run's child dies with it (PDEATHSIG): wait until its lock is stale
    deadline = time.monotonic() + 10
    while any(not FileLock(p)._is_stale() for p in (out / "locks").glob("*.lock")) and time.monotonic() < deadline:
        time.sleep(0.05)

    rerun = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while rerun.poll() is None and time.monotonic() < deadline:  # poll the re-run as well
        _check_visible(patches, seen)
        time.sleep(0.005)
    log = rerun.communicate(timeout=10)[0]
    assert rerun.returncode == 0, log
    assert len(_check_visible(patches, seen)) == N_SLIDES
    assert not [p for p in patches.iterdir() if not p.name.endswith(".h5")]  # no temporaries left
    assert_same_outputs(reference, out)
    manifest = pd.read_csv(out / "manifest.csv")
    assert sorted(manifest["slide_id"]) == [f"s{i}" for i in range(N_SLIDES)]
    assert set(manifest["status"]) <= {"done", "skipped"} and (manifest["status"] == "skipped").sum() >= 1


def test_two_shards_equal_one_run(slides, reference, tmp_path):
    out = tmp_path / "out"
    for i in range(2):
        summary = run_cohort(make_cfg([slides], out, shard=f"{i}/2"), progress=False, log=lambda s: None)
        assert summary.count("done") == len(select_shard(discover([slides]), i, 2))
        assert (out / f"manifest.shard-{i}-of-2.csv").is_file()
    assert_same_outputs(reference, out)
    manifest = pd.read_csv(out / "manifest.csv")
    assert sorted(manifest["slide_id"]) == [f"s{i}" for i in range(N_SLIDES)]  # every slide exactly once
    assert set(manifest["status"]) == {"done"} and set(manifest["shard"]) == {"0/2", "1/2"}


def test_merge_latest_row_wins_and_busy_never_hides_a_result(tmp_path):
    cols = ["slide_id", "path", "status", "n_patches", "warning", "error", "finished_utc"]
    pd.DataFrame([["a", "a.svs", "failed", None, None, "x", "2026-01-01T00:00:00"],
                  ["b", "b.svs", "done", 5, None, None, "2026-01-01T00:00:01"]], columns=cols) \
        .to_csv(tmp_path / "manifest.shard-0-of-2.csv", index=False)
    pd.DataFrame([["a", "a.svs", "done", 7, None, None, "2026-01-01T00:00:05"],
                  ["b", "b.svs", "skipped", None, "busy: held", None, "2026-01-01T00:00:09"],
                  ["c", "c.svs", "skipped", None, "busy: held", None, "2026-01-01T00:00:09"]], columns=cols) \
        .to_csv(tmp_path / "manifest.shard-1-of-2.csv", index=False)
    merged = merge_manifests(tmp_path).set_index("slide_id")
    assert list(merged.index) == ["a", "b", "c"]
    assert merged.loc["a", "status"] == "done" and merged.loc["a", "n_patches"] == 7
    assert merged.loc["b", "status"] == "done" and merged.loc["c", "status"] == "skipped"


def test_sigterm_releases_locks_and_writes_manifest(slides, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "preprocessing.tile", str(slides), "--out", str(out), "-q",
                             "--codec", "raw", "--no-qc"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None and len(list((out / "patches").glob("*.h5"))) < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not list((out / "locks").glob("s*.lock"))  # released, not left for a stale-lock check
    done = sorted(p.stem for p in (out / "patches").glob("*.h5"))
    manifest = pd.read_csv(out / "manifest.shard-0-of-1.csv")
    recorded = set(manifest.loc[manifest["status"] == "done", "slide_id"])
    # one slide at a time: the first slide's result was recorded before the second .h5 could appear
    assert len(done) < N_SLIDES and "s0" in recorded and recorded <= set(done)


def test_changed_slide_file_is_redone_and_moved_folder_resumes(slides, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        shutil.copy2(slides / f"s{i}.tiff", folder / f"s{i}.tiff")
    out = tmp_path / "out"
    assert run_cohort(make_cfg([folder], out), progress=False, log=lambda s: None).count("done") == 2
    st = (folder / "s1.tiff").stat()
    os.utime(folder / "s1.tiff", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # re-exported slide
    moved = tmp_path / "moved"
    folder.rename(moved)  # same files elsewhere: still recognised as done
    summary = run_cohort(make_cfg([moved], out), progress=False, log=lambda s: None)
    assert {r["slide_id"]: r["status"] for r in summary.rows} == {"s0": "skipped", "s1": "done"}


def test_two_processes_on_one_output_folder_share_the_work(slides, reference, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "preprocessing.tile", str(slides), "--out", str(out), "-q", "--codec", "raw", "--no-qc"]
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    done = [int(re.search(r"(\d+) done", o).group(1)) for o, _ in outputs]
    assert sum(done) == N_SLIDES  # every slide tiled by exactly one of the two processes
    assert_same_outputs(reference, out)
    manifest = pd.read_csv(out / "manifest.csv")
    assert sorted(manifest["slide_id"]) == [f"s{i}" for i in range(N_SLIDES)]
    assert set(manifest["status"]) <= {"done", "skipped"}
    assert not manifest["warning"].astype("string").fillna("").str.startswith("busy:").any()  # busy rows never hide results


@pytest.mark.timeout(30)
def test_run_isolated_draws_items_lazily_and_ends():
    drawn, results = [], {}

    def items():
        for k in ("a", "b", "c"):
            drawn.append(k)
            if k != "c":  # the last item is skipped by the producer (as a busy slide is)
                yield k, (k,)

    run_isolated(items(), _kill_self, 1, results.__setitem__, lambda key, reason: reason)
    assert sorted(results) == ["a", "b"] and drawn == ["a", "b", "c"]
    run_isolated(iter(()), _kill_self, 2, results.__setitem__, lambda key, reason: reason)  # nothing to do


@pytest.mark.timeout(30)
def test_stalled_item_is_killed_after_the_timeout():
    results = {}
    t0 = time.monotonic()
    run_isolated([(k, (k,)) for k in ("stall", "a", "b")], _kill_self, 2, results.__setitem__,
                 lambda key, reason: {"failed": reason}, timeout=1.5)
    assert time.monotonic() - t0 < 10
    assert results["stall"]["failed"].startswith("timed out: still running after 1.5 s")
    assert "pid" in results["a"] and "pid" in results["b"]


def test_in_process_mode_gives_the_same_files(slides, reference, tmp_path):
    out = tmp_path / "out"
    summary = run_cohort(make_cfg([slides], out, workers=0), progress=False, log=lambda s: None)
    assert summary.count("done") == N_SLIDES
    assert_same_outputs(reference, out)
