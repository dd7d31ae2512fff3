"""``sgcl extract``: per-slide patch features for MIL (CLAM/TRIDENT layout), resumable and distributed.

Inputs: patch/coords .h5 files, folders of them, or a tiling output folder of any layout (ours, CLAM's
``save_dir``, a TRIDENT job folder: the patches folder inside is found; ``<slide>_patches.h5`` is slide
``<slide>``).

Output (``<out_dir>/``, ``--layout default``, which is CLAM's layout; ``clam`` is the same):
- ``h5_files/<slide>.h5``: ``features`` (N, D) float32 (or float16; attrs ``name``, ``savetodir``,
  ``encoder``), ``coords`` (N, 2) int64 with the input's coords attrs copied, ``grid`` (N, 2) int32; file
  attrs: encoder, pooling, weights_sha256, mpp, patch_size, sgcl_version, timings, params_hash.
- ``pt_files/<slide>.pt``: ``torch.save`` of the (N, D) features tensor only (what CLAM's MIL loader reads).
- ``manifest.csv``: one row per slide (status done / skipped / failed, counts, timings, error).

``--layout trident`` writes TRIDENT's ``features_<encoder>/<slide>.h5`` (the same h5 content) instead of
``h5_files/`` and ``pt_files/``; with ``--out <job>/<mag>x_<size>px_<overlap>px_overlap`` the files are
where TRIDENT's own feature step puts them.

Each slide is written atomically (h5 first, then pt); a slide whose h5 records the same
``params_hash`` and whose pt exists (when the layout has one) is skipped, so an interrupted run resumes. A failing slide is
recorded and the others continue; the exit code is 1 if any failed. With ``num_workers`` >= 1 a slide's
input is read in child processes (its coords in a fresh one, as ``sgcl tile`` isolates slides; its patches
in the DataLoader workers), so a read that stalls for good fails only that slide at ``slide_timeout_s``.
A slide without patches gets an empty feature file ((0, D) features, (0, 2) coords) in every layout.
Two inputs with one slide id are an error (exit 2). Under ``torchrun`` the slides
are dealt out to ranks by patch count (largest first, to the least-loaded rank); each rank writes
its slides and rank 0 merges the per-rank manifests.

Examples::

    sgcl extract --inputs outputs/tiles/patches --encoder outputs/pretrain/export --out outputs/features
    sgcl extract --inputs clam/patches --slide-dir /data/slides --encoder resnet50 precision=bf16
    sgcl extract --inputs outputs/tiles/patches --encoder uni --weights /models/UNI --out outputs/features_uni
    sgcl extract --encoder list      # the named foundation encoders (docs/encoders.md)
    sgcl extract --config configs/eval/extract.yaml --inputs tiles --out feats batch_size=256 --print-config
    sgcl extract --inputs job --layout trident --out job/20x_224px_0px_overlap --encoder resnet50
    torchrun --nproc-per-node 4 -m sgcl.cli extract --config configs/eval/extract.yaml
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

import h5py
import numpy as np
import torch

from sgcl import __version__
from sgcl.cli import examples_epilog
from sgcl.config import ConfigError, add_config_arguments, bounded, config_from_args, print_config
from sgcl.utils.atomic import (STORAGE_ERRNOS, FileLock, LockBusy, atomic_path, ensure_free_space, ensure_writable_dir,
                               remove_stale_temporaries)

OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
MANIFEST_FIELDS = ["slide_id", "status", "n_patches", "feature_dim", "encoder", "weights_sha256", "read_mode",
                   "source", "h5_path", "pt_path", "seconds", "patches_per_second", "rank", "error", "note"]
NO_PATCHES_NOTE = "no patches: empty feature file written (0 rows)"


@dataclass
class ExtractConfig:
    inputs: list[str] = field(default_factory=list)   # patch/coords .h5 files, folders of them, or a CSV/txt list
    out_dir: str = "outputs/features"
    encoder: str = "resnet50"                         # export folder / weights file / registry encoder (uni, ...) / timm model name
    weights: Optional[str] = None                     # a registry encoder's weights: file, folder or HF cache folder (None: default caches)
    model_name: Optional[str] = None                  # timm architecture when the weights file has no backbone.json
    input_size: Optional[int] = bounded(None, ge=1)  # override the input side (default: the registry entry / timm pretrained cfg)
    slide_dirs: list[str] = field(default_factory=list)  # where slides are found for coords-only inputs
    read_from: Literal["auto", "stored", "slide"] = "auto"
    patch_size: Optional[int] = bounded(None, ge=1)  # output patch side for on-the-fly reads (default: recorded)
    batch_size: int = bounded(64, ge=1)
    num_workers: Optional[int] = bounded(None, ge=0)  # loader workers; unset: min(8, allowed cores - 1) (docs/threads.md)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    feature_dtype: Literal["float32", "float16"] = "float32"
    overwrite: bool = False
    progress: bool = True
    layout: Literal["default", "clam", "trident"] = "default"  # h5_files/ + pt_files/ (default = CLAM's) or TRIDENT's features_<encoder>/
    slide_timeout_s: Optional[float] = bounded(10800.0, gt=0)  # a slide still running after this many seconds is stopped and marked failed (None: no limit; num_workers=0 reads in this process, unguarded)


FLAG_MAP = {"inputs": "inputs", "out": "out_dir", "encoder": "encoder", "weights": "weights", "slide_dir": "slide_dirs",
            "batch_size": "batch_size", "num_workers": "num_workers", "device": "device", "precision": "precision",
            "layout": "layout", "slide_timeout": "slide_timeout_s"}


# -- distribution ---------------------------------------------------------------------------------
def assign_by_load(counts: Sequence[int], world_size: int) -> list[list[int]]:
    """Greedy balancing: items sorted by count (largest first, ties by index) each go to the rank with
    the least total so far (ties → lowest rank). Returns the item indices of each rank."""
    loads = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(counts)), key=lambda j: (-int(counts[j]), j)):
        r = min(range(world_size), key=lambda q: (loads[q], q))
        out[r].append(i)
        loads[r] += int(counts[i])
    return out


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (1 process when absent)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# -- one slide ------------------------------------------------------------------------------------
def params_hash(encoder_fp: dict, cfg: ExtractConfig, source_desc: dict, n: int) -> str:
    payload = {"encoder": encoder_fp, "precision": cfg.precision, "feature_dtype": cfg.feature_dtype,
               "source": {k: v for k, v in source_desc.items() if k != "slide_path"}, "n": n}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def is_done(h5_path: Path, pt_path: Path | None, phash: str) -> bool:
    """The slide's h5 records ``phash`` and its pt (None: the layout has none) exists."""
    if not h5_path.is_file() or (pt_path is not None and not pt_path.is_file()):
        return False
    try:
        with h5py.File(h5_path, "r") as f:
            return str(f.attrs.get("params_hash", "")) == phash and "features" in f
    except OSError:
        return False


def grid_from(path: Path, coords: np.ndarray, level0: float | None) -> np.ndarray:
    with h5py.File(path, "r") as f:
        if "grid" in f:
            return f["grid"][:].astype(np.int32)
    if len(coords) == 0 or not level0:
        return np.zeros((len(coords), 2), np.int32)
    return ((coords - coords.min(0)) // float(level0)).astype(np.int32)


def write_features_h5(dest: Path, features: np.ndarray, coords: np.ndarray, grid: np.ndarray,
                      coords_attrs: dict, attrs: dict, features_attrs: dict | None = None) -> None:
    """Write a slide's features h5 atomically, chunked by ~1 MiB row blocks (not CLAM's 1-row chunks)."""
    n, d = features.shape
    rows = max(1, min(max(n, 1), (1 << 20) // max(1, d * features.dtype.itemsize)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(dest.parent, features.nbytes + coords.nbytes + grid.nbytes)  # before HDF5 hits a full disk
    with atomic_path(dest) as tmp:
        with h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", data=features, chunks=(rows, d) if n else None)
            for k, v in (features_attrs or {}).items():
                feats.attrs[k] = v
            c = f.create_dataset("coords", data=coords.astype(np.int64), chunks=(min(max(n, 1), 65536), 2) if n else None)
            for k, v in coords_attrs.items():
                c.attrs[k] = v
            f.create_dataset("grid", data=grid.astype(np.int32))
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)


def patch_mpp(attrs: dict, desc: dict) -> float | None:
    """µm/px of the patches as the encoder saw them: the tiler's achieved/target µm/px, else the
    slide's level-0 µm/px scaled by level-0 size / patch size; None when unknown (CLAM files)."""
    for key in ("achieved_mpp", "target_mpp"):
        if attrs.get(key) not in (None, ""):
            return float(attrs[key])
    if attrs.get("mpp") not in (None, "") and desc.get("patch_size_level0") and desc.get("patch_size"):
        return float(attrs["mpp"]) * float(desc["patch_size_level0"]) / float(desc["patch_size"])
    return float(attrs["mpp"]) if attrs.get("mpp") not in (None, "") else None


@dataclass
class SlideInput:
    """Everything read from one input file before its patches (picklable: built in a child process)."""
    slide_id: str
    attrs: dict
    coords_attrs: dict
    source: object             # evaluation.sources StoredPatches / SlidePatches (handles reopen lazily)
    desc: dict
    coords: np.ndarray         # (N, 2) int64
    grid: np.ndarray           # (N, 2) int32


def read_slide_input(path: Path, cfg: ExtractConfig) -> SlideInput:
    """Open one input and read its metadata, coords and grid (not its patches)."""
    from evaluation.sources import SourceError, count_patches, h5_attrs, open_source, slide_id_of

    attrs, cattrs = h5_attrs(path)
    try:
        source = open_source(path, cfg.slide_dirs, cfg.read_from, cfg.patch_size)
        desc = source.describe()
    except SourceError:
        if count_patches(path):
            raise
        source, desc = None, {"read_mode": "none"}  # no patches: the slide is not needed (nor found)
    with h5py.File(path, "r") as f:
        coords = f["coords"][:].astype(np.int64).reshape(-1, 2)
    level0 = desc.get("patch_size_level0") or cattrs.get("patch_size_level0") or attrs.get("patch_size_level0")
    close = getattr(getattr(source, "file", None), "close", None) or getattr(source, "close", None)
    if close is not None:  # handles are per process: the reader processes open their own
        close()
    return SlideInput(slide_id_of(path, attrs), attrs, cattrs, source, desc, coords, grid_from(path, coords, level0))


class SlideFailure(RuntimeError):
    """One slide failed; the message is the manifest's ``error`` as it is."""


class SlideTimeout(SlideFailure):
    """A slide ran past ``slide_timeout_s``."""


def timeout_message(seconds: float, what: str) -> str:
    return f"timed out: still running after {seconds:g} s (slide_timeout_s); {what}"


def read_isolated(path: Path, cfg: ExtractConfig) -> SlideInput:
    """:func:`read_slide_input` in a fresh child process killed after ``cfg.slide_timeout_s`` (the
    tiler's :func:`preprocessing.cohort.run_isolated`), so a stalled or crashing read fails only this
    slide; in this process when ``num_workers`` is 0 (no isolation, easiest to debug, as ``sgcl tile --workers 0``)."""
    if cfg.num_workers == 0:
        return read_slide_input(path, cfg)
    from preprocessing.cohort import run_isolated

    out: dict = {}
    run_isolated([(path, (path, cfg))], read_slide_input, 1, lambda _, r: out.update(result=r),
                 lambda _, reason: SlideFailure(reason), timeout=cfg.slide_timeout_s, doing="reading")
    if isinstance(out.get("result"), Exception):
        raise out["result"]
    return out["result"]


def guarded_batches(loader, deadline: float | None, limit: float | None):
    """The loader's batches, stopped with :class:`SlideTimeout` at ``deadline`` (``time.monotonic()``):
    each wait for a batch from the reader processes is bounded by the time left, and on time-out the
    readers (stuck in a read, e.g. a corrupt HDF5 chunk) are killed."""
    it = iter(loader)
    timed_out = False
    try:
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    raise SlideTimeout(timeout_message(limit, "its patch reads were stopped"))
                if hasattr(it, "_timeout"):  # multi-process iterator: bound this wait by the time left
                    it._timeout = max(0.05, left)
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as exc:
                if deadline is not None and "timed out" in str(exc):
                    timed_out = True
                    raise SlideTimeout(timeout_message(limit, "its patch reads were stopped")) from None
                raise
            yield batch
    finally:
        if timed_out:
            stop_readers(it)
        del it


def stop_readers(it) -> None:
    """Kill a DataLoader iterator's worker processes (a reader stuck in C code, e.g. an h5py read, never
    takes the polite shutdown), first taking them off torch's SIGCHLD watch so that their end is not
    reported as a worker crash (a traceback on stderr)."""
    if getattr(it, "_worker_pids_set", False):
        from torch.utils.data import _utils

        _utils.signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
    for w in getattr(it, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join()


def one_line_error(exc: BaseException) -> str:
    """``Type: message`` on one line; an error re-raised from a DataLoader worker keeps only its last
    line (the worker's own ``Type: message``), not the worker's traceback."""
    text = str(exc).strip()
    if isinstance(exc, SlideFailure):
        return text
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        return last if ":" in last else f"{type(exc).__name__}: {last}"
    return f"{type(exc).__name__}: {' '.join(text.split())}"


def extract_slide(path: Path, encoder, cfg: ExtractConfig, out_dir: Path, device: torch.device) -> dict:
    """Export one slide within ``cfg.slide_timeout_s``; returns its manifest row. A slide without
    patches gets an empty feature file (0 × D features, 0 × 2 coords) in every layout."""
    from evaluation.embedding import EmbedStats, autocast_dtype, embed_batches, make_loader
    from preprocessing.layouts import FeatureLayout
    from sgcl.models.encoders import trident_folder_name

    from preprocessing.cohort import run_isolated  # noqa: F401 - imported (pandas) before the clock starts

    t0 = time.perf_counter()
    limit = cfg.slide_timeout_s if cfg.num_workers > 0 and cfg.slide_timeout_s else None
    deadline = time.monotonic() + limit if limit else None
    slide = read_isolated(path, cfg)
    sid, attrs, desc, source = slide.slide_id, slide.attrs, slide.desc, slide.source
    layout = FeatureLayout(cfg.layout, out_dir, trident_folder_name(encoder.name))
    h5_path, pt_path = layout.h5(sid), layout.pt(sid)
    n = len(slide.coords)
    phash = params_hash(encoder.fingerprint(), cfg, desc, n)
    row = {"slide_id": sid, "n_patches": n, "feature_dim": encoder.num_features, "encoder": encoder.name,
           "weights_sha256": encoder.info.get("sha256") or "", "read_mode": desc["read_mode"], "source": str(path),
           "h5_path": str(h5_path), "pt_path": str(pt_path) if pt_path is not None else "",
           "note": NO_PATCHES_NOTE if n == 0 else ""}
    if not cfg.overwrite and is_done(h5_path, pt_path, phash):
        return {**row, "status": "skipped", "seconds": 0.0}
    stats = EmbedStats()
    if n == 0:
        feats = np.zeros((0, encoder.num_features), np.float32)
    else:
        loader = make_loader(source, encoder.transform(), cfg.batch_size, cfg.num_workers,
                             pin_memory=device.type == "cuda", timeout=limit or 0)
        feats = embed_batches(encoder.model, guarded_batches(loader, deadline, limit), device,
                              autocast_dtype(cfg.precision, device), n, progress=sid if cfg.progress else None,
                              stats=stats)
    feats = feats.astype(np.float16 if cfg.feature_dtype == "float16" else np.float32)
    mpp = patch_mpp(attrs, desc)
    out_attrs = {
        "slide_id": sid, "encoder": encoder.name, "pooling": str(encoder.info.get("pooling") or ""),
        "weights_sha256": encoder.info.get("sha256") or "",
        "feature_dim": int(feats.shape[1]), "input_size": encoder.input_size, "mpp": float(mpp) if mpp not in (None, "") else -1.0,
        "patch_size": int(desc.get("patch_size") or 0), "read_mode": desc["read_mode"], "source": str(path),
        "sgcl_version": __version__, "precision": cfg.precision, "params_hash": phash,
        "timings": {**stats.as_dict(), "seconds_slide": round(time.perf_counter() - t0, 3)},
        "format": "sgcl-features", "format_version": 1,
    }
    # `features` attrs as TRIDENT writes them (its readers ignore the rest)
    write_features_h5(h5_path, feats, slide.coords, slide.grid, slide.coords_attrs, out_attrs,
                      {"name": sid, "savetodir": str(h5_path.parent), "encoder": encoder.name})
    if pt_path is not None:
        with atomic_path(pt_path) as tmp:
            torch.save(torch.from_numpy(feats), tmp)
    secs = time.perf_counter() - t0
    return {**row, "status": "done", "seconds": round(secs, 3), "patches_per_second": round(n / secs, 2) if secs else 0}


# -- manifest -------------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def write_manifest(path: Path, rows: dict[str, dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
            w.writeheader()
            for sid in sorted(rows):
                w.writerow(rows[sid])


def merge_manifests(out_dir: Path, world_size: int) -> list[dict]:
    """Fold ``manifest.rank<r>.csv`` of this run into ``manifest.csv`` (rows of earlier runs kept);
    returns this run's rows of all ranks."""
    rows = read_manifest(out_dir / "manifest.csv")
    this_run = []
    for r in range(world_size):
        part = out_dir / f"manifest.rank{r}.csv"
        for sid, row in read_manifest(part).items():
            this_run.append(row)
            if row["status"] == "skipped" and sid in rows and rows[sid].get("status") == "done":
                continue  # keep the timings of the run that computed it
            rows[sid] = row
        part.unlink(missing_ok=True)
    write_manifest(out_dir / "manifest.csv", rows)
    return this_run


# -- driver ---------------------------------------------------------------------------------------
def scan_inputs(inputs: Sequence[Path]) -> tuple[list[Path], list[str], list[int]]:
    """(inputs, slide id, patch count) of every input, a file listed twice kept once. Two files with one
    slide id (it names the outputs) are an error, as in ``sgcl tile``; an unreadable file keeps its
    file-name id and count 0 (it fails, recorded, when it is extracted)."""
    from evaluation.sources import SourceError, count_patches, h5_attrs, slide_id_of
    from preprocessing.layouts import slide_id_from_file_name

    seen: dict[str, Path] = {}
    paths, ids, counts = [], [], []
    for path in inputs:
        try:
            attrs, _ = h5_attrs(path)
            sid, n = slide_id_of(path, attrs), count_patches(path)
        except (OSError, SourceError):
            sid, n = slide_id_from_file_name(path), 0
        first = seen.setdefault(sid, path)
        if first is not path:
            if first.resolve() == path.resolve():
                continue
            raise SourceError(f"duplicate slide id {sid!r}: {first} and {path}. Slide ids name the output files; "
                              "rename one file (or its slide_id attr) or pass only one of them")
        paths.append(path)
        ids.append(sid)
        counts.append(n)
    return paths, ids, counts


def run_extract(cfg: ExtractConfig) -> dict:
    """Export every input slide of this rank; returns ``{"rows": [...], "failed": int}``."""
    from tqdm import tqdm

    from evaluation.embedding import load_encoder, resolve_device
    from evaluation.sources import discover_inputs
    from preprocessing.layouts import FeatureLayout
    from sgcl.models.encoders import trident_folder_name

    if cfg.num_workers is None:  # unset, from a library caller: what the command line resolves it to
        from sgcl.utils.threads import resolve_workers

        cfg = replace(cfg, num_workers=resolve_workers(None))
    rank, world, local_rank = dist_env()
    out_dir = ensure_writable_dir(cfg.out_dir)  # a read-only or full output folder: one error now, not one per slide
    inputs, ids, counts = scan_inputs(discover_inputs(cfg.inputs))
    mine = [(inputs[i], ids[i]) for i in assign_by_load(counts, world)[rank]]
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    encoder = load_encoder(cfg.encoder, cfg.model_name, cfg.input_size, cfg.weights)
    encoder.model.to(device)
    layout = FeatureLayout(cfg.layout, out_dir, trident_folder_name(encoder.name))
    for folder in layout.folders():
        ensure_writable_dir(folder)
        remove_stale_temporaries(folder)
    rows = []
    for path, sid in tqdm(mine, desc=f"slides (rank {rank}/{world})", unit="slide", disable=not cfg.progress):
        lock = FileLock(layout.features_dir / f".{sid}.lock")
        try:
            lock.acquire()
        except LockBusy as exc:
            rows.append({"slide_id": sid, "status": "busy", "source": str(path), "rank": rank, "error": str(exc)})
            continue
        try:
            row = extract_slide(path, encoder, cfg, out_dir, device)
        except Exception as exc:  # one bad slide never stops the cohort, a full or read-only output filesystem does
            if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:  # every later slide would fail the same way
                _write_partial_manifest(out_dir / f"manifest.rank{rank}.csv", rows)
                raise OSError(exc.errno, exc.strerror, exc.filename or str(out_dir)) from exc
            msg = one_line_error(exc)
            print(f"sgcl extract: {path}: FAILED: {msg}", file=sys.stderr)
            if os.environ.get("SGCL_DEBUG"):
                traceback.print_exc()
            row = {"slide_id": sid, "status": "failed", "source": str(path), "error": msg}
        finally:
            lock.release()
        row["rank"] = rank
        rows.append(row)
    write_manifest(out_dir / f"manifest.rank{rank}.csv", {r["slide_id"]: r for r in rows})
    if world > 1:
        _barrier(device)
    failed = sum(1 for r in rows if r["status"] == "failed")
    if rank == 0:
        failed = sum(1 for r in merge_manifests(out_dir, world) if r.get("status") == "failed")
    return {"rows": rows, "failed": failed, "rank": rank, "world_size": world}


def _write_partial_manifest(path: Path, rows: list[dict]) -> None:
    """Record the slides finished before the output filesystem failed, if it still lets us."""
    try:
        write_manifest(path, {r["slide_id"]: r for r in rows})
    except OSError:
        pass


def _barrier(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dist.barrier()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgcl extract", description=__doc__.split("\n\n")[0],
                                epilog=examples_epilog(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", help="patch/coords .h5 files, folders of them, or a tiling output folder "
                                              "of any layout (ours, CLAM's, a TRIDENT job folder) (inputs=)")
    p.add_argument("--out", help="output folder (out_dir=)")
    p.add_argument("--encoder", help="export folder, weights file, foundation encoder name (uni, conch_v1, virchow2, ...; "
                   "`--encoder list` prints them) or timm model name (encoder=)")
    p.add_argument("--weights", help="weights of a named encoder: a .bin/.pth/.pt/.safetensors file, a folder or a "
                   "Hugging Face cache folder (weights=; default: search the local HF/torch caches; never downloads)")
    p.add_argument("--layout", choices=["default", "clam", "trident"],
                   help="features layout: h5_files/ + pt_files/ (default, = CLAM's) or TRIDENT's features_<encoder>/")
    p.add_argument("--slide-dir", dest="slide_dir", nargs="+", help="folders with the slides, for coords-only inputs")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--num-workers", dest="num_workers", type=int, help="loader workers (default min(8, cores - 1))")
    p.add_argument("--device")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--slide-timeout", dest="slide_timeout", type=float, metavar="SECONDS",
                   help="stop a slide still running after this long and mark it failed (slide_timeout_s=; "
                        "default 10800; reads run in child processes, so a stalled read cannot hang the run)")
    add_config_arguments(p, example="feature_dtype=float16")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse with ``key=value`` overrides allowed anywhere (also after multi-value options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [t for t in argv if OVERRIDE_RE.match(t)]
    args = parser.parse_args([t for t in argv if not OVERRIDE_RE.match(t)])
    args.overrides = overrides + list(args.overrides)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if args.encoder == "list" and not args.print_config:
        from sgcl.models.encoders import format_table

        print(format_table())
        return 0
    try:
        cfg = config_from_args(ExtractConfig, args, FLAG_MAP)
        if args.print_config:
            print_config(cfg)
            return 0
        if not cfg.inputs:
            raise ConfigError("no inputs: pass --inputs <patch .h5 files or folders> (or inputs=[...] in the config)")
        from sgcl.utils.threads import configure_threads, release_threads, resolve_workers

        cfg.num_workers = resolve_workers(cfg.num_workers, "num_workers")
        configure_threads(workers=cfg.num_workers)
        try:
            result = run_extract(cfg)
        finally:
            release_threads()
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"sgcl extract: error: {exc}", file=sys.stderr)
        return 2
    rows = result["rows"]
    summary = {s: sum(1 for r in rows if r["status"] == s) for s in ("done", "skipped", "failed", "busy")}
    print(f"sgcl extract (rank {result['rank']}): {summary} -> {cfg.out_dir}/manifest.csv")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
