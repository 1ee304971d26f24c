"""The C++ CPU kernels of moe_experts and moe_experts_backward (csrc/moe/experts*.cpp) against the
reference: every dtype and activation, odd shapes, unrouted and out-of-range ids, strided inputs,
each work-splitting path (decode, row blocks, column blocks), and the same bits on 1 and 2 threads."""

from __future__ import annotations

import pytest
import torch

from mtmerge.reference import moe as ref
from tests.ops.moe.helpers import ACTIVATIONS, EXPERT_TOLERANCES, make_experts, make_ids, make_weights, make_x

pytestmark = pytest.mark.usefixtures("cpp_kernels")

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (T, H, F, E, k): empty, decode, odd sizes, k = 0, repeated experts
SHAPES = [(0, 13, 33, 5, 2), (1, 13, 33, 5, 2), (7, 13, 33, 5, 3), (7, 16, 8, 4, 0), (9, 8, 5, 2, 2)]


def case(T, H, F, E, k, dtype=torch.float32, *, seed=0, bias=False, transposed=False, unrouted=0.25,
         distinct=True, ids_dtype=torch.int64):
    w = make_experts(E, H, F, dtype, seed, bias=bias, transposed=transposed)
    return dict(x=make_x(T, H, dtype, seed + 1), gate_up=w["gate_up"], down=w["down"],
                weights=make_weights(T, k, torch.float32, seed + 2),
                ids=make_ids(T, E, k, seed + 3, unrouted=unrouted, dtype=ids_dtype, distinct=distinct),
                gate_up_bias=w["gate_up_bias"], down_bias=w["down_bias"])


def args(c, activation):
    return (c["x"], c["gate_up"], c["down"], c["weights"], c["ids"], activation, c["gate_up_bias"], c["down_bias"])


def forward(c, activation="silu"):
    return torch.ops.mtmerge.moe_experts(*args(c, activation))


def backward(c, grad_out, activation="silu"):
    return torch.ops.mtmerge.moe_experts_backward(grad_out, *args(c, activation))


def check_forward(c, activation, dtype):
    y = forward(c, activation)
    assert y.dtype == dtype and y.shape == c["x"].shape and y.is_contiguous()
    torch.testing.assert_close(y, ref.moe_experts(*args(c, activation)), **EXPERT_TOLERANCES[dtype])


def check_backward(c, activation, dtype, seed=5):
    grad_out = make_x(c["x"].shape[0], c["x"].shape[1], dtype, seed)
    got = backward(c, grad_out, activation)
    want = ref.moe_experts_backward(grad_out, *args(c, activation))
    for name, g, w in zip(("x", "gate_up", "down", "weights", "gate_up_bias", "down_bias"), got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous(), name
        tol = EXPERT_TOLERANCES[dtype]
        if dtype != torch.float64:  # gradients sum more products: scale the tolerance with their size
            tol = {"atol": tol["atol"] * 4, "rtol": tol["rtol"] * 4}
        torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_matches_reference(dtype, activation):
    for i, shape in enumerate(SHAPES):
        check_forward(case(*shape, dtype, seed=i, bias=i % 2 == 1, transposed=i >= 3, distinct=i != 4), activation,
                      dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_matches_reference(dtype, activation):
    for i, shape in enumerate(SHAPES):
        check_backward(case(*shape, dtype, seed=i, bias=i % 2 == 0, transposed=i >= 2, distinct=i != 4), activation,
                       dtype)


# the work splits of csrc/moe/experts.cpp: decode (distinct experts, no sort), a sort with
# repeats, column blocks (few row blocks), row blocks (an expert with > 512 rows), many items
PATHS = {
    "decode": (1, 24, 200, 8, 4, True),
    "decode_repeats": (3, 24, 40, 2, 2, False),
    "column_blocks": (4, 130, 256, 3, 2, True),
    "row_blocks": (1100, 16, 8, 2, 1, True),
    "many_items": (200, 20, 12, 24, 3, True),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_work_splits(path):
    T, H, F, E, k, distinct = PATHS[path]
    c = case(T, H, F, E, k, bias=True, unrouted=0.1, distinct=distinct)
    check_forward(c, "silu", torch.float32)
    check_backward(c, "gpt_oss", torch.float32)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thread_count_invariance(path, dtype):
    T, H, F, E, k, distinct = PATHS[path]
    c = case(T, H, F, E, k, dtype, bias=True, unrouted=0.1, distinct=distinct)
    grad_out = make_x(T, H, dtype, 9)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append((forward(c), *backward(c, grad_out, "gelu")))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(forward(c), forward(c), rtol=0, atol=0)  # and run to run


def test_strided_inputs_and_index_dtypes():
    c = case(9, 13, 10, 4, 3, bias=True, transposed=True, ids_dtype=torch.int32)
    want = ref.moe_experts(*args(c, "silu"))
    strided = dict(c, x=torch.stack([c["x"], c["x"]], 2)[..., 0],  # a non-contiguous view of x's values
                   weights=c["weights"].t().contiguous().t(), ids=c["ids"].t().contiguous().t())
    assert not strided["x"].is_contiguous() and not strided["ids"].is_contiguous()
    torch.testing.assert_close(forward(strided), want, **EXPERT_TOLERANCES[torch.float32])
    bf16_weights = dict(c, weights=c["weights"].to(torch.bfloat16))
    torch.testing.assert_close(forward(bf16_weights), ref.moe_experts(*args(bf16_weights, "silu")),
                               **EXPERT_TOLERANCES[torch.float32])


def test_ids_outside_range_contribute_nothing():
    c = case(6, 8, 4, 3, 2, unrouted=0.0)
    c["ids"][0, 0], c["ids"][2, 1], c["ids"][3, 0] = 3, 1000, -7
    y = forward(c)
    torch.testing.assert_close(y, ref.moe_experts(*args(c, "silu")), **EXPERT_TOLERANCES[torch.float32])
    grads = backward(c, torch.ones_like(c["x"]))
    assert grads[3][0, 0] == 0 and grads[3][2, 1] == 0 and grads[3][3, 0] == 0
    c["ids"].fill_(-1)
    assert torch.equal(forward(c), torch.zeros_like(c["x"]))
    assert not backward(c, torch.ones_like(c["x"]))[1].any()


def test_gpt_oss_clamp_boundaries():
    """h exactly at the clamps: gradient passes on the boundary, not beyond (torch.clamp)."""
    x = torch.ones(1, 1, dtype=torch.float64)
    gate_up = torch.tensor([[[7.0], [-7.0], [8.0], [7.5], [-9.0], [-8.0]]], dtype=torch.float64)  # g, u interleaved
    down = torch.ones(1, 1, 3, dtype=torch.float64)
    c = dict(x=x, gate_up=gate_up, down=down, weights=torch.ones(1, 1, dtype=torch.float64),
             ids=torch.zeros(1, 1, dtype=torch.int64), gate_up_bias=None, down_bias=None)
    got = backward(c, torch.ones_like(x), "gpt_oss")
    want = ref.moe_experts_backward(torch.ones_like(x), *args(c, "gpt_oss"))
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    assert got[1][0, 0, 0] != 0 and got[1][0, 1, 0] != 0 and got[1][0, 2, 0] == 0 and got[1][0, 3, 0] == 0


def test_gradcheck_float64():
    c = case(5, 6, 4, 3, 2, torch.float64, bias=True)
    leaves = [c[n].clone().requires_grad_() for n in ("x", "gate_up", "down", "gate_up_bias", "down_bias")]
    w = c["weights"].double().requires_grad_()

    def fn(x, gate_up, down, gate_up_bias, down_bias, weights):
        return torch.ops.mtmerge.moe_experts(x, gate_up, down, weights, c["ids"], "gelu_tanh", gate_up_bias,
                                             down_bias)

    assert torch.autograd.gradcheck(fn, (*leaves, w))


def test_kernel_checks_shapes():
    c = case(4, 8, 4, 3, 2)
    with pytest.raises(RuntimeError, match="down must be"):
        torch.ops.mtmerge.moe_experts(c["x"], c["gate_up"], c["down"][:, :4], c["weights"], c["ids"], "silu", None,
                                      None)
    with pytest.raises(RuntimeError, match="ids must be"):
        torch.ops.mtmerge.moe_experts(c["x"], c["gate_up"], c["down"], c["weights"][:2], c["ids"][:2], "silu", None,
                                      None)
