"""Tile a cohort: discovery, sharding, one process per slide, locks, resume, manifest.

``run_cohort(cfg)`` is what ``sgcl tile`` runs. Per slide it
1. takes ``<out>/locks/<slide_id>.lock`` (``O_EXCL``; a slide locked by another live process is
   ``skipped`` as busy, so two processes on one output folder never write the same slide);
2. skips the slide when its patch file (``<out>/patches/<slide_id>.h5`` in the default layout; see
   :mod:`preprocessing.layouts`) exists with the same parameter hash (and the same source size/mtime),
   redoes it when anything changed. The hash is the slide's own: a slide-list CSV may override any
   tile setting per slide (:func:`preprocessing.slide_lists.job_config`);
3. otherwise calls :func:`preprocessing.slide_tiler.tile_slide` in a fresh child process (one reader
   handle per process, memory returned to the OS after every slide, a crash — even a segfault in a
   slide decoder — marks only that slide ``failed``).

Each shard run writes ``<out>/manifest.shard-<i>-of-<n>.csv`` as it goes and, at the end, merges every
shard file present into ``<out>/manifest.csv`` (latest row per slide wins) and renders ``index.html``.

The output folders are checked for writing before any slide starts (:func:`sgcl.utils.atomic.ensure_writable_dir`).
A slide that fails because the output filesystem is full or read-only (``STORAGE_ERRNOS``) stops the run:
no further slide is started, the slides finished so far are recorded, and the ``OSError`` is raised
(``sgcl tile`` prints it as one line naming the path, exit code 2) instead of N identical slide failures.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import pandas as pd

from sgcl.utils.atomic import (STORAGE_ERRNOS, FileLock, LockBusy, atomic_path, ensure_writable_dir,
                               os_error_message, remove_stale_temporaries)
from sgcl.utils.threads import apply_child_threads, child_threads, threads_for_children

from .config import TileConfig
from .layouts import Layout
# CohortError, SlideJob, discover and slide_id_of live in slide_lists and are re-exported here for callers
from .slide_lists import CohortError, SlideJob, discover, job_config, slide_id_of, write_clam_process_list  # noqa: F401

MANIFEST_COLUMNS = [
    "slide_id", "path", "status", "n_patches", "mpp", "mpp_source", "achieved_mpp", "tissue_area_mm2",
    "flat_fraction", "seconds", "warning", "error", "qc_png", "params_hash", "shard", "finished_utc",
]
BUSY_PREFIX = "busy:"
STORAGE_ERROR = "_storage_error"  # row key (not a manifest column): (errno, reason, path) of a full/read-only output filesystem
MANIFEST_FLUSH_SECONDS = 10.0


# -- sharding -------------------------------------------------------------------------------
def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        i_text, n_text = str(spec).split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise CohortError(f"shard {spec!r} must look like i/n, e.g. 0/4 (SLURM: $SLURM_ARRAY_TASK_ID/4)") from None
    if n < 1 or not 0 <= i < n:
        raise CohortError(f"shard {spec!r}: need 0 <= i < n")
    return i, n


def select_shard(jobs: Iterable[SlideJob], index: int, count: int) -> list[SlideJob]:
    """Deterministic interleave by slide id: shards 0..n-1 together cover every slide exactly once."""
    ordered = sorted(jobs, key=lambda j: j.slide_id)
    return ordered[index::count]


# -- one slide ------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _row(job: SlideJob, status: str, **values) -> dict:
    row = {c: None for c in MANIFEST_COLUMNS}
    row.update(slide_id=job.slide_id, path=str(job.path), status=status, finished_utc=_now())
    row.update(values)
    return row


def _existing_result(job: SlideJob, cfg: TileConfig, h5: Path) -> dict | None:
    """Manifest values of a finished patch file made with the current parameters, else ``None``."""
    import h5py

    from .slide_tiler import FLAT_WARNING_PREFIX, flat_warning, slide_params_hash

    try:
        with h5py.File(h5, "r") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError:
        return None
    st = job.path.stat()
    if int(attrs.get("source_size", -1)) != st.st_size or abs(float(attrs.get("source_mtime", 0)) - st.st_mtime) > 1e-3:
        return None  # the slide file changed
    try:
        expected = slide_params_hash(job.path, cfg, job.mpp, slide_id=job.slide_id)
    except Exception:  # noqa: BLE001 - let the tiler report the problem
        return None
    if attrs.get("params_hash") != expected:
        return None
    try:
        warnings = json.loads(attrs.get("warnings", "[]"))
    except ValueError:
        warnings = []
    n_patches, n_flat = int(attrs.get("n_patches", 0)), int(attrs.get("n_flat", -1))
    if n_flat >= 0:  # the flat-patch warning again, with this run's output.flat_warn_fraction
        warnings = [w for w in warnings if not str(w).startswith(FLAT_WARNING_PREFIX)]
        warnings += [w for w in [flat_warning(n_flat, n_patches, cfg.output.flat_warn_fraction)] if w]
    return dict(
        n_patches=n_patches, mpp=float(attrs.get("mpp", "nan")), mpp_source=attrs.get("mpp_source"),
        achieved_mpp=float(attrs.get("achieved_mpp", "nan")), tissue_area_mm2=float(attrs.get("tissue_area_mm2", "nan")),
        flat_fraction=n_flat / n_patches if n_flat >= 0 and n_patches else None,
        params_hash=expected, warning="; ".join(["already done with the same parameters", *warnings]),
    )


def process_slide(job: SlideJob, cfg: TileConfig, out_dir: Path) -> dict:
    """Resume check + ``tile_slide`` for one slide (runs in the child process); returns a manifest row.

    ``cfg`` is the slide's own config (the run's with the slide's CSV overrides, :func:`job_config`);
    every output path comes from its :class:`~preprocessing.layouts.Layout`."""
    from .slide_tiler import SlideError, tile_slide, write_slide_geojson

    t0 = time.perf_counter()
    layout = Layout.for_config(cfg, root=out_dir)
    h5, qc = layout.patch_file(job.slide_id), layout.qc_picture(job.slide_id)
    qc_rel = layout.relative(qc)
    geojson = layout.geojson_path(job.slide_id) if cfg.output.geojson else None
    if h5.exists() and not cfg.overwrite:
        done = _existing_result(job, cfg, h5)
        if done is not None:
            if geojson is not None and not geojson.exists():  # tiled before GeoJSON existed: add only that
                try:
                    write_slide_geojson(job.path, geojson, cfg, slide_id=job.slide_id, mpp_override=job.mpp)
                except Exception as exc:  # noqa: BLE001 - the patch file is fine; say why and go on
                    done["warning"] += f"; tissue GeoJSON not written: {exc}"
            return _row(job, "skipped", seconds=time.perf_counter() - t0,
                        qc_png=qc_rel if qc.exists() else None, **done)
    try:
        result = tile_slide(job.path, h5, cfg, slide_id=job.slide_id, mpp_override=job.mpp,
                            qc_png=qc if cfg.output.qc else None, geojson_path=geojson,
                            stitch=layout.stitch(job.slide_id) if cfg.output.qc else None)
    except SlideError as exc:
        return _row(job, "failed", error=str(exc), seconds=time.perf_counter() - t0)
    except Exception as exc:  # an unexpected bug or library error: still only this slide fails
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            # the output filesystem is full or read-only: every later slide would fail the same way
            where = exc.filename or str(h5)  # h5py's errors carry the errno but no filename
            error = os_error_message(OSError(exc.errno, exc.strerror, where))
            return {**_row(job, "failed", error=error, seconds=time.perf_counter() - t0),
                    STORAGE_ERROR: (exc.errno, exc.strerror, where)}
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return _row(job, "failed", seconds=time.perf_counter() - t0,
                    error=f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})")
    return _row(
        job, "done", n_patches=result.n_patches, mpp=result.mpp, mpp_source=result.mpp_source,
        achieved_mpp=result.achieved_mpp, tissue_area_mm2=result.tissue_area_mm2,
        flat_fraction=result.flat_fraction, seconds=result.seconds,
        warning="; ".join(result.warnings) or None, qc_png=qc_rel if result.qc_png else None,
        params_hash=result.params_hash,
    )


# -- process pool: one fresh child per slide --------------------------------------------------
def _die_with_parent() -> None:
    """Linux: the kernel kills this child when the cohort process dies (e.g. SIGKILL), so an
    interrupted run leaves no orphan still writing into the output folder."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _child(fn: Callable, args: tuple, conn, parent_pid: int, spawned_threads: int | None = None) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    if spawned_threads is not None:  # a forked child inherits them (threads_for_children in run_isolated)
        apply_child_threads(spawned_threads)
    try:
        result = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        result = {"__error__": f"{type(exc).__name__}: {exc}"}
    try:
        conn.send(result)
    finally:
        conn.close()
    os._exit(0)  # skip atexit/finalizers inherited from the parent


def _exit_reason(code: int | None, doing: str = "tiling") -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (likely out of memory)" if name == "SIGKILL" else ""
        return f"worker process was killed by {name}{hint} while {doing} this slide"
    return f"worker process exited with code {code} without a result"


def run_isolated(items: Iterable, fn: Callable, workers: int, on_result: Callable[[object, object], None],
                 on_crash: Callable[[object, str], object], timeout: float | None = None,
                 doing: str = "tiling", threads: int | None = None) -> None:
    """Run ``fn(*args)`` for each ``(key, args)`` in ``items``, at most ``workers`` child processes at a
    time, one fresh process per item. ``items`` is consumed lazily (an item is drawn only when a
    process slot is free). ``on_result(key, result)`` is called in the parent as results arrive; a
    child that dies without a result, or runs longer than ``timeout`` seconds (it is then killed), gets
    ``on_result(key, on_crash(key, reason))``; ``doing`` names the work in that reason. ``sgcl extract``
    reads each slide's input this way too. Each child runs ``threads`` threads (cv2, torch; default: the
    allowed cores shared by ``workers``, :func:`sgcl.utils.threads.child_threads`)."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    threads = child_threads(max(1, workers)) if threads is None else threads
    spawned = threads if ctx.get_start_method() == "spawn" else None
    with threads_for_children(threads):  # the parallel children share the cores (cv2: one thread per core each)
        _run_children(ctx, items, fn, workers, on_result, on_crash, timeout, doing, spawned)


def _run_children(ctx, items: Iterable, fn: Callable, workers: int, on_result: Callable[[object, object], None],
                  on_crash: Callable[[object, str], object], timeout: float | None, doing: str,
                  spawned: int | None) -> None:
    pending = iter(items)
    exhausted = False
    running: dict = {}
    try:
        while not exhausted or running:
            while not exhausted and len(running) < max(1, workers):
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    break
                key, args = item
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(fn, args, send, os.getpid(), spawned), daemon=True)
                proc.start()
                send.close()
                running[recv] = (proc, key, time.monotonic())
            if not running:
                continue
            wait_s = None
            if timeout is not None:
                oldest = min(started for _, _, started in running.values())
                wait_s = max(0.0, oldest + timeout - time.monotonic())
            ready = mp.connection.wait(list(running), timeout=wait_s)
            if timeout is not None:
                now = time.monotonic()
                for conn, (proc, key, started) in list(running.items()):
                    if conn not in ready and now - started >= timeout:
                        proc.kill()
                        proc.join()
                        conn.close()
                        del running[conn]
                        on_result(key, on_crash(key, f"timed out: still running after {timeout:g} s "
                                                     "(slide_timeout_s); the worker was killed"))
            for conn in ready:
                proc, key, _ = running.pop(conn)
                try:
                    result = conn.recv()
                except (EOFError, OSError):
                    result = None
                conn.close()
                proc.join()
                if result is None:
                    result = on_crash(key, _exit_reason(proc.exitcode, doing))
                elif isinstance(result, dict) and "__error__" in result:
                    result = on_crash(key, result["__error__"])
                on_result(key, result)
    finally:
        for conn, (proc, _, _) in running.items():  # interrupted (Ctrl-C): stop the children
            proc.kill()
            proc.join()
            conn.close()


# -- manifests ------------------------------------------------------------------------------
def shard_manifest_path(out_dir: Path, index: int, count: int) -> Path:
    return out_dir / f"manifest.shard-{index}-of-{count}.csv"


def read_manifest(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"slide_id": str, "path": str, "status": str, "warning": str, "error": str})


def latest_per_slide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per slide, the latest (``finished_utc``) wins; a ``busy`` skip (another process had the
    slide) never hides a real result for that slide."""
    table = table.reindex(columns=MANIFEST_COLUMNS)
    busy = table["warning"].astype("string").fillna("").str.startswith(BUSY_PREFIX)
    has_real = table.loc[~busy, "slide_id"].unique()
    table = table[~(busy & table["slide_id"].isin(has_real))]
    table = table.sort_values(["finished_utc"], kind="stable").drop_duplicates("slide_id", keep="last")
    return table.sort_values("slide_id", kind="stable").reset_index(drop=True)


@contextlib.contextmanager
def manifest_lock(out_dir: Path, timeout: float = 120.0) -> Iterator[None]:
    """Serialise manifest updates of processes sharing ``out_dir`` (shards finishing together, or two
    runs of the same shard)."""
    lock = FileLock(out_dir / "locks" / "manifest.lock", stale_after=600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            lock.acquire()
            break
        except LockBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield
    finally:
        lock.release()


def update_manifest(path: Path, rows: Iterable[dict]) -> None:
    """Merge ``rows`` into the manifest CSV at ``path`` (rows already there for other slides stay) and
    write it atomically; call under :func:`manifest_lock`."""
    table = pd.DataFrame(list(rows), columns=MANIFEST_COLUMNS)
    if path.exists():
        try:
            table = pd.concat([read_manifest(path), table], ignore_index=True)
        except (OSError, ValueError, pd.errors.EmptyDataError):
            pass
    write_manifest_csv(latest_per_slide(table), path)


INT_COLUMNS = ("n_patches",)


def write_manifest_csv(table: pd.DataFrame, path: Path) -> None:
    """``table`` to ``path`` atomically, counts as integers (``43``, not the ``43.0`` pandas writes for
    an int column that has an empty cell, e.g. a failed slide's)."""
    table = table.copy()
    for col in INT_COLUMNS:
        if col in table:
            table[col] = pd.to_numeric(table[col], errors="coerce").round().astype("Int64")
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def merge_manifests(out_dir: Path) -> pd.DataFrame:
    """All ``manifest.shard-*.csv`` in ``out_dir`` -> one row per slide (:func:`latest_per_slide`)."""
    frames = []
    for path in sorted(out_dir.glob("manifest.shard-*-of-*.csv")):
        try:
            frames.append(read_manifest(path))
        except (OSError, ValueError, pd.errors.EmptyDataError):
            continue
    if not frames:
        return pd.DataFrame(columns=MANIFEST_COLUMNS)
    return latest_per_slide(pd.concat(frames, ignore_index=True))


def finalize(out_dir: Path, layout: Layout | None = None) -> pd.DataFrame:
    """Merge the shard manifests into ``manifest.csv``, render ``index.html`` and, in the ``clam``
    layout, write CLAM's ``process_list_autogen.csv``."""
    from .report import write_report

    with manifest_lock(out_dir):
        table = merge_manifests(out_dir)
        write_manifest_csv(table, out_dir / "manifest.csv")
        write_report(out_dir, table)
        process_list = layout.process_list() if layout is not None else None
        if process_list is not None:
            write_clam_process_list(process_list, table)
    return table


# -- the cohort run -------------------------------------------------------------------------
def _is_busy(row: dict) -> bool:
    return str(row.get("warning") or "").startswith(BUSY_PREFIX)


@dataclass
class CohortSummary:
    rows: list[dict]
    seconds: float
    pixels: bool = True  # the run read patch pixels (False: --no-pixels, no flat-patch check)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def zero_patch(self) -> int:
        return sum(r["status"] in ("done", "skipped") and (r.get("n_patches") or 0) == 0
                   and not _is_busy(r) for r in self.rows)

    @property
    def busy(self) -> int:
        return sum(_is_busy(r) for r in self.rows)

    @property
    def patches(self) -> int:
        return int(sum((r.get("n_patches") or 0) for r in self.rows if r["status"] == "done"))

    @property
    def flat_patches(self) -> int:
        """Flat (one-colour) patches among those written by this run."""
        return int(sum(round(float(r["flat_fraction"]) * (r.get("n_patches") or 0)) for r in self.rows
                       if r["status"] == "done" and not pd.isna(r.get("flat_fraction"))))

    def flat_warnings(self) -> list[tuple[str, str]]:
        """``(slide_id, warning)`` of the slides whose kept patches are mostly flat."""
        from .slide_tiler import FLAT_WARNING_PREFIX

        found = []
        for r in self.rows:
            for w in str(r.get("warning") or "").split("; "):
                if w.startswith(FLAT_WARNING_PREFIX):
                    found.append((r["slide_id"], w[len(FLAT_WARNING_PREFIX):].strip()))
        return found

    def text(self) -> str:
        done, skipped, failed = self.count("done"), self.count("skipped"), self.count("failed")
        rate = self.patches / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"{len(self.rows)} slides in {self.seconds:.1f} s: {done} done, {skipped} skipped "
            f"({self.busy} busy in another process), {failed} failed, {self.zero_patch} with zero patches",
            f"{self.patches} patches written ({rate:.0f} patches/s), "
            + (f"{self.flat_patches} of them flat (one colour)" if self.pixels
               else "flat-patch check skipped: coordinates only (--no-pixels), no pixel was read"),
        ]
        flat = self.flat_warnings()
        if flat:
            lines.append(f"{len(flat)} slide{'s' if len(flat) != 1 else ''} with mostly flat patches:")
            lines += [f"  FLAT {slide_id}: {text}" for slide_id, text in flat]
        for r in self.rows:
            if r["status"] == "failed":
                lines.append(f"  FAILED {r['slide_id']}: {r['error']}")
        return "\n".join(lines)


def _exit_on_sigterm():
    """SIGTERM (a cluster job's time limit, ``kill``) -> SystemExit, so locks are released, children
    stopped and the shard manifest written before the process ends. Returns the previous handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def run_cohort(cfg: TileConfig, jobs: Sequence[SlideJob] | None = None, progress: bool = True,
               log: Callable[[str], None] = print) -> CohortSummary:
    """Tile every slide of ``cfg.inputs`` (or ``jobs``) in this run's shard; see the module docstring."""
    t0 = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    index, count = parse_shard(cfg.shard)
    if cfg.workers < 0:
        raise CohortError(f"workers must be >= 0, got {cfg.workers}")
    all_jobs = list(jobs) if jobs is not None else discover(cfg.inputs, cfg.recursive, cfg.slide_dir,
                                                            cfg.slide_ext, log)
    mine = select_shard(all_jobs, index, count)
    cfgs = {job.slide_id: job_config(cfg, job) for job in mine}  # each slide's own settings (CSV overrides)
    folders = {out_dir, out_dir / "locks"}
    for slide_cfg in cfgs.values():
        folders.update(Layout.for_config(slide_cfg, root=out_dir).folders())
    for folder in sorted(folders):
        ensure_writable_dir(folder)
        remove_stale_temporaries(folder)
    log(f"sgcl tile: {len(mine)} of {len(all_jobs)} slides in shard {index}/{count} -> {out_dir} "
        f"({cfg.workers} worker{'s' if cfg.workers != 1 else ''})")

    shard_csv = shard_manifest_path(out_dir, index, count)
    rows: dict[str, dict] = {}
    locks: dict[str, FileLock] = {}
    storage_error: list[tuple[int, str, str]] = []  # set by the first slide that hit a full / read-only output filesystem
    last_flush = [time.monotonic()]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc="slides", unit="slide", dynamic_ncols=True)

    def record(job: SlideJob, row: dict) -> None:
        storage = row.pop(STORAGE_ERROR, None)
        if storage is not None and not storage_error:
            storage_error.append(storage)
        row["shard"] = f"{index}/{count}"
        rows[job.slide_id] = row
        lock = locks.pop(job.slide_id, None)
        if lock is not None:
            lock.release()
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{job.slide_id}: {row['status']}", refresh=False)
        if time.monotonic() - last_flush[0] > MANIFEST_FLUSH_SECONDS:
            with manifest_lock(out_dir):
                update_manifest(shard_csv, rows.values())
            last_flush[0] = time.monotonic()

    def todo() -> Iterator[tuple[SlideJob, tuple]]:
        """Slides whose lock this process takes, drawn just before each is started: a second process
        on the same output folder skips only the slides being tiled right now and shares the rest."""
        for job in mine:
            if storage_error:  # the output filesystem is full or read-only: start no further slide
                return
            lock = FileLock(out_dir / "locks" / f"{job.slide_id}.lock")
            try:
                lock.acquire()
            except LockBusy as exc:
                record(job, _row(job, "skipped", warning=f"{BUSY_PREFIX} {exc}"))
                continue
            locks[job.slide_id] = lock
            yield job, (job, cfgs[job.slide_id], out_dir)

    previous_term = _exit_on_sigterm()
    try:
        if cfg.workers == 0:  # in-process: no isolation, easiest to debug
            for job, args in todo():
                record(job, process_slide(*args))
        else:
            run_isolated(todo(), process_slide, cfg.workers, record,
                         lambda job, reason: _row(job, "failed", error=reason), timeout=cfg.slide_timeout_s)
    finally:
        for lock in locks.values():
            lock.release()
        if bar is not None:
            bar.close()
        with manifest_lock(out_dir):
            update_manifest(shard_csv, rows.values())
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    if storage_error:
        with contextlib.suppress(OSError):  # record the slides done so far, if the filesystem still lets us
            finalize(out_dir, Layout.for_config(cfg, root=out_dir))
        raise OSError(*storage_error[0])
    finalize(out_dir, Layout.for_config(cfg, root=out_dir))
    ordered = [rows[j.slide_id] for j in mine if j.slide_id in rows]
    return CohortSummary(ordered, time.perf_counter() - t0, pixels=cfg.output.store_pixels)
