"""Two processes under ``torchrun --nproc_per_node 2`` (gloo, CPU) give the same losses and
gradients as one process with the doubled batch, for MoCo v2, SimCLR and SGCL (memory and queue).

The backbone is ``_tiny_nets.TinyGN`` (GroupNorm): per-sample normalisation, so splitting the
batch cannot change a sample's features and any mismatch is the method's (gathers, shuffle-BN,
bank/queue updates, k-means broadcast). Three steps are compared: the first checks the gradients
of the gathered losses, the next two check that bank/queue/momentum updates and the per-epoch
re-clustering (rank 0 only, broadcast) keep every rank identical to the single process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_ddp_worker.py"


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "traces.pt"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=False)


METHODS = ["moco_v2", "simclr", "sgcl_memory", "sgcl_queue"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", METHODS)
def test_losses_and_gradients_match_one_process(traces, method):
    ddp, single = traces["ddp"][method], traces["single"][method]
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-4, abs=1e-5)
    for t_ddp, t_single in zip(ddp["terms"], single["terms"]):
        assert t_ddp.keys() == t_single.keys()
        for k in t_ddp:
            assert t_ddp[k] == pytest.approx(t_single[k], rel=1e-4, abs=1e-5), k
    for step, (g_ddp, g_single) in enumerate(zip(ddp["grads"], single["grads"])):
        assert g_ddp.keys() == g_single.keys()
        for name in g_ddp:
            assert torch.allclose(g_ddp[name], g_single[name], rtol=1e-3, atol=1e-6), f"step {step} grad {name}"
    if method.startswith("sgcl"):
        assert "loss_spatial" in ddp["terms"][0] and "loss_mcrop" in ddp["terms"][0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["sgcl_memory", "sgcl_queue"])
def test_clusters_identical_on_all_ranks_and_to_one_process(traces, method):
    ddp, single = traces["ddp"][method], traces["single"][method]
    per_rank = ddp["clusters_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    assert len(ddp["clusters"]) == len(single["clusters"]) >= 1
    for a, b in zip(ddp["clusters"], single["clusters"]):
        assert torch.allclose(a, b, atol=1e-5) if a.is_floating_point() else torch.equal(a, b)


@pytest.mark.timeout(300)
def test_gathers_with_uneven_batches(traces):
    r0, r1 = traces["ddp"]["uneven"]
    expected = [0, 1, 2, 10, 11, 12, 13, 14]
    assert r0["gathered"] == r1["gathered"] == r0["nograd"] == expected
    assert r0["slice"] == [0, 3] and r1["slice"] == [3, 8]
    # d/dx of Σ_r Σ_j w_j g_j: each rank's loss contributes w at its slice (2 ranks -> 2·w)
    assert r0["grad"] == [2.0, 4.0, 6.0] and r1["grad"] == [8.0, 10.0, 12.0, 14.0, 16.0]
