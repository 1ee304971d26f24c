"""The Triton launchers ``mtmerge.kernels.lowrank.linformer_attention`` and
``linformer_attention_backward`` against the reference (docs/lowrank.md tolerances: fp32 1e-5, GEMM-like
gradients 1e-4, bf16 2e-2): odd sizes, Nq != N, N < Nmax and r > N, masks with fully padded rows
(NaN in the padded keys and values), strided inputs, the invariants of docs/lowrank.md (identity
projections equal SDPA, padding changes nothing, fp16 x100 stays finite) and the non-causal
backward, where public Triton attention kernels have failed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from mtmerge.reference import lowrank as ref
from tests.ops.lowrank.helpers import (
    TRITON_DEVICE,
    assert_close,
    assert_launcher_matches_reference,
    make_linformer,
    oracle_linformer,
    randn,
)

pytestmark = pytest.mark.usefixtures("triton_kernels")

GRAD_NAMES = ("grad_q", "grad_k", "grad_v", "grad_E", "grad_F")


def kernels():
    from mtmerge.kernels import lowrank

    return lowrank


def on_device(case: dict) -> dict:
    return {name: v.to(TRITON_DEVICE) if isinstance(v, torch.Tensor) else v for name, v in case.items()}


def make_case(B, H, Nq, N, d, r, width, dtype, *, masked=True, seed=0):
    """make_linformer's inputs; with a mask, the padded rows of k and v hold NaN (never read)."""
    case = make_linformer(B, H, Nq, N, d, r, width, dtype, seed=seed, masked=masked)
    if masked:
        pad = case["key_padding_mask"][:, None, :].expand(B, H, N)
        for name in ("k", "v"):
            case[name] = case[name].clone()
            case[name][pad] = float("nan")
    return case


def check_forward(case):
    got = kernels().linformer_attention(**on_device(case)).cpu()
    want = ref.linformer_attention(**case)
    assert got.dtype == want.dtype and not got.isnan().any()
    assert_close(got, want, case["q"].dtype)
    return got


def check_backward(case, seed=7, grad_out=None):
    q = case["q"]
    if grad_out is None:
        grad_out = randn(*q.shape, dtype=q.dtype, seed=seed)
    got = kernels().linformer_attention_backward(grad_out.to(TRITON_DEVICE), **on_device(case))
    want = ref.linformer_attention_backward(grad_out, **case)
    for name, g, w in zip(GRAD_NAMES, got, want, strict=True):
        assert g.dtype == w.dtype and g.is_contiguous(), name
        assert not g.isnan().any(), name
        try:
            assert_close(g, w, q.dtype, gemm=True)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    return [g.cpu() for g in got]


# (B, Hh, Nq, N, d, r, Nmax, dtype, masked)
CASES = [
    (2, 2, 19, 23, 13, 11, 30, torch.float32, True),
    (1, 2, 7, 40, 16, 16, 40, torch.float32, False),
    (2, 1, 33, 17, 8, 5, 20, torch.bfloat16, True),
    (2, 2, 5, 9, 4, 3, 12, torch.float16, True),
    (1, 1, 1, 7, 5, 20, 9, torch.float32, True),  # one query, r > N
    (2, 1, 6, 7, 5, 4, 9, torch.float64, True),
]


def case_id(c):
    B, H, Nq, N, d, r, width, dtype, masked = c
    return f"B{B}-H{H}-Nq{Nq}-N{N}-d{d}-r{r}-W{width}-{str(dtype)[6:]}{'-masked' if masked else ''}"


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_forward(c):
    B, H, Nq, N, d, r, width, dtype, masked = c
    check_forward(make_case(B, H, Nq, N, d, r, width, dtype, masked=masked))


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_backward(c):
    B, H, Nq, N, d, r, width, dtype, masked = c
    check_backward(make_case(B, H, Nq, N, d, r, width, dtype, masked=masked, seed=2))


def test_matches_float64_oracle():
    case = make_case(2, 1, 6, 9, 5, 4, 11, torch.float32, seed=3)
    got = kernels().linformer_attention(**on_device(case)).cpu()
    torch.testing.assert_close(got.double(), oracle_linformer(**case), atol=1e-5, rtol=1e-5)


def test_identity_projection_equals_sdpa():
    """r = N and E = F = identity, no mask: plain attention (forward and backward)."""
    B, H, N, d = 1, 2, 18, 8
    q, k, v = (randn(B, H, N, d, seed=s) for s in (4, 5, 6))
    eye = torch.eye(N)
    case = dict(q=q, k=k, v=v, E=eye, F=eye, key_padding_mask=None, scale=d**-0.5)
    got = kernels().linformer_attention(**on_device(case)).cpu()
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad_out = randn(B, H, N, d, seed=7)
    F.scaled_dot_product_attention(*leaves).backward(grad_out)
    grads = kernels().linformer_attention_backward(grad_out.to(TRITON_DEVICE), **on_device(case))
    for g, leaf in zip(grads[:3], leaves, strict=True):
        torch.testing.assert_close(g.cpu(), leaf.grad, atol=1e-4, rtol=1e-4)


def test_padding_changes_nothing():
    """Appending padded keys (garbage values, arbitrary E/F columns) changes no output nor gradient."""
    case = make_case(2, 2, 9, 11, 6, 5, 16, torch.float32, masked=False, seed=8)
    padded = dict(case)
    extra = 4
    B, H, N, d = case["k"].shape
    for name in ("k", "v"):
        padded[name] = torch.cat([case[name], torch.full((B, H, extra, d), 1e30)], dim=2)
    padded["key_padding_mask"] = torch.arange(N + extra).expand(B, N + extra) >= N
    for name in ("E", "F"):
        padded[name] = case[name].clone()
        padded[name][:, N:] = 123.0
    want = kernels().linformer_attention(**on_device(case)).cpu()
    got = kernels().linformer_attention(**on_device(padded)).cpu()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    grad_out = randn(*case["q"].shape, seed=9)
    g_ref = kernels().linformer_attention_backward(grad_out.to(TRITON_DEVICE), **on_device(case))
    g_pad = kernels().linformer_attention_backward(grad_out.to(TRITON_DEVICE), **on_device(padded))
    torch.testing.assert_close(g_pad[0].cpu(), g_ref[0].cpu(), atol=1e-6, rtol=1e-6)
    for a, b in zip(g_pad[1:3], g_ref[1:3], strict=True):
        torch.testing.assert_close(a.cpu()[:, :, :N], b.cpu(), atol=1e-6, rtol=1e-6)
        assert not a.cpu()[:, :, N:].any()
    for a, b in zip(g_pad[3:], g_ref[3:], strict=True):
        torch.testing.assert_close(a.cpu()[:, :N], b.cpu()[:, :N], atol=1e-6, rtol=1e-6)
        assert not a.cpu()[:, N:].any()


def test_fully_padded_row_gives_zeros():
    case = make_case(2, 2, 5, 6, 4, 3, 8, torch.float32, seed=10)  # the last row is all padding
    out = check_forward(case)
    assert not out[-1].any()
    _, grad_k, grad_v, _, _ = check_backward(case)
    assert not grad_k[-1].any() and not grad_v[-1].any()


def test_fp16_scaled_inputs_stay_finite():
    case = make_case(1, 2, 8, 10, 8, 4, 12, torch.float16, seed=11)
    for name in ("q", "k", "v"):
        case[name] = (case[name].float() * 100).half()
    out = kernels().linformer_attention(**on_device(case)).cpu()
    assert out.isfinite().all()
    grads = kernels().linformer_attention_backward(randn(*out.shape, dtype=torch.float16, seed=12).to(TRITON_DEVICE),
                                                   **on_device(case))
    for name, g in zip(GRAD_NAMES, grads, strict=True):
        assert g.cpu().isfinite().all(), name


def test_strided_inputs():
    """q, k, v as [B, N, Hh, d] transposed views, E transposed storage, a strided grad_out."""
    B, H, Nq, N, d, r = 2, 2, 7, 9, 6, 5
    case = make_case(B, H, Nq, N, d, r, 12, torch.float32, seed=13)
    for name in ("q", "k", "v"):
        case[name] = case[name].transpose(1, 2).contiguous().transpose(1, 2)
    case["E"] = case["E"].t().contiguous().t()
    assert not case["q"].is_contiguous() and not case["E"].is_contiguous()
    check_forward(case)
    grad_out = randn(B, Nq, H, d, seed=14).transpose(1, 2)
    check_backward(case, grad_out=grad_out)


def test_empty_queries_and_keys():
    case = make_case(1, 2, 0, 5, 4, 3, 6, torch.float32, masked=False, seed=15)
    assert check_forward(case).shape == (1, 2, 0, 4)
    grads = check_backward(case)
    assert not any(g.any() for g in grads)
    case = make_case(1, 2, 4, 1, 4, 3, 6, torch.float32, masked=False, seed=16)
    case["k"], case["v"] = case["k"][:, :, :0], case["v"][:, :, :0]  # N = 0: kp = vp = 0
    assert not check_forward(case).any()
    check_backward(case)


def test_deterministic():
    case = on_device(make_case(2, 2, 9, 10, 6, 5, 12, torch.float32, seed=17))
    first = kernels().linformer_attention(**case)
    assert torch.equal(first, kernels().linformer_attention(**case))
    grad_out = randn(2, 2, 9, 6, seed=18).to(TRITON_DEVICE)
    g1 = kernels().linformer_attention_backward(grad_out, **case)
    g2 = kernels().linformer_attention_backward(grad_out, **case)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.parametrize("op", ['linformer_attention', 'linformer_attention_backward'])
def test_op_cases(op):
    """The shared argument sets of the op tests (helpers.op_cases) through the launcher."""
    assert_launcher_matches_reference(op)
