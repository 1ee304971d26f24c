"""``mtmerge.distributed.ExpertParallelMoE`` on 2 CPU processes (gloo): outputs, auxiliary losses and
gradients equal the single-process ``mtmerge.nn.MoEFeedForward`` on the same weights (fp32 tolerance).

The per-rank body is tests/distributed/ep_worker.py; this file spawns it and checks what came back.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed import ep_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
DEADLINE_S = 120.0
KWARGS = {name: kwargs for name, kwargs, _ in ep_worker.CASES}


def _spawn(tmp_path) -> list[dict]:
    """Run ep_worker.worker on WORLD processes; a hang is killed at the deadline and fails the test."""
    init_file = tmp_path / "init"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    context = mp.spawn(ep_worker.worker, args=(WORLD, str(init_file), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1.0):  # raises ProcessRaisedException with the child's traceback
        if time.monotonic() > deadline:
            for proc in context.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"the {WORLD} expert-parallel ranks did not finish within {DEADLINE_S:.0f} s")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory.mktemp("expert_parallel"))


@pytest.mark.parametrize("case", [c[0] for c in ep_worker.CASES])
def test_matches_the_single_process_layer(ranks, case):
    # every comparison ran (and passed: a failed one raises in the child) on both ranks
    for rank in ranks:
        diffs = rank[case]["diffs"]
        expected = {"output", "router_logits", "load_balancing_loss", "router_z_loss", "grad_x", "grad_router",
                    "grad_gate_up", "grad_down"}
        if KWARGS[case].get("bias"):
            expected |= {"grad_gate_up_bias", "grad_down_bias"}
        assert set(diffs) == expected
        assert all(0.0 <= d < 1e-3 for d in diffs.values()), diffs  # max |difference| (assert_close ran too)


def test_tokens_cross_ranks(ranks):
    # the exchange is exercised: some rank routed rows to the other rank's experts
    cross = [rank[case]["sent"][1 - r] for r, rank in enumerate(ranks) for case in rank]
    assert sum(cross) > 0
    assert ranks[1]["rank1_empty"]["sent"] == [0, 0]  # the rank without tokens sent nothing, and still took part


def test_needs_an_initialized_process_group():
    from mtmerge.distributed import ExpertParallelMoE

    if dist.is_initialized():  # pragma: no cover - the test process never initializes one
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(8, 8, 2, 1)


def test_all_to_all_is_exported():
    from mtmerge import distributed

    assert callable(distributed.all_to_all)
    assert distributed.__all__ == ["ExpertParallelMoE", "all_to_all"]
    assert torch.distributed.is_available()
