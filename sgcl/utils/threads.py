"""Thread sanity: size torch/BLAS/OpenMP threads and loader workers to the cores this process may use.

On a shared machine the defaults oversubscribe: every torch process starts one intra-op thread per
core it *sees*, every DataLoader worker and tiling child may do the same, and OpenMP threads spin
while they wait for each other. Three such jobs on 2 cores ran 49× slower than one alone (issue 13).

What every ``sgcl`` entry point does (:func:`configure_threads`, knobs in docs/threads.md):

- **cores**: :func:`allowed_cpus` = the CPU affinity (``os.sched_getaffinity``: taskset, SLURM,
  Docker ``--cpuset-cpus``), capped by the cgroup CPU quota (``/sys/fs/cgroup/cpu.max``: Docker
  ``--cpus``, Kubernetes limits) where there is one.
- **threads** of the main process = cores / local ranks (``torchrun``'s ``LOCAL_WORLD_SIZE``) − loader
  workers, at least 1, and no more than the cores other processes leave free (measured on the allowed
  cores at start and every 5 s in the training/embedding loops: :class:`LoadGovernor`).
  ``SGCL_NUM_THREADS=N`` pins it, ``SGCL_NUM_THREADS=off`` leaves torch's defaults alone; an
  ``OMP_NUM_THREADS`` the user exported wins over the automatic value (torchrun's own default of 1
  per rank does not count as the user's).
- **child processes** inherit ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` set to the
  same value (only those the user did not set); DataLoader workers run 1 thread each
  (:func:`worker_init_fn`), tiling children cores / children (:func:`child_threads`).
- **loader workers** default to at most cores − 1 (:func:`resolve_workers`); a larger explicit value is
  honoured with a one-line note.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, MutableMapping

from sgcl.config import ConfigError

ENV_THREADS = "SGCL_NUM_THREADS"
#: BLAS/OpenMP variables handed to child processes
BLAS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: names of the BLAS_ENV variables that an sgcl process (not the user) set, so that children tell them apart
ENV_OURS = "SGCL_THREADS_SET"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
DEFAULT_MAX_WORKERS = 8
_DATALOADER_WARNING = r"This DataLoader will create \d+ worker processes"


class ThreadsError(ConfigError):
    """A thread knob with a value that is not a thread count."""


# -- what this process may use ------------------------------------------------------------------
def cgroup_cpu_limit(cpu_max: Path | None = None) -> float | None:
    """The cgroup CPU quota in cores (``"200000 100000"`` -> 2.0); None when unlimited or absent."""
    cpu_max = CGROUP_CPU_MAX if cpu_max is None else cpu_max
    try:
        if cpu_max.is_file():
            quota, period = cpu_max.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if CGROUP_V1_QUOTA.is_file() and CGROUP_V1_PERIOD.is_file():
            quota_us = int(CGROUP_V1_QUOTA.read_text())
            return None if quota_us <= 0 else quota_us / int(CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None
    return None


def allowed_cpus(cpu_max: Path | None = None) -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup CPU quota (rounded up)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit(cpu_max)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-6)))
    return max(1, n)


def _allowed_set() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _cpu_ticks(cpus: set[int] | None) -> tuple[float, float] | None:
    """(busy, total) seconds of CPU time so far over ``cpus`` (all when None), from ``/proc/stat``."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    busy = total = 0.0
    for line in lines:
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *values = line.split()
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        v = [float(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(v)
        busy += sum(v) - v[3] - v[4]
    return (busy / hz, total / hz) if total else None


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class LoadMeter:
    """Cores kept busy by *other* processes on this process's allowed CPUs since the last reading:
    busy CPU time there (``/proc/stat``, hypervisor steal included) minus this process's own."""

    def __init__(self) -> None:
        self.cpus = _allowed_set()
        self.last = (_cpu_ticks(self.cpus), _own_cpu(), time.monotonic())

    def others(self) -> float | None:
        ticks, own, now = _cpu_ticks(self.cpus), _own_cpu(), time.monotonic()
        (ticks0, own0, now0), self.last = self.last, (ticks, own, now)
        if ticks is None or ticks0 is None or now - now0 <= 0:
            return None
        return max(0.0, (ticks[0] - ticks0[0]) - (own - own0)) / (now - now0)


def others_load(interval_s: float = 0.2) -> float:
    """Cores other processes keep busy now (measured over ``interval_s``); where ``/proc/stat`` is
    missing, the 1-minute load average."""
    meter = LoadMeter()
    time.sleep(interval_s)
    busy = meter.others()
    if busy is not None:
        return busy
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def threads_for_load(share: int, cpus: int, others: float) -> int:
    """Threads that fit beside ``others`` busy cores: the free cores (rounded), between 1 and ``share``.
    Threads beyond the free cores only wait for each other (OpenMP threads spin while they wait)."""
    return max(1, min(share, math.floor(cpus - others + 0.5)))


def local_world_size(env: Mapping[str, str] = os.environ) -> int:
    """Processes of this job on this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 outside torchrun)."""
    try:
        return max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


# -- the plan -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThreadPlan:
    """Threads for this process and where the number came from."""

    threads: int | None       # torch intra-op threads (None: left as torch set them, SGCL_NUM_THREADS=off)
    cpus: int                 # allowed cores of this process
    workers: int              # worker processes it starts (loader workers, tiling children)
    source: str               # requested | SGCL_NUM_THREADS | OMP_NUM_THREADS | auto | busy | off
    share: int = 0            # automatic plans: the threads on an idle machine (cores / ranks - workers)

    def describe(self) -> str:
        if self.threads is None:
            return f"threads: torch defaults ({ENV_THREADS}=off)"
        why = {"busy": f"other processes keep cores busy; {self.share} on an idle machine, re-checked as it runs",
               "auto": "re-checked against the load as it runs"}.get(self.source, f"from {self.source}")
        return f"threads: {self.threads} ({self.cpus} cores allowed, {self.workers} workers; {why})"


def _count(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ThreadsError(f"{name}={value!r} is not a thread count; set a whole number >= 1, 'auto' or 'off'")
    return n


def _users_omp(env: Mapping[str, str], local_world: int) -> int | None:
    """The user's own ``OMP_NUM_THREADS``: not one an sgcl parent set, nor torchrun's default 1 per rank."""
    value = env.get("OMP_NUM_THREADS", "").strip()
    if not value or "OMP_NUM_THREADS" in env.get(ENV_OURS, "").split(","):
        return None
    if local_world > 1 and value == "1" and "TORCHELASTIC_RUN_ID" in env:
        return None
    return _count("OMP_NUM_THREADS", value)


def plan_threads(cpus: int, workers: int = 0, local_world: int = 1, requested: int | None = None,
                 env: Mapping[str, str] = os.environ, load: float = 0.0) -> ThreadPlan:
    """Threads for a process allowed ``cpus`` cores that starts ``workers`` worker processes, one of
    ``local_world`` ranks on the node, while other processes keep ``load`` cores busy. Pure: the
    precedence is ``requested`` (a config key) > ``SGCL_NUM_THREADS`` > the user's ``OMP_NUM_THREADS`` >
    automatic (cores / ranks − workers, at least 1, and no more than the cores the others leave free:
    :func:`threads_for_load`)."""
    knob = env.get(ENV_THREADS, "").strip().lower()
    if knob == "off":
        return ThreadPlan(None, cpus, workers, "off")
    if requested:
        return ThreadPlan(_count("threads", str(requested)), cpus, workers, "requested")
    if knob not in ("", "auto"):
        return ThreadPlan(_count(ENV_THREADS, knob), cpus, workers, ENV_THREADS)
    users = _users_omp(env, local_world)
    if users is not None:
        return ThreadPlan(users, cpus, workers, "OMP_NUM_THREADS")
    share = max(1, cpus // max(1, local_world) - max(0, workers))
    fit = threads_for_load(share, cpus, load)
    return ThreadPlan(fit, cpus, workers, "busy" if fit < share else "auto", share)


def child_env(plan: ThreadPlan, env: MutableMapping[str, str]) -> None:
    """Set the BLAS/OpenMP thread variables the user did not set to ``plan.threads`` (for children),
    and record which ones were ours in ``SGCL_THREADS_SET``."""
    if plan.threads is None:
        return
    ours = [n for n in env.get(ENV_OURS, "").split(",") if n]
    for name in BLAS_ENV:
        if name in env and name not in ours and not (name == "OMP_NUM_THREADS" and plan.source in ("requested", ENV_THREADS)):
            continue
        env[name] = str(plan.threads)
        ours.append(name)
    env[ENV_OURS] = ",".join(dict.fromkeys(ours))


def configure_threads(workers: int = 0, requested: int | None = None, log=None) -> ThreadPlan:
    """Apply :func:`plan_threads` to this process: torch intra-op (and, while still possible, inter-op)
    threads, cv2's pool, and the BLAS/OpenMP environment of the processes it starts. Call it at the
    start of an entry point, once the number of worker processes is known; ``log`` gets one line."""
    local = local_world_size()
    cpus = allowed_cpus()
    knob = os.environ.get(ENV_THREADS, "").strip().lower()
    automatic = not requested and knob in ("", "auto") and _users_omp(os.environ, local) is None
    # under a CPU quota narrower than the affinity (a container on a big host) /proc/stat shows the whole
    # host's CPUs, not this container's share: no load check there
    seen = _allowed_set()
    quota = cgroup_cpu_limit()
    load_visible = quota is None or seen is None or quota >= len(seen)
    plan = plan_threads(cpus, workers, local, requested, os.environ,
                        load=others_load() if automatic and load_visible else 0.0)
    global _GOVERNOR
    _GOVERNOR = LoadGovernor(plan) if plan.source in ("auto", "busy") and load_visible else None
    if plan.threads is not None:
        child_env(plan, os.environ)
        _set_torch_threads(plan.threads)
        _set_cv2_threads(plan.threads)
    if log is not None:
        log(plan.describe())
    return plan


class LoadGovernor:
    """Re-fits an automatic plan's threads to the load every ``every_s`` seconds (other jobs start and
    end while a long one runs): :func:`threads_for_load` of what the others used since the last check."""

    def __init__(self, plan: ThreadPlan, every_s: float = 5.0) -> None:
        self.plan, self.every_s = plan, every_s
        self.threads = plan.threads or 1
        self.meter = LoadMeter()
        self.next_check = time.monotonic() + every_s

    def tick(self) -> int | None:
        """Call often (each training step); returns the new thread count when it changed."""
        if time.monotonic() < self.next_check:
            return None
        self.next_check = time.monotonic() + self.every_s
        others = self.meter.others()
        if others is None:
            return None
        import torch

        if torch.get_num_threads() != self.threads:  # someone else set the threads since: theirs to keep
            self.every_s = float("inf")
            return None
        n = threads_for_load(self.plan.share, self.plan.cpus, others)
        if n == self.threads:
            return None
        self.threads = n
        torch.set_num_threads(n)
        return n


_GOVERNOR: LoadGovernor | None = None


def adapt_threads() -> int | None:
    """Let the automatic plan of :func:`configure_threads` follow the load (no-op without one, e.g. in
    library use, with ``SGCL_NUM_THREADS``/``OMP_NUM_THREADS`` set or a thread count in the config)."""
    return _GOVERNOR.tick() if _GOVERNOR is not None else None


def release_threads() -> None:
    """End of a command: stop following the load (:func:`adapt_threads` becomes a no-op again), so that a
    later run in the same process (tests, notebooks) keeps whatever threads it sets."""
    global _GOVERNOR
    _GOVERNOR = None


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:  # allowed once, before any inter-op work ran; later calls raise
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass


def _set_cv2_threads(n: int) -> None:
    cv2 = sys.modules.get("cv2")
    if cv2 is None:
        try:
            import cv2  # noqa: F811 - every pipeline stage uses it; an absent one is fine
        except ImportError:
            return
    cv2.setNumThreads(n)


# -- worker processes ---------------------------------------------------------------------------
def worker_limit(cpus: int | None = None, local_world: int | None = None) -> int:
    """Most loader workers per process by default: its share of the cores minus one (for itself), >= 0."""
    cpus = allowed_cpus() if cpus is None else cpus
    local_world = local_world_size() if local_world is None else local_world
    return max(0, cpus // max(1, local_world) - 1)


def resolve_workers(requested: int | None, what: str = "workers", limit: int | None = None,
                    default: int = DEFAULT_MAX_WORKERS, log=None) -> int:
    """Worker processes to start. ``None`` (unset) = ``min(default, limit)`` with ``limit`` =
    :func:`worker_limit` (cores per rank − 1: a 2-core machine gets 1, a 1-core machine 0, so no
    DataLoader warning); an explicit value above ``limit`` is honoured with a one-line note to ``log``
    (default stderr), and DataLoader's own multi-line warning about it is silenced."""
    limit = worker_limit() if limit is None else max(0, limit)
    if requested is None:
        return min(default, limit)
    if requested < 0:
        raise ThreadsError(f"{what}={requested} must be >= 0 (leave it unset for min({default}, cores - 1) = {min(default, limit)})")
    if requested > max(1, limit):
        note = (f"note: {what}={requested} worker processes with {allowed_cpus()} allowed cores: honoured as set, though "
                f"more than {max(1, limit)} oversubscribe the cores (docs/threads.md)")
        (log or (lambda m: print(m, file=sys.stderr)))(note)
        warnings.filterwarnings("ignore", message=_DATALOADER_WARNING, category=UserWarning)
    return requested


def worker_init_fn(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's signature
    """DataLoader ``worker_init_fn``: one torch thread and a sequential cv2 in each worker (the workers
    run in parallel already; more threads each only oversubscribe the cores). ``cv2.setNumThreads(0)``,
    not 1: in a forked child of a process whose cv2 pool has run, OpenCV 4's ``setNumThreads(n >= 1)``
    waits forever on the parent's pool lock; 0 (no pool) does not."""
    import torch

    torch.set_num_threads(1)
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.setNumThreads(0)


def child_threads(children: int) -> int:
    """Threads for each of ``children`` parallel child processes (tiling): the allowed cores shared
    out, at least 1; applied by :func:`threads_for_children` (forked) or :func:`apply_child_threads` (spawned)."""
    knob = os.environ.get(ENV_THREADS, "").strip().lower()
    if knob not in ("", "auto", "off"):
        return _count(ENV_THREADS, knob)
    return max(1, allowed_cpus() // max(1, children))


@contextlib.contextmanager
def threads_for_children(n: int) -> Iterator[None]:
    """Inside the block this process runs ``n`` cv2 and torch threads, and so do the children it forks
    there (they inherit the setting; setting cv2's threads *in* a forked child can hang, see
    :func:`worker_init_fn`); the previous values come back afterwards. For a parent that only waits."""
    if os.environ.get(ENV_THREADS, "").strip().lower() == "off":
        yield
        return
    import torch

    cv2 = sys.modules.get("cv2")
    if cv2 is None:
        try:
            import cv2
        except ImportError:
            cv2 = None
    before = (torch.get_num_threads(), cv2.getNumThreads() if cv2 is not None else None)
    torch.set_num_threads(n)
    if cv2 is not None:
        cv2.setNumThreads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        if cv2 is not None:
            cv2.setNumThreads(before[1])


def apply_child_threads(n: int) -> None:
    """In a freshly *spawned* child (not forked: see :func:`threads_for_children`): ``n`` threads for cv2
    and, if loaded, torch."""
    if os.environ.get(ENV_THREADS, "").strip().lower() == "off":
        return
    _set_cv2_threads(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


__all__ = [
    "ENV_THREADS", "BLAS_ENV", "ThreadPlan", "ThreadsError", "allowed_cpus", "cgroup_cpu_limit", "others_load",
    "LoadMeter", "LoadGovernor", "threads_for_load", "adapt_threads", "release_threads",
    "local_world_size", "plan_threads", "child_env", "configure_threads", "worker_limit", "resolve_workers", "worker_init_fn",
    "child_threads", "threads_for_children", "apply_child_threads",
]
