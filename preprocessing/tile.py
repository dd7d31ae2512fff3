"""``sgcl tile`` / ``python -m preprocessing.tile``: slides -> per-slide HDF5 patch files + QC + manifest.

Examples::

    sgcl tile data/demo/CMU-1-Small-Region.svs --out demo_out/tiles
    sgcl tile /data/slides --recursive --out tiles --config configs/tile/20x_256.yaml --workers 8
    sgcl tile cohort.csv --out tiles --assume-mpp 0.25 tissue.pen_filter=false
    sgcl tile /data/slides --out tiles --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
    sgcl tile /data/slides --out tiles --roi qupath_export/   # only inside <slide_id>.geojson annotations
    sgcl tile trident_list.csv --wsi-dir /data/wsis --out job --layout trident          # TRIDENT's CSV and job folder
    sgcl tile process_list_autogen.csv --slide-dir /data/slides --out clam --layout clam  # CLAM's list and save_dir
    sgcl tile /data/slides --out coords --no-pixels --edge pad_black   # coordinates only, padded edge cells
    sgcl tile /data/slides --out tiles --config configs/tile/40x_224.yaml patch.stride=112 --print-config

Inputs are slide files, folders (scanned by extension) and slide-list CSVs: ours (``path[,slide_id][,mpp]``),
TRIDENT's (``wsi[,mpp]``, relative to --wsi-dir) or CLAM's (``slide_id`` [+ ``process``, ...], with
--slide-dir and --slide-ext). A CSV column named as a config key (``patch.target_mpp``, ``assume_mpp``, ...)
sets that option for its slide. Layouts (--layout): default ``patches/<id>.h5``, ``qc/<id>.png``; trident
``<mag>x_<size>px_<overlap>px_overlap/patches/<id>_patches.h5``, ``contours/<id>.jpg``; clam
``patches/<id>.h5``, ``masks/``, ``stitches/``, ``process_list_autogen.csv``. ``manifest.csv`` and
``index.html`` are in --out for every layout. Exit code: 0 when no slide failed, 1 when any slide failed
(the others are still done), 2 for bad arguments or inputs. ``--roi`` takes a GeoJSON file (QuPath:
File > Export objects as GeoJSON) or a folder of ``<slide_id>.geojson`` files (a CSV column ``roi`` sets it
per slide); annotations classified ``exclude`` (``roi_exclude_class``) are cut out.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sgcl.config import ConfigError, config_from_args, print_config

from .config import TileConfig

FLAG_MAP = {
    "inputs": "inputs", "out": "out_dir", "target_mpp": "patch.target_mpp", "patch_size": "patch.patch_size",
    "stride": "patch.stride", "assume_mpp": "assume_mpp", "workers": "workers", "shard": "shard",
    "codec": "output.codec", "reader": "reader", "min_tissue": "tissue.min_tissue_fraction",
    "overwrite": "overwrite", "recursive": "recursive", "qc": "output.qc", "slide_timeout": "slide_timeout_s",
    "roi": "roi", "geojson": "output.geojson",
    "layout": "output.layout", "slide_dir": "slide_dir", "slide_ext": "slide_ext",
    "pixels": "output.store_pixels", "edge": "patch.edge",
}
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sgcl tile", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tile whole-slide images into per-slide HDF5 patch files at a chosen µm/px, with a QC picture "
                    "per slide, a cohort manifest.csv and index.html, in our layout or TRIDENT's or CLAM's.",
        epilog="Examples::" + __doc__.split("Examples::", 1)[1],
    )
    p.add_argument("items", nargs="*", metavar="INPUT|key=value",
                   help="slide files, folders or slide-list CSVs (ours: path[,slide_id][,mpp]; TRIDENT: wsi[,mpp]; "
                        "CLAM: slide_id[,process,...]; plus per-slide config-key columns); then dotted config "
                        "overrides such as tissue.pen_filter=false")
    p.add_argument("--config", "-c", default=None, help="YAML config (e.g. configs/tile/default.yaml)")
    p.add_argument("--out", "-o", default=None, help="output folder (config key out_dir)")
    p.add_argument("--target-mpp", type=float, default=None, help="µm/px of the patches (default 0.5)")
    p.add_argument("--patch-size", type=int, default=None, help="patch side in output pixels (default 224)")
    p.add_argument("--stride", type=int, default=None, help="output pixels between patch origins, >= 1 (default: the patch size; larger leaves gaps)")
    p.add_argument("--assume-mpp", type=float, default=None,
                   help="µm/px for slides whose header has none (a CSV mpp column wins)")
    p.add_argument("--workers", "-j", type=int, default=None,
                   help="slides tiled in parallel, one process each (0 = in this process, for debugging)")
    p.add_argument("--shard", default=None, metavar="I/N", help="process the I-th of N interleaved shards (array jobs)")
    p.add_argument("--layout", choices=["default", "trident", "clam"], default=None,
                   help="output folders and file names: ours (default), TRIDENT's job folder or CLAM's save_dir")
    p.add_argument("--slide-dir", "--wsi-dir", dest="slide_dir", default=None, metavar="DIR",
                   help="folder that CSV slide names are relative to (TRIDENT's wsi, CLAM's slide_id); "
                        "default: the CSV's folder")
    p.add_argument("--slide-ext", default=None, metavar="EXT",
                   help="extension appended to CLAM slide_ids without one, e.g. .svs")
    p.add_argument("--codec", choices=["raw", "lzf", "gzip", "jpeg"], default=None, help="patch storage in the HDF5")
    p.add_argument("--no-pixels", dest="pixels", action="store_false", default=None,
                   help="coordinates only: coords, grid, tissue fraction and attrs, no imgs, no patch pixel read "
                        "(several times faster; no per-patch background check). sgcl extract and sgcl pretrain "
                        "read such files from the slide (output.store_pixels=false)")
    p.add_argument("--edge", choices=["skip", "pad_white", "pad_black"], default=None,
                   help="cells crossing the slide's right/bottom edge: skip them (default), or keep them with the "
                        "outside filled white (255) or black (0, as CLAM/TRIDENT read it) (patch.edge)")
    p.add_argument("--reader", choices=["auto", "openslide", "image", "tiatoolbox"], default=None)
    p.add_argument("--min-tissue", type=float, default=None, help="minimum tissue fraction of a kept patch (default 0.5)")
    p.add_argument("--slide-timeout", type=float, default=None, metavar="SECONDS",
                   help="kill a slide still running after this long and mark it failed (stalled reads)")
    p.add_argument("--roi", default=None, metavar="PATH",
                   help="tile only inside the polygons of a GeoJSON file, or of <slide_id>.geojson in a folder "
                        "(level-0 px, e.g. QuPath's export); features classified 'exclude' are cut out")
    p.add_argument("--recursive", "-r", action="store_true", default=None, help="search folders recursively")
    p.add_argument("--overwrite", action="store_true", default=None, help="redo slides already done with the same parameters")
    p.add_argument("--no-qc", dest="qc", action="store_false", default=None, help="skip the per-slide QC pictures")
    p.add_argument("--no-geojson", dest="geojson", action="store_false", default=None,
                   help="skip the per-slide tissue outlines (geojson/<slide_id>.geojson; TRIDENT: contours_geojson/)")
    p.add_argument("--dry-run", action="store_true", help="list the slides of this shard and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit (nothing is read or written)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def parse_config(argv: list[str] | None) -> tuple[TileConfig, argparse.Namespace]:
    """Command line -> ``TileConfig`` (defaults <- --config <- key=value overrides <- flags)."""
    args = build_parser().parse_intermixed_args(argv)
    inputs, overrides = [], []
    for item in args.items:
        (overrides if _OVERRIDE.match(item) and not Path(item).exists() else inputs).append(item)
    args.overrides = overrides
    args.inputs = inputs or None
    return config_from_args(TileConfig, args, FLAG_MAP), args


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from .cohort import CohortError, parse_shard, run_cohort, select_shard
    from .layouts import Layout
    from .slide_lists import describe_overrides, discover

    try:
        cfg, args = parse_config(argv)
        if args.print_config:
            print_config(cfg)
            return 0
        if not cfg.inputs:
            raise CohortError("no inputs: pass slide files, folders or a CSV (or set `inputs` in the config)")
        if args.dry_run:
            i, n = parse_shard(cfg.shard)
            jobs = discover(cfg.inputs, cfg.recursive, cfg.slide_dir, cfg.slide_ext, _note)
            mine = select_shard(jobs, i, n)
            for job in mine:
                extra = ([f"mpp={job.mpp}"] if job.mpp else []) + ([describe_overrides(job)] if job.overrides else [])
                print("\t".join([job.slide_id, str(job.path), *extra]))
            print(f"{len(mine)} of {len(jobs)} slides in shard {i}/{n}", file=sys.stderr)
            return 0
        from sgcl.utils.threads import allowed_cpus, configure_threads, resolve_workers

        if cfg.workers > 0:  # explicit (default 1); more than the cores gets a note. The parent only waits
            cfg.workers = resolve_workers(cfg.workers, "workers", limit=allowed_cpus())
        configure_threads(workers=0)
        summary = run_cohort(cfg, progress=not args.quiet)
    except (ConfigError, CohortError) as exc:
        print(f"sgcl tile: error: {exc}", file=sys.stderr)
        return 2
    print(summary.text())
    print(f"patches: {Layout.for_config(cfg).patches_dir}   manifest: {Path(cfg.out_dir) / 'manifest.csv'}   "
          f"QC page: {Path(cfg.out_dir) / 'index.html'}")
    return 1 if summary.count("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
