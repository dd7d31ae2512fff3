"""One prepared GPU check (issue 12 item 4): throughput, DDP, extraction and kNN in one bounded run.

    bash benchmarks/quality_bundle.sh gpucheck                     # here: bundle the tiled demo slide + faiss wheel
    bash benchmarks/gpu_check.sh                                   # there (lent GPU machine): venv + this driver
    python benchmarks/gpu_check.py --device cuda --out DIR         # the driver alone
    python benchmarks/gpu_check.py --device cpu --quick --out DIR  # CPU smoke mode (tests/test_gpu_check.py)

Steps, each in its own process group with its own timeout (inside one overall ``--budget-s``), each
recorded with status ok | failed | timeout | skipped, its wall time and the tail of its error:

- data:     patch files derived from the tiled demo slide (``.qdata/gpucheck/demo.h5``, else tiled now):
            its tissue patches repeated at offset grid positions into several "slides" (JPEG, like `sgcl tile`)
- loader:   patches/s of the real DataLoader (workers = cores) for SGCL's and MoCo v2's views, no model
- model:    img/s of the training step alone on synthetic on-device batches (benchmarks/train_step.py)
- e2e_moco, e2e_sgcl: img/s of `sgcl pretrain` (configs/pretrain/*_r50.yaml) on the data, real loader;
            with loader and model rates: which one is the limit
- ddp:      `torchrun --nproc-per-node 1 -m sgcl.cli pretrain` (a few steps) and a 1-rank DDP step of the
            real SGCL method under an explicit process group (NCCL on CUDA, gloo on the CPU), since the
            trainer creates no process group at world size 1
- extract:  patches/s of `sgcl extract`'s inference path (embed_dataset, bf16 on CUDA) vs forward only
- knn:      faiss on the GPU if this faiss has GPU support, else "faiss-gpu not available" + faiss-cpu time

``--fail STEP`` makes that step raise, ``--hang STEP`` makes it sleep past its timeout (tests: a failed or
hung step must not stop the others).
Target reported against: SGCL >= 1,500 img/s end to end on one H100/H200, GPU-bound.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TARGET_IMG_S = 1500.0
STEPS = ["data", "loader", "model", "e2e_moco", "e2e_sgcl", "ddp", "extract", "knn"]
NEEDS_DATA = {"loader", "e2e_moco", "e2e_sgcl", "ddp", "extract"}
CAP_S = {"data": 45, "loader": 50, "model": 75, "e2e_moco": 75, "e2e_sgcl": 75, "ddp": 80, "extract": 50, "knn": 40}
MIN_S = 15  # kept back for each later step when the overall budget runs low


def settings(device: str, quick: bool) -> dict:
    cores = os.cpu_count() or 1
    if quick:
        return dict(device=device, quick=True, backbone="test_resnet", size=48, local_size=24, batch=8,
                    precision="fp32", patches=96, files=2, workers=1, loader_batches=4, model_steps=2, model_warmup=1,
                    e2e_steps=6, e2e_from=2, ddp_steps=2, extract_batch=16, knn_bank=2000, knn_dim=32, knn_queries=100,
                    knn_k=20, aug_gpu=False, queue=64, log_every=1)
    return dict(device=device, quick=False, backbone="resnet50", size=224, local_size=96, batch=128,
                precision="bf16", patches=10240, files=8, workers=cores, loader_batches=40, model_steps=30, model_warmup=10,
                e2e_steps=70, e2e_from=20, ddp_steps=10, extract_batch=256, knn_bank=200_000, knn_dim=512,
                knn_queries=2000, knn_k=200, aug_gpu=device.startswith("cuda"), queue=65536, log_every=5)


# ----------------------------------------------------------------------------------------- steps

def step_data(s: dict, work: Path) -> dict:
    import numpy as np

    from preprocessing.h5format import PatchFile, write_patch_file

    src = Path(s["source"]) if s.get("source") else REPO / ".qdata" / "gpucheck" / "demo.h5"
    origin = "bundled"
    if not src.is_file():  # no bundle: tile the demo slide now (needs OpenSlide, absent on the GPU image)
        sys.path.insert(0, str(BENCH))
        from train_step import tile_demo

        src = tile_demo(work, max(224, s["size"]))
        origin = "tiled now"
    pf = PatchFile(src)
    imgs, coords, grid = pf.read_many(range(len(pf))), pf.coords(), pf.grid()
    n_src, per_file = len(imgs), -(-s["patches"] // s["files"])
    span = int(grid[:, 0].max()) + 2
    step = int(coords[:, 0].max() - coords[:, 0].min()) // max(1, span - 2) + 1 if n_src > 1 else 1
    out = work / "patches"
    out.mkdir(parents=True, exist_ok=True)
    for f in range(s["files"]):
        rep = np.arange(per_file) // n_src  # repetition r sits r spans to the right: distinct grid cells
        idx = np.arange(per_file) % n_src
        g = grid[idx].copy()
        g[:, 0] += rep * span
        c = coords[idx].copy()
        c[:, 0] += rep * span * step
        write_patch_file(out / f"derived_{f}.h5", imgs[idx], c, g, codec="jpeg", quality=90)
    return {"source": str(src), "source_origin": origin, "distinct_patches": n_src, "patches": per_file * s["files"],
            "files": s["files"], "patch_px": int(imgs.shape[1]), "dir": str(out)}


def step_loader(s: dict, work: Path) -> dict:
    sys.path.insert(0, str(BENCH))
    from train_step import dataloader_rate

    from sgcl.train.config import AugConfig

    aug = AugConfig(global_size=s["size"], local_size=s["local_size"], gpu=s["aug_gpu"])
    files = sorted((work / "patches").glob("*.h5"))
    res = {"workers": s["workers"], "batch": s["batch"], "aug_gpu": s["aug_gpu"]}
    for name, views, local in [("sgcl", 1, True), ("moco_v2", 2, False)]:
        rates = [dataloader_rate(f, aug, views, local, s["workers"], s["batch"], s["loader_batches"]) for f in files[:1]]
        res[f"{name}_patches_per_s"] = round(rates[0], 1)
    return res


def step_model(s: dict, work: Path) -> dict:
    sys.path.insert(0, str(BENCH))
    import train_step

    out = work / "model.json"
    argv = ["--device", s["device"], "--precision", s["precision"], "--backbone", s["backbone"], "--batch", str(s["batch"]),
            "--size", str(s["size"]), "--local-size", str(s["local_size"]), "--variants", "moco_v2,sgcl", "--no-loader",
            "--steps", str(s["model_steps"]), "--warmup", str(s["model_warmup"]), "--rounds", "2" if not s["quick"] else "1",
            "--bank-rows", str(s["patches"]), "--queue", str(s["queue"]), "--json", str(out)]
    if s["quick"]:
        argv += ["--kmeans-clusters", "8"]
    rc = train_step.main(argv)
    if rc:
        raise RuntimeError(f"train_step.py exited {rc}")
    rows = json.loads(out.read_text())["steps"]
    return {r["variant"] + "_img_per_s": round(r["img_per_s"], 1) for r in rows} | {
        "sgcl_ratio_to_moco_v2": round([r for r in rows if r["variant"] == "sgcl"][0]["ratio_to_moco_v2"], 3)}


def pretrain_overrides(s: dict, run: Path, method: str, steps: int) -> list[str]:
    n = s["patches"]
    ov = [f"data.h5_dir={run.parent.parent / 'patches'}", f"data.batch_size={s['batch']}", f"data.workers={s['workers']}",
          f"aug.global_size={s['size']}", f"aug.local_size={s['local_size']}", f"aug.gpu={str(s['aug_gpu']).lower()}",
          f"model.backbone={s['backbone']}", f"train.max_steps={steps}", "train.epochs=100000", f"train.log_every={s['log_every']}",
          "train.export=false", "train.health_every=0", "train.ckpt_every=100000", "train.progress=false",
          f"train.device={s['device']}", f"train.precision={s['precision']}", f"train.out_dir={run}", "optim.warmup_epochs=0",
          f"method.moco.queue_size={s['queue']}"]
    if method == "sgcl":
        ov += [f"method.sgcl.num_negatives={min(n, 65536)}", f"method.sgcl.nei_k={min(n // 4, 4096)}"]
    if s["quick"]:
        ov += ["data.pin_memory=false", "model.channels_last=false", "method.proj_hidden_dim=64", "method.proj_dim=16",
               "method.sgcl.kmeans_clusters=4", "method.sgcl.kmeans_iters=3"]
    return ov


def pretrain_env(s: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1" if s["quick"] else "4")
    return env


def run_logged(cmd: list[str], log: Path, env: dict) -> None:
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if rc:
        raise RuntimeError(f"exit {rc}: {' '.join(cmd[:6])} ...\n" + log.read_text()[-2000:])


def metrics_rate(run: Path, batch: int, from_step: int) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "elapsed_s" in r]
    a = [r for r in rows if r["step"] >= from_step][0]
    z = rows[-1]
    if z["step"] <= a["step"]:
        raise RuntimeError(f"too few logged steps in {run}/metrics.jsonl: {[r['step'] for r in rows]}")
    return {"img_per_s": round(batch * (z["step"] - a["step"]) / max(1e-9, z["elapsed_s"] - a["elapsed_s"]), 1),
            "steps_timed": [a["step"], z["step"]], "last_loss": z.get("loss")}


def step_e2e(method: str):
    def run(s: dict, work: Path) -> dict:
        run_dir = work / "runs" / f"e2e_{method}"
        cfg = REPO / "configs" / "pretrain" / f"{method}_r50.yaml"
        cmd = [sys.executable, "-m", "sgcl.cli", "pretrain", "--config", str(cfg),
               *pretrain_overrides(s, run_dir, method, s["e2e_steps"])]
        run_logged(cmd, work / f"e2e_{method}.log", pretrain_env(s))
        return {"config": str(cfg.relative_to(REPO)), "batch": s["batch"], "workers": s["workers"]} | metrics_rate(
            run_dir, s["batch"], s["e2e_from"])
    return run


def step_ddp(s: dict, work: Path) -> dict:
    env = pretrain_env(s)
    run_dir = work / "runs" / "ddp_sgcl"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    cmd = torchrun + ["-m", "sgcl.cli", "pretrain", "--config", str(REPO / "configs/pretrain/sgcl_r50.yaml"),
                      *pretrain_overrides(s, run_dir, "sgcl", s["ddp_steps"])]
    t = time.perf_counter()
    run_logged(cmd, work / "ddp_pretrain.log", env)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    res = {"torchrun_pretrain": {"steps": rows[-1]["step"], "last_loss": rows[-1].get("loss"),
                                 "wall_s": round(time.perf_counter() - t, 1),
                                 "note": "world size 1: the trainer runs without a process group"}}
    out = work / "ddp_worker.json"
    cmd = torchrun + [str(BENCH / "_gpu_check_ddp.py"), "--device", s["device"], "--backbone", s["backbone"],
                      "--batch", str(s["batch"]), "--size", str(s["size"]), "--local-size", str(s["local_size"]),
                      "--precision", s["precision"], "--steps", str(s["ddp_steps"]), "--out", str(out)]
    run_logged(cmd, work / "ddp_worker.log", env)
    res["ddp_method_step"] = json.loads(out.read_text())
    return res


def step_extract(s: dict, work: Path) -> dict:
    import torch

    from evaluation.embedding import EmbedStats, embed_batches, embed_dataset, load_encoder
    from evaluation.sources import StoredPatches

    device = torch.device(s["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    path = sorted((work / "patches").glob("*.h5"))[0]
    data = StoredPatches(path)
    enc = load_encoder(s["backbone"], input_size=s["size"])
    amp = torch.bfloat16 if s["precision"] == "bf16" else None
    tf = enc.transform()
    one = tf([data[i] for i in range(min(s["extract_batch"], len(data)))])
    embed_batches(enc.model, [one], device, amp, len(one))  # warm-up (cudnn autotune)
    reps = max(2, len(data) // len(one))
    t = time.perf_counter()
    embed_batches(enc.model, [one] * reps, device, amp, len(one) * reps)
    fwd = len(one) * reps / (time.perf_counter() - t)
    stats = EmbedStats()
    t = time.perf_counter()
    feats = embed_dataset(enc, data, s["extract_batch"], s["workers"], device, s["precision"], stats=stats)
    ext = len(data) / (time.perf_counter() - t)
    if not (feats.shape[0] == len(data) and float(abs(feats).sum()) > 0):
        raise RuntimeError(f"bad features {feats.shape}")
    return {"model": s["backbone"], "precision": s["precision"], "patches": len(data), "batch": s["extract_batch"],
            "workers": s["workers"], "forward_only_patches_per_s": round(fwd, 1), "extract_patches_per_s": round(ext, 1),
            "ratio": round(ext / fwd, 3), "seconds_waiting_for_data": round(stats.seconds_waiting_for_data, 3),
            "note": "extract includes the DataLoader start; forward-only repeats one batch already in memory"}


def step_knn(s: dict, work: Path) -> dict:
    import numpy as np
    import torch

    import faiss
    from evaluation.knn import search_faiss, search_torch

    rng = np.random.default_rng(0)

    def clustered(n):
        c = rng.normal(size=(100, s["knn_dim"])).astype(np.float32)
        x = c[rng.integers(0, 100, n)] + 0.8 * rng.normal(size=(n, s["knn_dim"])).astype(np.float32)
        return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))

    bank, queries, k = clustered(s["knn_bank"]), clustered(s["knn_queries"]), s["knn_k"]
    res = {"bank": s["knn_bank"], "dim": s["knn_dim"], "queries": s["knn_queries"], "k": k,
           "faiss_version": getattr(faiss, "__version__", "?")}
    n_gpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    gpu = hasattr(faiss, "StandardGpuResources") and n_gpu > 0 and s["device"].startswith("cuda")
    res["faiss_gpu"] = "available" if gpu else "faiss-gpu not available"
    t = time.perf_counter()
    ref = search_faiss(bank, queries, k)
    res["faiss_cpu_s"] = round(time.perf_counter() - t, 3)
    if gpu:
        t = time.perf_counter()
        nn = search_faiss(bank.cuda(), queries.cuda(), k)
        res["faiss_gpu_s"] = round(time.perf_counter() - t, 3)
        res["faiss_gpu_overlap_with_cpu"] = float((nn[:, :10] == ref[:, :10]).float().mean())
    dev = torch.device(s["device"])
    b, q = bank.to(dev), queries.to(dev)
    search_torch(b[:1000], q[:10], min(k, 1000))  # warm-up
    t = time.perf_counter()
    nn = search_torch(b, q, k)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    res[f"torch_{dev.type}_s"] = round(time.perf_counter() - t, 3)
    res["torch_overlap_with_faiss_cpu"] = float((nn[:, :10].cpu() == ref[:, :10]).float().mean())
    return res


STEP_FUNCS = {"data": step_data, "loader": step_loader, "model": step_model, "e2e_moco": step_e2e("moco_v2"),
              "e2e_sgcl": step_e2e("sgcl"), "ddp": step_ddp, "extract": step_extract, "knn": step_knn}


def child(name: str, ctx: Path) -> int:
    """Run one step in this process; write {"result": ...} or {"error": ...} beside ctx."""
    s = json.loads(ctx.read_text())
    work = ctx.parent
    sys.path.insert(0, str(REPO))
    out = work / f"step_{name}.json"
    try:
        if name in s.get("fail", []):
            raise RuntimeError(f"injected failure (--fail {name})")
        if name in s.get("hang", []):
            time.sleep(3600)
        res = STEP_FUNCS[name](s, work)
        out.write_text(json.dumps({"result": res}, default=str))
        return 0
    except Exception as exc:  # recorded by the parent
        out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}))
        return 1


# ---------------------------------------------------------------------------------- orchestration

def run_step(name: str, ctx: Path, timeout: float) -> dict:
    work = ctx.parent
    log = work / f"step_{name}.log"
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", name, "--ctx", str(ctx)],
                                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:  # the whole group: DataLoader workers, torchrun and its ranks
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    rec: dict = {"wall_s": round(time.perf_counter() - t, 1), "timeout_s": round(timeout, 1)}
    out = work / f"step_{name}.json"
    got = json.loads(out.read_text()) if out.is_file() else {}
    if rc is None:
        rec |= {"status": "timeout", "error": f"killed after {timeout:.0f} s", "log_tail": log.read_text()[-1500:]}
    elif "result" in got and rc == 0:
        rec |= {"status": "ok", **got["result"]}
    else:
        rec |= {"status": "failed", "error": got.get("error", f"exit {rc}, no result"),
                "log_tail": (got.get("traceback") or log.read_text())[-1500:]}
    return rec


def verdicts(r: dict, s: dict) -> dict:
    out = {}
    loader, model = r.get("loader", {}), r.get("model", {})
    for m in ("moco_v2", "sgcl"):
        e2e = r.get(f"e2e_{'moco' if m == 'moco_v2' else 'sgcl'}", {})
        if e2e.get("status") != "ok":
            out[m] = {"limit": "unknown (end-to-end run did not finish)"}
            continue
        v = {"e2e_img_per_s": e2e["img_per_s"], "loader_patches_per_s": loader.get(f"{m}_patches_per_s"),
             "model_img_per_s": model.get(f"{m}_img_per_s")}
        lo, mo, e = v["loader_patches_per_s"], v["model_img_per_s"], v["e2e_img_per_s"]
        if lo and mo:
            v["limit"] = ("gpu" if e >= 0.85 * mo else "loader" if lo < mo and e >= 0.85 * lo
                          else "neither (overhead in the trainer: both loader and model are faster than end to end)")
        else:
            v["limit"] = "unknown (loader or model rate missing)"
        out[m] = v
    sg = out.get("sgcl", {})
    out["target"] = {"sgcl_img_per_s": TARGET_IMG_S, "gpu_bound_required": True,
                     "met": bool(sg.get("e2e_img_per_s", 0) >= TARGET_IMG_S and sg.get("limit") == "gpu"),
                     "applies": not s["quick"] and s["device"].startswith("cuda")}
    return out


def environment() -> dict:
    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}
    try:
        import torch

        env |= {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    except Exception as exc:  # pragma: no cover
        env["torch"] = f"import failed: {exc}"
    for mod in ("timm", "faiss", "h5py"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception as exc:
            env[mod] = f"import failed: {exc}"
    return env


def summary_md(rep: dict) -> str:
    s, r = rep["settings"], rep["steps"]
    lines = [f"# GPU check {rep['date']}", "",
             f"{rep['environment'].get('gpu') or 'no GPU'}, {rep['environment']['cpus']} CPUs, torch {rep['environment'].get('torch')}; "
             f"{s['backbone']} {s['size']} px, batch {s['batch']}, {s['precision']}, {s['workers']} loader workers"
             + (" (--quick: a smoke run, not a measurement)" if s["quick"] else ""), "",
             "| step | status | wall s | figures |", "|---|---|---|---|"]
    keys = {"loader": ["sgcl_patches_per_s", "moco_v2_patches_per_s"], "model": ["moco_v2_img_per_s", "sgcl_img_per_s"],
            "e2e_moco": ["img_per_s"], "e2e_sgcl": ["img_per_s"], "extract": ["extract_patches_per_s", "forward_only_patches_per_s"],
            "knn": ["faiss_gpu", "faiss_cpu_s", "faiss_gpu_s"], "data": ["patches", "source_origin"],
            "ddp": ["torchrun_pretrain", "ddp_method_step"]}
    for name, rec in r.items():
        figs = ", ".join(f"{k} {rec[k]}" for k in keys.get(name, []) if k in rec)
        if rec["status"] != "ok":
            figs = (rec.get("error") or "").splitlines()[0][:160] if rec.get("error") else ""
        lines.append(f"| {name} | {rec['status']} | {rec.get('wall_s', '')} | {figs} |")
    v = rep["verdict"]
    lines += ["", "Limit (end to end vs loader-only and model-only rates):"]
    for m in ("moco_v2", "sgcl"):
        lines.append(f"- {m}: {v[m]}")
    t = v["target"]
    lines.append(f"- target SGCL >= {t['sgcl_img_per_s']:.0f} img/s, GPU-bound: "
                 + ("met" if t["met"] else "not met") + ("" if t["applies"] else " (does not apply to this run)"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of every code path)")
    p.add_argument("--out", default="docs/benchmarks", help="folder of gpu_check_<date>.json/.md")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--source", default=None, help="tiled patch file to derive the data from (default .qdata/gpucheck/demo.h5)")
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--fail", default="", help="comma-separated steps made to fail (tests)")
    p.add_argument("--hang", default="", help="comma-separated steps made to hang (tests of the timeout)")
    p.add_argument("--cap-s", type=float, default=None, help="every step's own timeout (default: per step, CAP_S)")
    p.add_argument("--budget-s", type=float, default=420.0, help="all steps together")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores; 1 with --quick)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ctx", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a.child, Path(a.ctx))
    import tempfile

    s = settings(a.device, a.quick)
    if a.workers:
        s["workers"] = a.workers
    s["source"], s["fail"], s["hang"] = a.source, [f for f in a.fail.split(",") if f], [f for f in a.hang.split(",") if f]
    work = Path(a.work or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ctx = work / "ctx.json"
    ctx.write_text(json.dumps(s))
    steps = [x for x in a.steps.split(",") if x]
    date = _dt.date.today().isoformat()
    rep = {"date": date, "started": _dt.datetime.now().isoformat(timespec="seconds"), "settings": s,
           "environment": environment(), "target_img_s_sgcl": TARGET_IMG_S, "budget_s": a.budget_s, "steps": {}}
    deadline = time.monotonic() + a.budget_s
    for i, name in enumerate(steps):
        if name in NEEDS_DATA and rep["steps"].get("data", {}).get("status", "ok") != "ok":
            rep["steps"][name] = {"status": "skipped", "error": "needs the data step, which did not succeed"}
        else:
            left = deadline - time.monotonic() - MIN_S * (len(steps) - i - 1)
            cap = a.cap_s or CAP_S[name] * (3 if a.quick else 1)  # --quick: a shared CPU; generous, still bounded
            timeout = min(cap, left)
            if timeout < 5:
                rep["steps"][name] = {"status": "skipped", "error": "overall budget spent"}
            else:
                rep["steps"][name] = run_step(name, ctx, timeout)
        print(f"{name:<9} {rep['steps'][name]['status']:<8} {rep['steps'][name].get('wall_s', '')}", flush=True)
    rep["verdict"] = verdicts(rep["steps"], s)
    rep["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_check_{date}" + ("_quick" if a.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(rep, indent=1, default=str))
    (out / f"{stem}.md").write_text(summary_md(rep))
    print(summary_md(rep))
    print(f"wrote {out / stem}.json/.md (scratch: {work})")
    return 0 if all(r["status"] == "ok" for r in rep["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
