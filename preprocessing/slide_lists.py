"""Which slides to tile, with per-slide settings: files, folders and slide-list CSVs (ours, TRIDENT's, CLAM's).

A CSV names each slide by one column:

- ``path`` (ours): a file path, relative to the CSV's folder;
- ``wsi`` (TRIDENT's ``--custom_list_of_wsis``): a file name or path relative to ``slide_dir``
  (``--slide-dir``/``--wsi-dir``; default: the CSV's folder);
- ``slide_id`` alone (CLAM's dataset CSV and ``process_list_autogen.csv``): a slide file name, or an id
  to which ``slide_ext`` (``--slide-ext .svs``) is appended, in ``slide_dir``.

Other columns: ``slide_id`` (with ``path``/``wsi``: the id naming the outputs), ``mpp`` (level-0 µm/px),
CLAM's ``process`` (rows with 0 are skipped), and any tile config key (``patch.target_mpp``,
``tissue.min_tissue_fraction``, ``assume_mpp``, …) whose non-empty cells override that setting for that
slide, checked like a config file. CLAM's segmentation/visualisation columns (``seg_level``, ``sthresh``,
…) and its ``status``, ``case_id`` and ``label`` are ignored with a note; any other column is an error.

CLAM's ``process_list_autogen.csv`` is also written here (:func:`write_clam_process_list`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from sgcl.config import ConfigError, leaf_keys, parse_override, with_overrides
from sgcl.utils.atomic import atomic_path

from .config import SLIDE_EXTENSIONS, TileConfig

NAME_COLUMNS = ("path", "wsi", "slide_id")
LIST_COLUMNS = frozenset({"path", "wsi", "slide_id", "mpp", "process"})
# CLAM columns (process_list_autogen.csv, presets, dataset and heatmap CSVs) that do not apply to our tiler
CLAM_IGNORED = frozenset({
    "status", "case_id", "label", "seg_level", "sthresh", "mthresh", "close", "use_otsu", "keep_ids", "exclude_ids",
    "a", "a_t", "a_h", "max_n_holes", "vis_level", "line_thickness", "use_padding", "contour_fn", "white_thresh",
    "black_thresh", "x1", "x2", "y1", "y2",
})
# config keys that apply to the whole run, never to one slide
COHORT_WIDE = frozenset({"inputs", "out_dir", "recursive", "workers", "shard", "slide_timeout_s", "slide_dir",
                         "slide_ext", "output.layout"})
CLAM_PROCESS_LIST_COLUMNS = [
    "slide_id", "process", "status", "seg_level", "sthresh", "mthresh", "close", "use_otsu", "keep_ids",
    "exclude_ids", "a_t", "a_h", "max_n_holes", "vis_level", "line_thickness", "use_padding", "contour_fn",
]
PATH_KEYS = frozenset({"roi"})  # per-slide columns holding a path, resolved against the CSV's folder
# CLAM's own defaults (create_patches_fp.py's seg/filter/vis/patch params), written into its columns:
# empty cells are read back as float NaN, into which CLAM's initialize_df cannot write its booleans.
CLAM_PROCESS_LIST_DEFAULTS = {
    "seg_level": -1, "sthresh": 8, "mthresh": 7, "close": 4, "use_otsu": False, "keep_ids": "none",
    "exclude_ids": "none", "a_t": 100, "a_h": 16, "max_n_holes": 8, "vis_level": -1, "line_thickness": 250,
    "use_padding": True, "contour_fn": "four_pt",
}


class CohortError(ValueError):
    """Bad cohort input (missing file, duplicate slide id, bad CSV or shard spec); the message says the fix."""


@dataclass(frozen=True)
class SlideJob:
    slide_id: str
    path: Path
    mpp: float | None = None                        # per-slide level-0 µm/px from the input CSV
    overrides: tuple[tuple[str, Any], ...] = ()     # per-slide (config key, value) from the input CSV
    origin: str = ""                                # "<csv>, row <n>" for a CSV row


def slide_id_of(path: Path) -> str:
    """File name without its slide extension (``a.ome.tiff`` -> ``a``); a DICOM folder's name."""
    name = path.name
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def slide_extension(path: Path) -> str:
    """The slide extension of ``path``'s name (``.ome.tiff``, ``.svs``), as written."""
    return Path(path).name[len(slide_id_of(Path(path))):]


def _is_slide(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(ext) for ext in SLIDE_EXTENSIONS) \
        and not path.name.startswith(".")


def _scan_folder(folder: Path, recursive: bool) -> list[SlideJob]:
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if _is_slide(p))
    jobs, dicom_dirs = [], set()
    for path in files:
        if path.suffix.lower() == ".dcm":
            # The files of one DICOM slide (one per pyramid level) share a folder: one slide per folder,
            # opened through its first file (OpenSlide finds the rest of the series).
            if path.parent in dicom_dirs:
                continue
            dicom_dirs.add(path.parent)
            jobs.append(SlideJob(path.parent.name if path.parent != folder else slide_id_of(path), path))
        else:
            jobs.append(SlideJob(slide_id_of(path), path))
    return jobs


# -- CSV slide lists -------------------------------------------------------------------------
def _clam_slide_file(name: str, base: Path, slide_ext: str | None) -> Path | None:
    """CLAM's ``slide_id`` cell -> the slide file in ``base``: the name as is when it has a slide
    extension (process lists hold file names), else ``name + slide_ext``, else the one ``name.<ext>`` there."""
    if slide_ext:
        return base / (name if name.endswith(slide_ext) else name + slide_ext)
    if any(name.lower().endswith(ext) for ext in SLIDE_EXTENSIONS):
        return base / name
    hits = [base / (name + ext) for ext in SLIDE_EXTENSIONS if (base / (name + ext)).is_file()]
    return hits[0] if len(hits) == 1 else None


def _cell_overrides(csv: Path, row_no: int, row: pd.Series, keys: list[str]) -> tuple[tuple[str, Any], ...]:
    out = []
    for key in keys:
        cell = row[key].strip()
        if not cell:
            continue  # an empty cell keeps the run's setting
        try:
            _, value = parse_override(f"{key}={cell}")
            try:
                with_overrides(TileConfig(), {key: value})
            except ConfigError:
                if not (isinstance(value, float) and value.is_integer()):
                    raise
                # pandas writes an int column with empty cells as 128.0: a whole number is that integer
                value = int(value)
                with_overrides(TileConfig(), {key: value})
        except ConfigError as exc:
            raise CohortError(f"{csv}, row {row_no}, column `{key}`: {exc}") from None
        if key in PATH_KEYS and isinstance(value, str) and not Path(value).expanduser().is_absolute():
            value = str(csv.parent / Path(value))  # like `path`: relative to the CSV's folder
        out.append((key, value))
    return tuple(out)


def read_slide_list(csv: Path, slide_dir: str | Path | None = None, slide_ext: str | None = None,
                    log: Callable[[str], None] | None = None) -> list[SlideJob]:
    """The slides of one CSV (ours, TRIDENT's or CLAM's; see the module docstring)."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several types for unreadable CSVs
        raise CohortError(f"{csv}: cannot read the input CSV ({exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    columns = list(table.columns)
    if "path" in columns and "wsi" in columns:
        raise CohortError(f"{csv}: has both `path` and `wsi` columns; keep one (path: ours, wsi: TRIDENT's)")
    name_col = next((c for c in NAME_COLUMNS if c in columns), None)
    if name_col is None:
        raise CohortError(f"{csv}: the input CSV needs a `path` column (or TRIDENT's `wsi`, or CLAM's `slide_id`); "
                          f"found {columns}")
    config_keys = set(leaf_keys(TileConfig))
    cohort_wide = sorted(c for c in columns if c in COHORT_WIDE)
    if cohort_wide:
        raise CohortError(f"{csv}: column(s) {cohort_wide} set a cohort-wide option, not a per-slide one; "
                          "give it on the command line or in --config")
    unknown = sorted(c for c in columns if c not in LIST_COLUMNS | CLAM_IGNORED | config_keys)
    if unknown:
        raise CohortError(f"{csv}: unknown column(s) {unknown}: neither slide-list columns "
                          f"({', '.join(sorted(LIST_COLUMNS))}) nor tile config keys (e.g. patch.target_mpp, "
                          "tissue.min_tissue_fraction; see docs/config-reference.md)")
    ignored = sorted(c for c in columns if c in CLAM_IGNORED)
    if ignored and log is not None:
        log(f"note: {csv}: CLAM column(s) {', '.join(ignored)} ignored (sgcl's tissue detection and QC use "
            "their own settings; see docs/migrating.md)")
    override_keys = [c for c in columns if c in config_keys]
    base = Path(slide_dir).expanduser() if slide_dir else csv.parent
    jobs, not_processed = [], 0
    for i, row in table.iterrows():
        row_no = i + 2  # the header is row 1
        where = f"{csv}, row {row_no}"
        if "process" in columns and row["process"].strip():
            try:
                process = float(row["process"])
            except ValueError:
                raise CohortError(f"{where}: process {row['process']!r} is not 0 or 1 (CLAM's column)") from None
            if process == 0:
                not_processed += 1
                continue
        name = row[name_col].strip()
        if not name:
            raise CohortError(f"{where}: empty `{name_col}`")
        if name_col == "path":
            path = Path(name).expanduser()
            path = path if path.is_absolute() else csv.parent / path
        elif name_col == "wsi":
            path = Path(name).expanduser()
            path = path if path.is_absolute() else base / path
        else:
            path = _clam_slide_file(name, base, slide_ext)
            if path is None:
                raise CohortError(f"{where}: no single slide file named {name}.<ext> in {base}; pass --slide-ext "
                                  "(e.g. .svs) and --slide-dir with the slides")
        if not path.exists():
            hint = "--slide-dir (the folder with the slides)" if name_col != "path" else "the `path` column"
            raise CohortError(f"{where}: slide {path} does not exist; fix {hint}")
        mpp = None
        if "mpp" in columns and row["mpp"].strip():
            try:
                mpp = float(row["mpp"])
            except ValueError:
                raise CohortError(f"{where}: mpp {row['mpp']!r} is not a number (µm per pixel, e.g. 0.25)") from None
            if not mpp > 0:
                raise CohortError(f"{where}: mpp must be > 0, got {mpp}")
        sid = row["slide_id"].strip() if name_col != "slide_id" and "slide_id" in columns else ""
        jobs.append(SlideJob(sid or slide_id_of(path), path, mpp,
                             _cell_overrides(csv, row_no, row, override_keys), where))
    if not_processed and log is not None:
        log(f"note: {csv}: {not_processed} row(s) with process=0 skipped (CLAM's process column)")
    return jobs


def discover(inputs: Sequence[str | Path], recursive: bool = False, slide_dir: str | Path | None = None,
             slide_ext: str | None = None, log: Callable[[str], None] | None = None) -> list[SlideJob]:
    """Slides from files, folders (scanned by extension) and CSV slide lists (:func:`read_slide_list`).

    The same file given twice counts once (twice with different settings is an error); two different
    files with one slide id are an error naming both.
    """
    if not inputs:
        raise CohortError("no inputs: pass slide files, folders or a CSV with a `path` column")
    jobs: list[SlideJob] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise CohortError(f"input {path} does not exist")
        if path.is_dir():
            found = _scan_folder(path, recursive)
            if not found:
                hint = "" if recursive else " (add --recursive to search subfolders)"
                raise CohortError(f"folder {path} has no slide files ({', '.join(SLIDE_EXTENSIONS)}){hint}")
            jobs += found
        elif path.suffix.lower() == ".csv":
            jobs += read_slide_list(path, slide_dir, slide_ext, log)
        elif _is_slide(path):
            jobs.append(SlideJob(slide_id_of(path), path))
        else:
            raise CohortError(f"input {path} is not a slide ({', '.join(SLIDE_EXTENSIONS)}), a folder or a .csv")
    by_id: dict[str, SlideJob] = {}
    unique: list[SlideJob] = []
    for job in jobs:
        if not job.slide_id or "/" in job.slide_id or job.slide_id.startswith("."):
            raise CohortError(f"{job.origin or job.path}: invalid slide id {job.slide_id!r} (used as a file name)")
        seen = by_id.get(job.slide_id)
        if seen is None:
            by_id[job.slide_id] = job
            unique.append(job)
        elif seen.path.resolve() != job.path.resolve():
            raise CohortError(
                f"duplicate slide id {job.slide_id!r}: {seen.path} and {job.path}. Slide ids name the output files; "
                "give them distinct ids with a CSV input (columns path,slide_id) or rename one file"
            )
        elif (seen.mpp, seen.overrides) != (job.mpp, job.overrides):
            raise CohortError(f"slide {job.slide_id!r} is listed twice with different settings "
                              f"({seen.origin or seen.path} and {job.origin or job.path}); keep one")
    return unique


def job_config(cfg: TileConfig, job: SlideJob) -> TileConfig:
    """``cfg`` with ``job``'s per-slide overrides applied (``cfg`` itself when it has none)."""
    if not job.overrides:
        return cfg
    try:
        return with_overrides(cfg, dict(job.overrides))
    except ConfigError as exc:
        raise CohortError(f"{job.origin or job.slide_id}: {exc}") from None


# -- CLAM's process list (written for the clam layout) ----------------------------------------
_CLAM_STATUS = {"done": "processed", "skipped": "already_exist", "failed": "failed"}


def write_clam_process_list(path: Path, manifest: pd.DataFrame) -> None:
    """Write CLAM's ``process_list_autogen.csv`` from a merged manifest, atomically.

    ``slide_id`` is the slide's file name (``<id><ext>``, as CLAM writes it; ``.split(slide_ext)[0]``
    gives the id), ``process`` 0 for slides tiled or already done and 1 for failed (or busy) ones, so
    that feeding the list back to ``sgcl tile`` retries only those; ``status`` is CLAM's word
    (``processed``, ``already_exist``, ``failed``, ``tbp``). CLAM's segmentation columns hold CLAM's
    own defaults (our tiler does not use them; empty cells would break CLAM's ``initialize_df``).
    """
    rows = []
    for r in manifest.to_dict("records"):
        busy = str(r.get("warning") or "").startswith("busy:")
        status = "tbp" if busy else _CLAM_STATUS.get(str(r.get("status")), "tbp")
        rows.append({"slide_id": f"{r['slide_id']}{slide_extension(Path(str(r['path'])))}",
                     "process": 0 if status in ("processed", "already_exist") else 1, "status": status,
                     **CLAM_PROCESS_LIST_DEFAULTS})
    table = pd.DataFrame(rows, columns=CLAM_PROCESS_LIST_COLUMNS)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def describe_overrides(job: SlideJob) -> str:
    """``key=value`` of a job's per-slide settings (for ``--dry-run``)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in job.overrides)
