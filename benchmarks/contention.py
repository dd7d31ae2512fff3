"""Thread oversubscription: the tiny pretraining alone and beside two other torch processes.

    python benchmarks/contention.py --out docs/benchmarks/contention.json            # ~5-10 min on 2 cores
    python benchmarks/contention.py --steps 4 --repeats 1 --modes sgcl               # trying it out

1. Tiles the demo slide (``data/demo/CMU-1-Small-Region.svs``, 64-px patches at 1 µm/px: 128 patches,
   as the trainer tests do) into a temp folder.
2. The job: ``sgcl pretrain --config configs/pretrain/tiny_cpu.yaml`` for ``--steps`` steps, in a fresh
   process, timed by its wall clock (start-up included: what a user waits for).
3. For each mode, in the same run: the job alone, then the job beside two competitors started
   ``--warmup-s`` before it and stopped when it ends. Competitors (``--competitors``):
   ``copies`` = two more copies of the same job in the same mode, restarted until the measured one
   ends; ``matmul`` = two torch matmul loops with torch's default threads (jobs that know nothing of
   sgcl's settings).
   Modes: ``baseline`` = ``SGCL_NUM_THREADS=off`` (torch's defaults: one thread per visible core),
   ``sgcl`` = the thread logic of :mod:`sgcl.utils.threads` (``SGCL_NUM_THREADS`` unset), and
   ``one`` = ``SGCL_NUM_THREADS=1`` (what the busy-machine rule picks). ``OMP_NUM_THREADS`` & co. are
   removed from every job's environment so that only the mode decides.
4. Reports per mode the median alone and beside times and the slowdown ratio beside / alone (target
   ≤ 3× with 3 jobs on 2 cores), and ``/proc/loadavg`` before each measurement: the machine may be
   shared, and other people's load inflates both times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = REPO / "configs" / "pretrain" / "tiny_cpu.yaml"
DEMO = REPO / "data" / "demo" / "CMU-1-Small-Region.svs"
MODES = {"baseline": {"SGCL_NUM_THREADS": "off"}, "sgcl": {}, "one": {"SGCL_NUM_THREADS": "1"}}
MATMUL = "import torch\na = torch.randn(384, 384)\nwhile True:\n    b = a @ a\n"
SCRUB = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "SGCL_NUM_THREADS", "SGCL_THREADS_SET",
         "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def tile(workdir: Path) -> Path:
    from preprocessing.config import TileConfig
    from preprocessing.slide_tiler import tile_slide

    out = workdir / "tiles"
    out.mkdir(parents=True, exist_ok=True)
    cfg = TileConfig()
    cfg.patch.target_mpp, cfg.patch.patch_size = 1.0, 64
    tile_slide(DEMO, out / "demo.h5", cfg)
    return out


def env_for(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env.update(MODES[mode])
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def job_cmd(tiles: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "sgcl", "pretrain", "--config", str(TINY), "--h5-dir", str(tiles), "--out", str(out),
            "train.progress=false", f"train.max_steps={steps}", "train.export=false", "train.ckpt_every=100000",
            "train.auto_resume=false"]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def measure(mode: str, tiles: Path, work: Path, steps: int, competitors: str, n_comp: int, warmup_s: float,
            timeout_s: float, tag: str) -> dict:
    """One timed job, alone (``n_comp`` = 0) or beside ``n_comp`` competitors."""
    env = env_for(mode)
    comps: list[tuple[list[str], dict[str, str], Path]] = []
    for i in range(n_comp):
        if competitors == "copies":
            comps.append((job_cmd(tiles, work / f"{tag}_comp{i}", steps), env, work / f"{tag}_comp{i}.log"))
        else:
            comps.append(([sys.executable, "-c", MATMUL], env_for("baseline"), work / f"{tag}_comp{i}.log"))
    running = [start(c, e, lg) for c, e, lg in comps]
    try:
        if running:
            time.sleep(warmup_s)
        load = loadavg()
        t0 = time.perf_counter()
        proc = start(job_cmd(tiles, work / tag, steps), env, work / f"{tag}.log")
        status = "ok"
        while proc.poll() is None:
            if time.perf_counter() - t0 > timeout_s:
                stop(proc)
                status = "timeout"
                break
            for k, p in enumerate(running):  # keep the copies going until the measured job ends
                if p.poll() is not None:
                    running[k] = start(*comps[k])
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        if status == "ok" and proc.returncode != 0:
            status = f"failed (exit {proc.returncode}; see the log)"
    finally:
        for p in running:
            stop(p)
    return {"wall_s": round(wall, 2), "status": status, "loadavg_before": load, "loadavg_after": loadavg()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    p.add_argument("--steps", type=int, default=8, help="training steps of the tiny job")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default="baseline,sgcl", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--competitors", choices=["copies", "matmul"], default="copies")
    p.add_argument("--n-competitors", type=int, default=2)
    p.add_argument("--warmup-s", type=float, default=4.0, help="competitors run this long before the timed job")
    p.add_argument("--timeout-s", type=float, default=600.0, help="a timed job still running after this is stopped")
    p.add_argument("--workdir", default=None, help="keep the tiles, runs and logs here (default: a temp folder)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"contention: unknown mode(s) {bad}; choose from {list(MODES)}", file=sys.stderr)
        return 2

    from sgcl.utils.threads import allowed_cpus

    started = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), loadavg())
    with tempfile.TemporaryDirectory(prefix="sgcl_contention_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tiles = tile(work)
        runs: list[dict] = []
        for r in range(args.repeats):
            for mode in modes:
                for n in (0, args.n_competitors):
                    tag = f"r{r}_{mode}_{'alone' if n == 0 else 'beside'}"
                    row = {"repeat": r, "mode": mode, "setting": "alone" if n == 0 else "beside",
                           **measure(mode, tiles, work, args.steps, args.competitors, n, args.warmup_s, args.timeout_s, tag)}
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    summary = {}
    for mode in modes:
        alone = [x["wall_s"] for x in runs if x["mode"] == mode and x["setting"] == "alone" and x["status"] == "ok"]
        beside = [x["wall_s"] for x in runs if x["mode"] == mode and x["setting"] == "beside" and x["status"] == "ok"]
        ratios = [b / a for a, b in zip(alone, beside)]
        summary[mode] = {"alone_s": statistics.median(alone) if alone else None,
                         "beside_s": statistics.median(beside) if beside else None,
                         "ratio_median": round(statistics.median(ratios), 2) if ratios else None,
                         "ratios": [round(x, 2) for x in ratios]}
    result = {
        "what": f"tiny pretraining ({args.steps} steps of configs/pretrain/tiny_cpu.yaml, wall incl. start-up) alone and "
                f"beside {args.n_competitors} {args.competitors} competitors; ratio = beside / alone (target <= 3)",
        "cpus_allowed": allowed_cpus(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": __import__("torch").__version__,
        "started_utc": started[0], "loadavg_start": started[1], "loadavg_end": loadavg(),
        "loadavg_note": "/proc/loadavg: 1-, 5-, 15-minute load, running/total threads; the benchmark's own jobs "
                        "add their busy threads (up to 2 per job) to the other users' load",
        "summary": summary, "runs": runs,
    }
    if "baseline" in summary and "sgcl" in summary and summary["sgcl"]["alone_s"] and summary["sgcl"]["beside_s"]:
        result["sgcl_speedup_over_baseline"] = {
            k: round(summary["baseline"][f"{k}_s"] / summary["sgcl"][f"{k}_s"], 2)
            for k in ("alone", "beside") if summary["baseline"][f"{k}_s"]}
    print(json.dumps(summary, indent=1))
    if args.out:
        from sgcl.utils.atomic import atomic_write_json

        atomic_write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
