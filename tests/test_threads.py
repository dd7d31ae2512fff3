"""Thread sanity (sgcl/utils/threads.py): allowed cores, the thread plan, the user's environment, loader
worker caps without DataLoader's warning, one thread per loader worker and tiling child."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from sgcl.utils import threads as th
from sgcl.utils.threads import ThreadsError, plan_threads

from _bad_input import BadInput, run_case
from conftest import REPO

THREAD_ENV = (*th.BLAS_ENV, th.ENV_THREADS, th.ENV_OURS, "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def clean_env(monkeypatch):
    """No thread variables in the environment; whatever the code under test sets is undone afterwards."""
    for name in THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def _cores(monkeypatch, n: int, tmp_path=None) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))
    monkeypatch.setattr(th, "CGROUP_CPU_MAX", (tmp_path or REPO) / "no-cpu.max")
    monkeypatch.setattr(th, "CGROUP_V1_QUOTA", (tmp_path or REPO) / "no-quota")


def test_allowed_cpus_follows_the_affinity_and_the_cgroup_quota(monkeypatch, tmp_path):
    _cores(monkeypatch, 3, tmp_path)
    assert th.allowed_cpus(tmp_path / "absent") == 3
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # docker --cpus 1.5: 2 threads can run at once
    assert th.allowed_cpus(quota) == 2
    quota.write_text("max 100000\n")
    assert th.allowed_cpus(quota) == 3
    quota.write_text("800000 100000\n")  # a quota above the affinity does not add cores
    assert th.allowed_cpus(quota) == 3


@pytest.mark.parametrize("cpus, workers, local, load, threads, source", [
    (1, 0, 1, 0.0, 1, "auto"),
    (2, 0, 1, 0.0, 2, "auto"),
    (2, 1, 1, 0.0, 1, "auto"),
    (16, 0, 1, 0.0, 16, "auto"),
    (16, 4, 1, 0.0, 12, "auto"),
    (16, 3, 4, 0.0, 1, "auto"),      # torchrun, 4 ranks: 4 cores each, 3 of them for loader workers
    (16, 0, 4, 0.0, 4, "auto"),
    (16, 20, 1, 0.0, 1, "auto"),     # more workers than cores: never 0 threads
    (2, 0, 1, 2.5, 1, "busy"),       # the others already keep both cores busy
    (2, 0, 1, 0.9, 1, "busy"),       # ... or one of the two
    (2, 0, 1, 0.3, 2, "auto"),       # a little background load is not worth a thread
    (16, 0, 1, 9.0, 7, "busy"),      # a partly busy big machine: the free cores
    (16, 4, 1, 3.0, 12, "auto"),     # the share (cores - workers) fits in the free cores
])
def test_plan_for_cores_workers_ranks_and_load(cpus, workers, local, load, threads, source):
    plan = plan_threads(cpus, workers, local, env={}, load=load)
    assert (plan.threads, plan.source) == (threads, source)


def test_the_governor_follows_the_others_load(monkeypatch):
    plan = plan_threads(2, env={})
    gov = th.LoadGovernor(plan, every_s=0.0)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(gov.threads)
    try:
        for others, expected in ((1.8, 1), (1.7, None), (0.2, 2), (0.1, None)):
            monkeypatch.setattr(gov.meter, "others", lambda o=others: o)
            assert gov.tick() == expected
            assert torch.get_num_threads() == gov.threads
        torch.set_num_threads(1)  # someone else takes control: the governor stops
        monkeypatch.setattr(gov.meter, "others", lambda: 0.0)
        assert gov.tick() is None and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(torch_threads)


def test_a_commands_plan_ends_with_it(clean_env, monkeypatch):
    monkeypatch.setattr(th, "others_load", lambda interval_s=0.2: 0.0)
    th.configure_threads()
    assert th._GOVERNOR is not None and th._GOVERNOR.plan.source == "auto"
    th.release_threads()
    assert th._GOVERNOR is None and th.adapt_threads() is None


def test_load_meter_sees_a_busy_child_process():
    import subprocess
    import sys

    meter = th.LoadMeter()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"])
    child.wait()
    assert meter.others() > 0.3  # it kept one core busy for most of the time (this process was idle)


def test_the_users_settings_win_in_order():
    assert plan_threads(16, env={"OMP_NUM_THREADS": "3"}).threads == 3
    assert plan_threads(16, env={"OMP_NUM_THREADS": "3", "SGCL_NUM_THREADS": "5"}).threads == 5
    assert plan_threads(16, requested=6, env={"SGCL_NUM_THREADS": "5"}).threads == 6
    assert plan_threads(16, requested=6, env={"SGCL_NUM_THREADS": "off"}).threads is None
    assert plan_threads(2, env={"SGCL_NUM_THREADS": "auto"}, load=5.0).source == "busy"
    assert plan_threads(2, env={"OMP_NUM_THREADS": "2"}, load=5.0).threads == 2  # the user's choice stands
    # torchrun's own OMP_NUM_THREADS=1 per rank is not the user's; a value an sgcl parent set is not either
    torchrun = {"OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "x"}
    assert plan_threads(16, local_world=4, env=torchrun).threads == 4
    assert plan_threads(16, env={"OMP_NUM_THREADS": "2", th.ENV_OURS: "OMP_NUM_THREADS"}).threads == 16
    with pytest.raises(ThreadsError, match="SGCL_NUM_THREADS='many'"):
        plan_threads(4, env={"SGCL_NUM_THREADS": "many"})
    with pytest.raises(ThreadsError, match="OMP_NUM_THREADS='0'"):
        plan_threads(4, env={"OMP_NUM_THREADS": "0"})


def test_child_env_keeps_the_users_variables():
    env = {"MKL_NUM_THREADS": "7"}
    th.child_env(th.ThreadPlan(2, 4, 1, "auto"), env)
    assert env["OMP_NUM_THREADS"] == "2" and env["OPENBLAS_NUM_THREADS"] == "2" and env["MKL_NUM_THREADS"] == "7"
    th.child_env(th.ThreadPlan(3, 4, 0, "auto"), env)  # a later plan updates its own variables only
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "7"
    assert set(env[th.ENV_OURS].split(",")) == {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"}


def test_configure_threads_sets_torch_and_the_child_environment(clean_env):
    clean_env.setenv("SGCL_NUM_THREADS", "2")
    plan = th.configure_threads(workers=1)
    assert plan.threads == 2 and torch.get_num_threads() == 2
    assert all(os.environ[name] == "2" for name in th.BLAS_ENV)
    clean_env.setenv("SGCL_NUM_THREADS", "off")
    torch.set_num_threads(1)
    assert th.configure_threads().threads is None and torch.get_num_threads() == 1


def test_no_load_check_under_a_quota_narrower_than_the_affinity(clean_env, tmp_path):
    # a container limited to 2 CPUs of a 16-core host: /proc/stat shows the host, not its share
    _cores(clean_env, 16, tmp_path)
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    clean_env.setattr(th, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    clean_env.setattr(th, "others_load", lambda interval_s=0.2: 12.0)
    plan = th.configure_threads()
    assert (plan.threads, plan.cpus, plan.source) == (2, 2, "auto") and th._GOVERNOR is None
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no quota: the load check applies
    assert th.configure_threads().threads == 4 and th._GOVERNOR is not None
    th.release_threads()


@pytest.mark.parametrize("cpus, requested, expected", [(1, None, 0), (2, None, 1), (16, None, 8), (2, 0, 0), (16, 12, 12)])
def test_loader_workers_default_to_cores_minus_one(monkeypatch, cpus, requested, expected):
    _cores(monkeypatch, cpus)
    notes: list[str] = []
    assert th.resolve_workers(requested, log=notes.append) == expected
    assert notes == []


def test_an_explicit_worker_count_above_the_cores_is_honoured_with_a_note(monkeypatch):
    _cores(monkeypatch, 2)
    notes: list[str] = []
    assert th.resolve_workers(4, "num_workers", log=notes.append) == 4
    assert len(notes) == 1 and "num_workers=4" in notes[0] and "2 allowed cores" in notes[0]
    with pytest.raises(ThreadsError, match="num_workers=-1 must be >= 0"):
        th.resolve_workers(-1, "num_workers")


def _use_cv2_pool() -> None:
    import cv2
    import numpy as np

    cv2.GaussianBlur(np.zeros((2000, 2000, 3), np.uint8), (9, 9), 3)


class _Probe(torch.utils.data.Dataset):
    """Each item: the torch and cv2 threads of the process that loads it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        import cv2

        return torch.tensor([torch.get_num_threads(), cv2.getNumThreads()])


def test_capped_loader_on_two_cores_warns_nothing_and_its_worker_runs_one_thread(monkeypatch):
    import cv2

    _cores(monkeypatch, 2)  # DataLoader's own check reads the same affinity
    before = cv2.getNumThreads()
    cv2.setNumThreads(4)
    _use_cv2_pool()  # a forked worker of a process whose cv2 pool ran hangs in cv2.setNumThreads(1)
    try:
        workers = th.resolve_workers(None)
        assert workers == 1
        loader = torch.utils.data.DataLoader(_Probe(), batch_size=None, num_workers=workers,
                                             worker_init_fn=th.worker_init_fn, timeout=120)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seen = [tuple(x.tolist()) for x in loader]
        assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]
        assert seen == [(1, 1), (1, 1)]
        assert cv2.getNumThreads() == 4  # the parent keeps its own
        # and the same loader with 3 workers on 2 cores is what DataLoader warns about
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.utils.data.DataLoader(_Probe(), num_workers=3)._get_iterator()._shutdown_workers()
        assert any("worker processes in total" in str(w.message) for w in caught)
    finally:
        cv2.setNumThreads(before)


def _threads_in_child() -> tuple[int, int]:
    import cv2

    return torch.get_num_threads(), cv2.getNumThreads()


def test_tiling_children_run_the_threads_they_are_given():
    import cv2

    from preprocessing.cohort import run_isolated

    results: dict = {}
    before = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(2)
    cv2.setNumThreads(2)
    _use_cv2_pool()
    try:
        run_isolated([("a", ()), ("b", ())], _threads_in_child, 2, results.__setitem__, lambda k, why: why,
                     timeout=120, threads=1)
        assert results == {"a": (1, 1), "b": (1, 1)}
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (2, 2)  # the waiting parent gets its own back
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


TINY = str(REPO / "configs" / "pretrain" / "tiny_cpu.yaml")
CASES = [
    BadInput("pretrain-negative-workers", ("pretrain", "--config", TINY, "--h5-dir", "{tmp}", "--out", "{tmp}/o",
                                           "--workers", "-1"), 2, r"data\.workers: -1 is out of range; allowed: >= 0"),
    BadInput("extract-negative-workers", ("extract", "--inputs", "{tmp}", "--encoder", "resnet18", "--out", "{tmp}/f",
                                          "--num-workers", "-2"), 2, r"num_workers: -2 is out of range; allowed: >= 0"),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_worker_counts(case, capfd, tmp_path):
    run_case(case, capfd, tmp=tmp_path)


def test_bad_thread_variable_is_one_line_naming_it(clean_env, capfd, tmp_path):
    clean_env.setenv("SGCL_NUM_THREADS", "lots")
    case = BadInput("bad-SGCL_NUM_THREADS", ("pretrain", "--config", TINY, "--h5-dir", "{tmp}", "--out", "{tmp}/o"), 2,
                    r"SGCL_NUM_THREADS='lots' is not a thread count")
    run_case(case, capfd, tmp=tmp_path)
