"""The Triton launchers ``mtmerge.kernels.lowrank.lama_pool`` and ``lama_pool_backward`` against
the reference (docs/lowrank.md tolerances: fp32 1e-5, gradients 1e-4, bf16 2e-2; attn is fp32 for every
input dtype and is held to the fp32 tolerance): odd sizes crossing the tile and head-block
boundaries, masks with fully masked rows, the mean context and a given one, strided inputs, empty
shapes, and run-to-run determinism."""

from __future__ import annotations

import pytest
import torch

from mtmerge.reference import lowrank as ref
from tests.ops.lowrank.helpers import (
    TRITON_DEVICE,
    assert_close,
    assert_launcher_matches_reference,
    make_lama,
    oracle_lama,
    randn,
)

pytestmark = pytest.mark.usefixtures("triton_kernels")

GRAD_NAMES = ("grad_h", "grad_P", "grad_Q", "grad_context")


def kernels():
    from mtmerge.kernels import lowrank

    return lowrank


def on_device(case: dict) -> dict:
    return {name: v.to(TRITON_DEVICE) if isinstance(v, torch.Tensor) else v for name, v in case.items()}


def check_forward(case):
    attn, pooled = kernels().lama_pool(**on_device(case))
    want_attn, want_pooled = ref.lama_pool(**case)
    attn, pooled = attn.cpu(), pooled.cpu()
    assert attn.dtype == want_attn.dtype and pooled.dtype == want_pooled.dtype
    assert not attn.isnan().any() and not pooled.isnan().any()
    # attn: the same fp32 math from the same (exactly upcast) inputs, whatever h's dtype
    assert_close(attn, want_attn, torch.float64 if case["h"].dtype == torch.float64 else torch.float32)
    assert_close(pooled, want_pooled, case["h"].dtype)
    return attn, pooled


def check_backward(case, seed=7):
    h = case["h"]
    B, T, D = h.shape
    m = case["P"].shape[1]
    cd = torch.float64 if h.dtype == torch.float64 else torch.float32
    grad_attn = randn(B, m, T, dtype=cd, seed=seed)
    grad_pooled = randn(B, m, D, dtype=h.dtype, seed=seed + 1)
    got = kernels().lama_pool_backward(grad_attn.to(TRITON_DEVICE), grad_pooled.to(TRITON_DEVICE), **on_device(case))
    want = ref.lama_pool_backward(grad_attn, grad_pooled, **case)
    for name, g, w in zip(GRAD_NAMES, got, want, strict=True):
        assert g.dtype == w.dtype and g.is_contiguous(), name
        assert not g.isnan().any(), name
        try:
            assert_close(g, w, h.dtype, gemm=True)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    return [g.cpu() for g in got]


# (B, T, D, m, dtype, masked, context)
CASES = [
    (2, 17, 21, 5, torch.float32, True, False),
    (2, 20, 16, 3, torch.float32, False, True),
    (1, 9, 33, 17, torch.float32, True, True),  # m > 16: two head blocks, M_P2 = 32
    (2, 13, 11, 4, torch.bfloat16, True, False),
    (1, 7, 9, 1, torch.bfloat16, False, True),
    (2, 6, 5, 3, torch.float16, True, True),
    (2, 9, 6, 3, torch.float64, True, False),
]


def case_id(c):
    B, T, D, m, dtype, masked, context = c
    return f"B{B}-T{T}-D{D}-m{m}-{str(dtype)[6:]}{'-masked' if masked else ''}{'-context' if context else '-mean'}"


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_forward(c):
    B, T, D, m, dtype, masked, context = c
    check_forward(make_lama(B, T, D, m, dtype, seed=1, masked=masked, context=context))


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_backward(c):
    B, T, D, m, dtype, masked, context = c
    check_backward(make_lama(B, T, D, m, dtype, seed=2, masked=masked, context=context))


def test_matches_float64_oracle():
    case = make_lama(2, 8, 7, 3, torch.float32, seed=3, masked=True)
    attn, pooled = kernels().lama_pool(**on_device(case))
    want_attn, want_pooled = oracle_lama(**case)
    torch.testing.assert_close(attn.cpu().double(), want_attn, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pooled.cpu().double(), want_pooled, atol=1e-5, rtol=1e-5)


def test_fully_masked_row_gives_zeros():
    """The last row has no real token: attn and pooled are 0 (not NaN), and so are its gradients."""
    case = make_lama(2, 6, 5, 3, torch.float32, seed=4, masked=True)
    attn, pooled = check_forward(case)
    assert not attn[-1].any() and not pooled[-1].any()
    grad_h = check_backward(case)[0]
    assert not grad_h[-1].any()
    # masked tokens of the other row get no gradient either
    assert not grad_h[0][~case["mask"][0]].any()


def test_masked_values_never_matter():
    """NaN in the masked tokens of h changes nothing."""
    case = make_lama(2, 7, 6, 3, torch.float32, seed=5, masked=True)
    want = kernels().lama_pool(**on_device(case))
    h = case["h"].clone()
    h[~case["mask"]] = float("nan")
    got = kernels().lama_pool(**on_device({**case, "h": h}))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.cpu(), b.cpu())


def test_strided_inputs():
    """h as a transposed view, P and Q with transposed storage."""
    case = make_lama(2, 10, 9, 4, torch.float32, seed=6, masked=True, context=True)
    case["h"] = case["h"].transpose(1, 2).contiguous().transpose(1, 2)
    case["P"] = case["P"].t().contiguous().t()
    case["Q"] = case["Q"].t().contiguous().t()
    assert not case["h"].is_contiguous() and not case["Q"].is_contiguous()
    check_forward(case)
    check_backward(case)
    check_backward({**case, "context": None})


@pytest.mark.parametrize("shape", [(1, 0, 3, 2), (2, 4, 0, 2), (0, 3, 4, 2)], ids=["T0", "D0", "B0"])
def test_empty(shape):
    B, T, D, m = shape
    case = make_lama(B, T, D, m, torch.float32, seed=7)
    attn, pooled = check_forward(case)
    assert attn.shape == (B, m, T) and pooled.shape == (B, m, D)
    check_backward(case)


def test_deterministic():
    case = on_device(make_lama(2, 19, 12, 5, torch.float32, seed=8, masked=True))
    first = kernels().lama_pool(**case)
    assert all(torch.equal(a, b) for a, b in zip(first, kernels().lama_pool(**case), strict=True))
    grad_attn = randn(2, 5, 19, seed=9).to(TRITON_DEVICE)
    grad_pooled = randn(2, 5, 12, seed=10).to(TRITON_DEVICE)
    g1 = kernels().lama_pool_backward(grad_attn, grad_pooled, **case)
    g2 = kernels().lama_pool_backward(grad_attn, grad_pooled, **case)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.parametrize("op", ['lama_pool', 'lama_pool_backward'])
def test_op_cases(op):
    """The shared argument sets of the op tests (helpers.op_cases) through the launcher."""
    assert_launcher_matches_reference(op)


def test_small_activations_keep_precision():
    """Tiny u * g (tanh near 0, small ||z||, which the normalization amplifies): the kernels' tanh must
    be accurate relative to its value, not only absolutely."""
    case = make_lama(2, 9, 7, 4, torch.float32, seed=11, masked=True)
    case["h"] = case["h"] * 0.02
    check_forward(case)
    check_backward(case)
