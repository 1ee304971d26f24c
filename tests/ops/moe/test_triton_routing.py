"""The Triton routing launchers (``mtmerge.kernels.moe``: ``moe_topk_gate``, ``moe_task_gate``,
``moe_align``) and the auxiliary losses against the reference: ids and ``moe_align`` bit for bit,
weights within 1e-6 relative, logits and losses within fp32 round-off. On a GPU, ``moe_align``
also runs the native CUDA kernel of ``csrc/cuda/moe_align.cu`` when ``mtmerge._C`` has it."""

from __future__ import annotations

import pytest
import torch

from mtmerge.reference import moe as ref
from tests.ops.moe.helpers import TRITON_DEVICE, gen, make_ids, make_logits, make_x

pytestmark = pytest.mark.usefixtures("triton_kernels")

GATE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def kernels():
    from mtmerge.kernels import moe

    return moe


def on_device(*tensors):
    return [None if t is None else t.to(TRITON_DEVICE) for t in tensors]


def assert_exact(got, want):
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    assert torch.equal(got, want), (got, want)


def assert_close(got, want, tol):
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# ---- moe_topk_gate ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 4, 2), (1, 1, 1), (7, 5, 2), (9, 6, 0), (5, 3, 3), (6, 33, 4)],
                         ids=lambda s: "T{}-E{}-k{}".format(*s))
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_topk_gate(shape, scoring):
    T, E, k = shape
    logits = make_logits(T, E, seed=T + E)
    bias = torch.rand(E, generator=gen(3)) * 0.2
    for dtype in GATE_DTYPES:
        x = logits.to(dtype)
        for renormalize in (True, False):
            for b in (None, bias.to(dtype)):
                weights, ids = kernels().moe_topk_gate(*on_device(x), k, scoring, renormalize, *on_device(b))
                want_w, want_ids = ref.moe_topk_gate(x, k, scoring, renormalize, b)
                assert_exact(ids, want_ids)
                assert_close(weights, want_w, 1e-6 if dtype != torch.float64 else 1e-12)


def test_topk_gate_ties_and_bias():
    """Equal scores: the lower expert wins; the bias moves only the choice, not the weights."""
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    _, ids = kernels().moe_topk_gate(*on_device(logits), 3, "softmax", False, None)
    assert ids.cpu().tolist() == [[1, 2, 4], [0, 1, 2]]
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0])
    weights_b, ids_b = kernels().moe_topk_gate(*on_device(logits), 2, "sigmoid", True, *on_device(bias))
    assert ids_b.cpu()[:, 0].tolist() == [3, 3]
    want_w, _ = ref.moe_topk_gate(logits, 2, "sigmoid", True, bias)
    assert_close(weights_b, want_w, 1e-6)


def test_topk_gate_strided_logits():
    logits = make_logits(8, 12, seed=5).T.contiguous().T  # column-major view
    weights, ids = kernels().moe_topk_gate(*on_device(logits), 3, "softmax", True, None)
    want_w, want_ids = ref.moe_topk_gate(logits, 3, "softmax", True, None)
    assert_exact(ids, want_ids)
    assert_close(weights, want_w, 1e-6)


# ---- moe_task_gate --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_task_gate(dtype, masked):
    T, H, E, tasks = 9, 19, 6, 3
    x = make_x(T, H, dtype, seed=1)
    router = (torch.randn((tasks, E, H), generator=gen(2)) * 0.5).to(dtype)
    task_ids = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1], dtype=torch.int32 if masked else torch.int64)
    mask = None
    if masked:
        mask = torch.rand((tasks, E), generator=gen(4)) > 0.4
        mask[:, :2] = True
    for scoring in ("softmax", "sigmoid"):
        got = kernels().moe_task_gate(*on_device(x, router, task_ids), 2, *on_device(mask), scoring, True)
        want = ref.moe_task_gate(x, router, task_ids, 2, mask, scoring, True)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_close(got[2], want[2], tol)  # logits: fp32 dot products, summation order differs
        assert_exact(got[1], want[1])
        assert_close(got[0], want[0], max(tol, 1e-6))
        if masked:  # masked experts: -inf logits, never chosen
            allowed = mask[task_ids.long()]
            assert torch.isneginf(got[2].cpu()[~allowed]).all()
            assert allowed.gather(1, got[1].cpu().long()).all()


def test_task_gate_empty():
    x, router = torch.zeros((0, 5)), torch.zeros((2, 4, 5))
    weights, ids, logits = kernels().moe_task_gate(*on_device(x, router, torch.zeros(0, dtype=torch.int64)), 2,
                                                   None, "softmax", True)
    assert weights.shape == (0, 2) and ids.shape == (0, 2) and logits.shape == (0, 4)


# ---- moe_align ------------------------------------------------------------------------------------------


ALIGN_CASES = [(0, 2, 4), (1, 1, 1), (5, 0, 3), (9, 2, 5), (13, 3, 6), (37, 4, 13), (20, 2, 1)]


@pytest.mark.parametrize("case", ALIGN_CASES, ids=lambda c: "T{}-k{}-E{}".format(*c))
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_align(case, ids_dtype):
    T, k, E = case
    # duplicates allowed, -1 and out-of-range ids (treated as -1 by the kernels)
    ids = torch.randint(-3, E + 2, (T, k), generator=gen(T * 7 + E)).to(ids_dtype)
    for capacity in (-1, 0, 1, 3, 1000):
        got = kernels().moe_align(*on_device(ids), E, capacity)
        want = ref.moe_align(ids, E, capacity)
        for g, w in zip(got, want, strict=True):
            assert_exact(g, w)


def test_align_unrouted_and_permutation():
    ids = make_ids(11, 6, 3, seed=3, unrouted=0.3)
    sorted_slots, offsets, dropped = kernels().moe_align(*on_device(ids), 6, 2)
    assert sorted(sorted_slots.cpu().tolist()) == list(range(33))  # a permutation of the slots
    want = ref.moe_align(ids, 6, 2)
    assert_exact(sorted_slots, want[0])
    assert_exact(offsets, want[1])
    assert_exact(dropped, want[2])


def test_align_triton_kernel_directly():
    """The Triton kernel itself (on CUDA the launcher may take the native kernel instead)."""
    from mtmerge.kernels.moe.align import _triton_align

    ids = torch.randint(-1, 7, (19, 3), generator=gen(9))
    for capacity in (-1, 2):
        got = _triton_align(*on_device(ids), 7, capacity)
        for g, w in zip(got, ref.moe_align(ids, 7, capacity), strict=True):
            assert_exact(g, w)


@pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="the native CUDA kernel needs a GPU")
def test_align_native_cuda():
    from mtmerge import _library

    native = getattr(_library._C, "moe_align_cuda", None)
    if native is None:
        pytest.skip("mtmerge._C was built without CUDA")
    for T, k, E in [(0, 2, 3), (1, 1, 1), (300, 8, 64), (1000, 2, 9000), (700, 3, 0)]:
        ids = torch.randint(-1, E + 1, (T, k), generator=gen(T)).to(torch.int32)
        for capacity in (-1, 0, 5, 40):
            got = native(ids.cuda(), E, capacity)
            for g, w in zip(got, ref.moe_align(ids, E, capacity), strict=True):
                assert_exact(g, w)


# ---- losses -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", GATE_DTYPES)
@pytest.mark.parametrize("T", [0, 1, 9])
def test_losses(dtype, T):
    E, k = 6, 2
    logits = (torch.randn((T, E), generator=gen(T)) * 3).to(dtype)
    ids = make_ids(T, E, k, seed=T, unrouted=0.2)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    got = kernels().moe_load_balancing_loss(*on_device(logits, ids), E)
    assert_close(got, ref.moe_load_balancing_loss(logits, ids, E), tol)
    assert_close(kernels().moe_router_z_loss(*on_device(logits)), ref.moe_router_z_loss(logits), tol)


def test_losses_many_blocks():
    """More rows than one block (several partials, summed in block order) and a strided input."""
    logits = torch.randn((6, 45), generator=gen(1)).T  # [45, 6], not contiguous
    ids = make_ids(45, 6, 3, seed=2, unrouted=0.1)
    assert_close(kernels().moe_load_balancing_loss(*on_device(logits, ids), 6),
                 ref.moe_load_balancing_loss(logits, ids, 6), 2e-6)
    assert_close(kernels().moe_router_z_loss(*on_device(logits)), ref.moe_router_z_loss(logits), 2e-6)
