"""The C++ CPU kernels of the gates, moe_align and the losses (csrc/moe/routing.cpp) against the
reference: every dtype, k = 0, T = 0, ties, biases, task masks, capacities, unrouted and
out-of-range ids, strided inputs, and the same bits on 1 and 2 threads."""

from __future__ import annotations

import pytest
import torch

from mtmerge.reference import moe as ref
from tests.ops.moe.helpers import make_ids, make_logits, make_x

pytestmark = pytest.mark.usefixtures("cpp_kernels")

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ops = torch.ops.mtmerge


def close(got, want, rtol=1e-6, atol=1e-7):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_topk_gate(dtype, scoring):
    for T, E, k in [(0, 4, 2), (1, 5, 0), (7, 9, 3), (33, 64, 8), (5, 3, 3)]:
        logits = make_logits(T, E, dtype, seed=T + E)
        bias = torch.linspace(-0.01, 0.02, E).to(dtype) if E == 9 else None
        for renormalize in (False, True):
            w, i = ops.moe_topk_gate(logits, k, scoring, renormalize, bias)
            rw, ri = ref.moe_topk_gate(logits, k, scoring, renormalize, bias)
            assert torch.equal(i, ri) and i.dtype == torch.int32
            close(w, rw)


def test_topk_gate_ties_and_strides():
    logits = torch.zeros(4, 6)
    logits[1, 3] = logits[1, 5] = 1.0  # a tie between 3 and 5, then a tie among the rest
    w, i = ops.moe_topk_gate(logits, 3, "softmax", True, None)
    assert i.tolist()[0] == [0, 1, 2] and i.tolist()[1] == [3, 5, 0]
    strided = make_logits(6, 10)[:, ::2]  # [6, 5], not contiguous
    for got, want in zip(ops.moe_topk_gate(strided, 2, "sigmoid", False, None),
                         ref.moe_topk_gate(strided, 2, "sigmoid", False, None), strict=True):
        close(got, want)
    # the bias picks, the scores weigh
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 10.0])
    w, i = ops.moe_topk_gate(torch.zeros(1, 6), 1, "softmax", False, bias)
    assert i.item() == 5 and w.item() == pytest.approx(1 / 6)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_task_gate(dtype):
    T, H, E, n_tasks = 19, 13, 6, 3
    x = make_x(T, H, dtype, 1)
    router = (torch.randn(n_tasks, E, H, generator=torch.Generator().manual_seed(2)) * 0.5).to(dtype)
    task_ids = torch.randint(0, n_tasks, (T,), generator=torch.Generator().manual_seed(3)).to(torch.int32)
    mask = torch.ones(n_tasks, E, dtype=torch.bool)
    mask[0, :3] = False
    mask[2, 4] = False
    for expert_mask, k in ((None, 2), (mask, 3)):
        got = ops.moe_task_gate(x, router, task_ids, k, expert_mask, "softmax", True)
        want = ref.moe_task_gate(x, router, task_ids, k, expert_mask, "softmax", True)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        close(got[2], want[2], rtol=tol, atol=tol)
        assert torch.equal(got[1], want[1])
        close(got[0], want[0], rtol=tol, atol=tol)
        if expert_mask is not None:
            chosen = expert_mask[task_ids.long()].gather(1, got[1].long())
            assert chosen.all()
    # a strided router, T = 0
    strided = router.transpose(1, 2).contiguous().transpose(1, 2)
    close(ops.moe_task_gate(x, strided, task_ids, 2, None, "sigmoid", False)[2],
          ref.moe_task_gate(x, router, task_ids, 2, None, "sigmoid", False)[2], rtol=1e-5, atol=1e-5)
    empty = ops.moe_task_gate(x[:0], router, task_ids[:0], 2, None, "softmax", True)
    assert [tuple(t.shape) for t in empty] == [(0, 2), (0, 2), (0, E)]


def test_task_gate_checks_task_ids():
    x, router = make_x(3, 4), torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="task_ids"):
        ops.moe_task_gate(x, router, torch.tensor([0, 2, 1]), 1, None, "softmax", True)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
def test_align(ids_dtype):
    for T, E, k, capacity in [(0, 3, 2, -1), (1, 4, 2, 0), (9, 4, 3, -1), (9, 4, 3, 2), (40, 7, 2, 5), (5, 0, 2, -1)]:
        ids = make_ids(T, max(E, 1), k, seed=T, unrouted=0.2, dtype=ids_dtype, distinct=False)
        if T and E:
            ids[0, 0] = E + 3  # out of range: unrouted
        got = ops.moe_align(ids, E, capacity)
        want = ref.moe_align(ids, E, capacity)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == torch.int64 and torch.equal(g, w)
    strided = make_ids(8, 5, 4, unrouted=0.1)[:, ::2]
    for g, w in zip(ops.moe_align(strided, 5, 1), ref.moe_align(strided, 5, 1), strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_losses(dtype):
    for T, E, k in [(0, 4, 2), (1, 3, 1), (300, 8, 2), (17, 5, 0)]:
        logits = (make_logits(T, E, seed=T) * 3).to(dtype)
        ids = make_ids(T, E, k, seed=T, unrouted=0.2)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        close(ops.moe_load_balancing_loss(logits, ids, E), ref.moe_load_balancing_loss(logits, ids, E),
              rtol=tol, atol=tol)
        close(ops.moe_router_z_loss(logits), ref.moe_router_z_loss(logits), rtol=tol, atol=tol)


def test_thread_count_invariance():
    logits = make_logits(1000, 16, seed=4) * 2
    ids = make_ids(1000, 16, 2, seed=5)
    x = make_x(700, 32, seed=6)
    router = torch.randn(3, 16, 32)
    task_ids = torch.randint(0, 3, (700,))
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append((*ops.moe_topk_gate(logits, 4, "softmax", True, None),
                        *ops.moe_task_gate(x, router, task_ids, 2, None, "sigmoid", True),
                        ops.moe_load_balancing_loss(logits, ids, 16), ops.moe_router_z_loss(logits)))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
