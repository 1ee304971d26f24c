"""The Triton experts launchers (``mtmerge.kernels.moe.moe_experts`` and
``moe_experts_backward``) against the reference, with the GEMM tolerances of docs/moe.md (fp32 1e-4,
bf16 2e-2, fp16 1e-2): every activation, biases, transposed (strided) weights, int32/int64 ids
with -1 and out-of-range ids, odd sizes, the sorted and the small-batch (DIRECT) paths, empty
shapes, and run-to-run determinism."""

from __future__ import annotations

import pytest
import torch

from mtmerge.reference import moe as ref
from tests.ops.moe.helpers import EXPERT_TOLERANCES, TRITON_DEVICE, gen, make_experts, make_weights, make_x

pytestmark = pytest.mark.usefixtures("triton_kernels")


def kernels():
    from mtmerge.kernels import moe

    return moe


@pytest.fixture(params=["sorted", "direct"])
def path(request, monkeypatch):
    """Force the grouped (sorted) path or the small-batch path that skips the sort."""
    from mtmerge.kernels.moe import experts

    monkeypatch.setattr(experts, "SMALL_BATCH_SLOTS", 0 if request.param == "sorted" else 10**9)
    return request.param


def make_case(T, H, F, E, k, dtype, *, bias=False, transposed=False, ids_dtype=torch.int64, seed=0):
    """Inputs on CPU: ids with duplicates within a row, -1 and an id >= E (both contribute nothing)."""
    w = make_experts(E, H, F, dtype, seed=seed, bias=bias, transposed=transposed, scale=2.0)
    ids = torch.randint(-1, E, (T, k), generator=gen(seed + 1))
    if T * k > 2:
        ids.view(-1)[2] = E + 3
    return dict(x=make_x(T, H, dtype, seed=seed + 2), gate_up=w["gate_up"], down=w["down"],
                weights=make_weights(T, k, seed=seed + 3), ids=ids.to(ids_dtype), gate_up_bias=w["gate_up_bias"],
                down_bias=w["down_bias"])


def on_device(case: dict) -> dict:
    return {name: v.to(TRITON_DEVICE) if isinstance(v, torch.Tensor) else v for name, v in case.items()}


def assert_close(got, want, dtype):
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got, want, **EXPERT_TOLERANCES[dtype])


def run_forward(case, activation):
    got = kernels().moe_experts(activation=activation, **on_device(case))
    assert_close(got, ref.moe_experts(activation=activation, **case), case["x"].dtype)
    return got


def run_backward(case, activation, seed=7):
    grad_out = make_x(*case["x"].shape, case["x"].dtype, seed=seed)
    got = kernels().moe_experts_backward(grad_out.to(TRITON_DEVICE), activation=activation, **on_device(case))
    want = ref.moe_experts_backward(grad_out, activation=activation, **case)
    for name, g, w in zip(["grad_x", "grad_gate_up", "grad_down", "grad_weights", "grad_gate_up_bias",
                           "grad_down_bias"], got, want, strict=True):
        try:
            assert_close(g, w, case["x"].dtype)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    return got


# (T, H, F, E, k, activation, dtype, bias, transposed, ids dtype)
CASES = [
    (9, 33, 17, 6, 2, "silu", torch.float32, False, False, torch.int64),
    (7, 20, 9, 4, 3, "gelu", torch.float32, True, True, torch.int32),
    (5, 24, 16, 5, 2, "gelu_tanh", torch.float32, True, False, torch.int64),
    (6, 17, 12, 3, 2, "relu", torch.float32, False, True, torch.int64),
    (8, 18, 10, 4, 2, "gpt_oss", torch.float32, True, True, torch.int64),
    (9, 24, 12, 5, 2, "silu", torch.bfloat16, True, False, torch.int32),
    (6, 20, 8, 4, 2, "gpt_oss", torch.bfloat16, True, True, torch.int64),
    (7, 16, 16, 3, 2, "gelu", torch.float16, False, False, torch.int64),
    (5, 12, 6, 3, 2, "silu", torch.float64, True, True, torch.int64),
]


def case_id(c):
    T, H, F, E, k, act, dtype, bias, transposed, ids_dtype = c
    return (f"T{T}-H{H}-F{F}-E{E}-k{k}-{act}-{str(dtype)[6:]}{'-bias' if bias else ''}"
            f"{'-transposed' if transposed else ''}-{str(ids_dtype)[6:]}")


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_forward(c, path):
    T, H, F, E, k, act, dtype, bias, transposed, ids_dtype = c
    run_forward(make_case(T, H, F, E, k, dtype, bias=bias, transposed=transposed, ids_dtype=ids_dtype), act)


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_backward(c):
    T, H, F, E, k, act, dtype, bias, transposed, ids_dtype = c
    run_backward(make_case(T, H, F, E, k, dtype, bias=bias, transposed=transposed, ids_dtype=ids_dtype, seed=3),
                 act)


def test_gpt_oss_clamps_in_both_directions():
    """gpt_oss with pre-activations well past +-7, so both clamps (and their zero gradients) act."""
    case = make_case(6, 16, 8, 3, 2, torch.float32, bias=True)
    case["gate_up"] = case["gate_up"] * 30
    run_forward(case, "gpt_oss")
    run_backward(case, "gpt_oss")


@pytest.mark.parametrize("shape", [(0, 2), (4, 0)], ids=["T0", "k0"])
def test_empty(shape):
    T, k = shape
    case = make_case(T, 8, 4, 3, k, torch.float32, bias=True)
    y = run_forward(case, "silu")
    assert y.shape == (T, 8)
    grads = run_backward(case, "silu")
    assert all(not g.cpu().any() for g in grads[1:])


def test_all_unrouted(path):
    case = make_case(5, 8, 4, 3, 2, torch.bfloat16, bias=True)
    case["ids"] = torch.full((5, 2), -1, dtype=torch.int64)
    assert not run_forward(case, "silu").cpu().any()
    grads = run_backward(case, "silu")
    assert all(not g.cpu().any() for g in grads)


def test_crowded_expert_and_unused_experts():
    """Every slot on one expert (several tiles of it); the other experts get zero gradients."""
    case = make_case(9, 16, 8, 4, 2, torch.float32, bias=True)
    case["ids"] = torch.full((9, 2), 2, dtype=torch.int64)
    run_forward(case, "silu")
    _, g_gu, g_down, _, g_gub, g_db = run_backward(case, "silu")
    for g in (g_gu, g_down, g_gub, g_db):
        assert not g.cpu()[[0, 1, 3]].any()


def test_deterministic(path):
    case = on_device(make_case(9, 20, 12, 4, 3, torch.float32, bias=True))
    first = kernels().moe_experts(activation="silu", **case)
    assert torch.equal(first, kernels().moe_experts(activation="silu", **case))
    grad_out = make_x(9, 20, seed=5).to(TRITON_DEVICE)
    g1 = kernels().moe_experts_backward(grad_out, activation="silu", **case)
    g2 = kernels().moe_experts_backward(grad_out, activation="silu", **case)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


def test_unknown_activation():
    case = on_device(make_case(2, 8, 4, 2, 1, torch.float32))
    with pytest.raises(ValueError, match="activation"):
        kernels().moe_experts(activation="swish", **case)
