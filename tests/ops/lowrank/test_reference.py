"""The low-rank reference (``mtmerge/reference/lowrank.py``) against docs/lowrank.md's text, written
independently as loops (tests/ops/lowrank/helpers.py), and the invariants docs/lowrank.md promises:
Linformer with ``r = N`` and ``E = F = I`` is plain attention; padded positions change nothing;
fully masked rows give zeros, not NaN; fp16 inputs scaled x100 stay finite; ``multi_lora`` is a
per-adapter loop where id -1 adds nothing; LAMA's attention rows sum to 1 over the real tokens;
and the hand-written backwards against ``torch.autograd`` on the forward references in float64.
No kernel runs here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from mtmerge.reference import lowrank as ref
from tests.ops.lowrank.helpers import (
    DTYPES,
    assert_close,
    assert_same,
    gen,
    grads_on,
    make_lama,
    make_linformer,
    make_lora,
    oracle_lama,
    oracle_linformer,
    oracle_lora,
    randn,
)

D = torch.float64


def _autograd(fn, kwargs: dict, names: tuple[str, ...], grads: tuple) -> list:
    """``torch.autograd.grad`` of ``fn(**kwargs)`` wrt the inputs ``names`` for output grads ``grads``."""
    leaves = grads_on(kwargs, names)
    out = fn(**leaves)
    out = out if isinstance(out, tuple) else (out,)
    return list(torch.autograd.grad(out, [leaves[n] for n in names], grads, allow_unused=True))


# ---- lama_pool --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*DTYPES, D])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("context", [False, True])
def test_lama_matches_the_oracle(dtype, masked, context):
    kw = make_lama(3, 6, 5, 4, dtype, seed=10, masked=masked, context=context)
    attn, pooled = ref.lama_pool(**kw)
    want_attn, want_pooled = oracle_lama(**kw)
    assert attn.dtype == ref.compute_dtype(dtype) and pooled.dtype == dtype
    assert_close(attn, want_attn, ref.compute_dtype(dtype))
    assert_close(pooled, want_pooled, dtype)


@pytest.mark.parametrize("context", [False, True])
def test_lama_rows_sum_to_one_over_real_tokens(context):
    kw = make_lama(3, 9, 4, 5, seed=11, masked=True, context=context)
    attn, _ = ref.lama_pool(**kw)
    mask = kw["mask"]
    assert not torch.isnan(attn).any()
    assert_same(attn * ~mask[:, None, :], torch.zeros_like(attn))  # exactly 0 at padding
    sums = attn.sum(-1)
    has_real = mask.any(-1)
    torch.testing.assert_close(sums[has_real], torch.ones_like(sums[has_real]))
    assert_same(sums[~has_real], torch.zeros_like(sums[~has_real]))  # a fully masked row: zeros, not NaN


@pytest.mark.parametrize("context", [False, True])
def test_lama_appending_padded_tokens_changes_nothing(context):
    kw = make_lama(2, 5, 4, 3, D, seed=12, context=context)
    attn, pooled = ref.lama_pool(**kw)
    extra = randn(2, 4, 4, dtype=D, seed=13, scale=50.0)
    h = torch.cat([kw["h"], extra], dim=1)
    mask = torch.cat([torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    attn2, pooled2 = ref.lama_pool(h, kw["P"], kw["Q"], mask, kw["context"])
    torch.testing.assert_close(attn2[..., :5], attn, rtol=1e-14, atol=1e-14)
    assert_same(attn2[..., 5:], torch.zeros_like(attn2[..., 5:]))
    torch.testing.assert_close(pooled2, pooled, rtol=1e-14, atol=1e-14)


def test_lama_fully_masked_row_gives_zeros_with_and_without_context():
    for context in (False, True):
        kw = make_lama(2, 4, 3, 2, seed=14, context=context)
        mask = torch.zeros(2, 4, dtype=torch.bool)
        attn, pooled = ref.lama_pool(kw["h"], kw["P"], kw["Q"], mask, kw["context"])
        assert_same(attn, torch.zeros_like(attn))
        assert_same(pooled, torch.zeros_like(pooled))


def test_lama_default_context_is_the_masked_mean():
    kw = make_lama(2, 6, 4, 3, D, seed=15, masked=True)
    mask = kw["mask"]
    real = mask.to(D)
    mean = (kw["h"] * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp_min(1)
    got = ref.lama_pool(**kw)
    want = ref.lama_pool(kw["h"], kw["P"], kw["Q"], mask, mean)
    torch.testing.assert_close(got[0], want[0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-14, atol=1e-14)


def test_lama_zero_affinity_is_uniform():
    """``u = 0`` (a zero context) makes every ``z = 0``, so ``f = 0`` (the eps keeps it finite) and the
    attention is uniform over the real tokens."""
    kw = make_lama(1, 5, 3, 2, seed=16, context=True)
    mask = torch.tensor([[True, False, True, True, False]])
    attn, _ = ref.lama_pool(kw["h"], kw["P"], kw["Q"], mask, torch.zeros(1, 3))
    want = mask[:, None, :].float().expand(1, 2, 5) / 3
    torch.testing.assert_close(attn, want)


@pytest.mark.parametrize("context", [False, True])
def test_lama_fp16_scaled_by_100_stays_finite(context):
    kw = make_lama(2, 6, 5, 3, torch.float16, seed=17, masked=True, context=context)
    kw = {k: v * 100 if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    attn, pooled = ref.lama_pool(**kw)
    assert torch.isfinite(attn).all() and torch.isfinite(pooled).all()


def test_lama_empty_sequence():
    attn, pooled = ref.lama_pool(**make_lama(2, 0, 3, 2, seed=18))
    assert attn.shape == (2, 2, 0) and pooled.shape == (2, 2, 3)
    assert_same(pooled, torch.zeros_like(pooled))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("context", [False, True])
def test_lama_backward_matches_autograd(masked, context):
    kw = make_lama(3, 6, 4, 3, D, seed=19, masked=masked, context=context)
    grad_attn, grad_pooled = randn(3, 3, 6, dtype=D, seed=20), randn(3, 3, 4, dtype=D, seed=21)
    names = ("h", "P", "Q", "context") if context else ("h", "P", "Q")
    want = _autograd(ref.lama_pool, kw, names, (grad_attn, grad_pooled))
    got = ref.lama_pool_backward(grad_attn, grad_pooled, **kw)
    for g, w in zip(got, want, strict=False):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if not context:
        assert got[3].shape == (0,)


def test_lama_backward_of_each_output_alone():
    kw = make_lama(2, 5, 3, 2, D, seed=22, masked=True)
    zeros_attn, zeros_pooled = torch.zeros(2, 2, 5, dtype=D), torch.zeros(2, 2, 3, dtype=D)
    for grads in ((randn(2, 2, 5, dtype=D, seed=23), zeros_pooled), (zeros_attn, randn(2, 2, 3, dtype=D, seed=24))):
        want = _autograd(ref.lama_pool, kw, ("h", "P", "Q"), grads)
        got = ref.lama_pool_backward(*grads, **kw)
        for g, w in zip(got[:3], want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lama_backward_dtypes_follow_the_inputs(dtype):
    kw = make_lama(2, 4, 3, 2, dtype, seed=25, context=True)
    grads = ref.lama_pool_backward(randn(2, 2, 4, seed=26), randn(2, 2, 3, dtype=dtype, seed=27), **kw)
    assert [g.dtype for g in grads] == [dtype] * 4
    assert [tuple(g.shape) for g in grads] == [(2, 4, 3), (3, 2), (3, 2), (2, 3)]


# ---- linformer_attention ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*DTYPES, D])
@pytest.mark.parametrize("masked", [False, True])
def test_linformer_matches_the_oracle(dtype, masked):
    kw = make_linformer(2, 2, 4, 5, 3, 3, 7, dtype, seed=30, masked=masked)
    out = ref.linformer_attention(**kw)
    assert out.dtype == dtype and out.shape == kw["q"].shape
    assert_close(out, oracle_linformer(**kw), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_linformer_with_identity_projections_is_sdpa(dtype):
    n = 6
    kw = make_linformer(2, 3, 5, n, 4, n, n, dtype, seed=31)
    eye = torch.eye(n, dtype=dtype)
    out = ref.linformer_attention(kw["q"], kw["k"], kw["v"], eye, eye, None, kw["scale"])
    want = F.scaled_dot_product_attention(kw["q"], kw["k"], kw["v"])
    torch.testing.assert_close(out, want, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_linformer_appending_padded_positions_changes_nothing():
    """Padded keys/values of any value (huge ones too) and arbitrary E/F columns for them."""
    kw = make_linformer(2, 2, 4, 5, 3, 3, 5, D, seed=32, masked=True)
    out = ref.linformer_attention(**kw)
    extra = 3
    k = torch.cat([kw["k"], randn(2, 2, extra, 3, dtype=D, seed=33, scale=1e4)], dim=2)
    v = torch.cat([kw["v"], randn(2, 2, extra, 3, dtype=D, seed=34, scale=1e4)], dim=2)
    E = torch.cat([kw["E"], randn(3, extra, dtype=D, seed=35)], dim=1)
    Fm = torch.cat([kw["F"], randn(3, extra, dtype=D, seed=36)], dim=1)
    mask = torch.cat([kw["key_padding_mask"], torch.ones(2, extra, dtype=torch.bool)], dim=1)
    out2 = ref.linformer_attention(kw["q"], k, v, E, Fm, mask, kw["scale"])
    torch.testing.assert_close(out2, out, rtol=1e-14, atol=1e-14)


def test_linformer_padded_values_never_matter():
    """Changing the values at padded positions changes nothing (fairseq's projection would)."""
    kw = make_linformer(2, 2, 3, 6, 4, 2, 8, seed=37, masked=True)
    pad = kw["key_padding_mask"][:, None, :, None]
    noisy = {**kw, "k": torch.where(pad, torch.full_like(kw["k"], 1e3), kw["k"]),
             "v": torch.where(pad, torch.full_like(kw["v"], float("inf")), kw["v"])}
    assert_same(ref.linformer_attention(**noisy), ref.linformer_attention(**kw))


def test_linformer_fully_padded_row_gives_zeros():
    kw = make_linformer(2, 2, 3, 4, 5, 3, 6, seed=38, masked=True)  # the last row is all padding
    out = ref.linformer_attention(**kw)
    assert not torch.isnan(out).any()
    assert_same(out[-1], torch.zeros_like(out[-1]))
    assert out[0].abs().sum() > 0


def test_linformer_uses_only_the_first_n_columns():
    kw = make_linformer(1, 2, 3, 4, 5, 3, 9, seed=39)
    changed = {**kw, "E": kw["E"].clone(), "F": kw["F"].clone()}
    changed["E"][:, 4:] = 7.0
    changed["F"][:, 4:] = -7.0
    assert_same(ref.linformer_attention(**changed), ref.linformer_attention(**kw))


def test_linformer_fp16_scaled_by_100_stays_finite():
    kw = make_linformer(2, 2, 5, 8, 16, 4, 8, torch.float16, seed=40, masked=True)
    kw = {**kw, "q": kw["q"] * 100, "k": kw["k"] * 100, "v": kw["v"] * 100}
    out = ref.linformer_attention(**kw)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("masked", [False, True])
def test_linformer_backward_matches_autograd(masked):
    kw = make_linformer(2, 2, 4, 5, 3, 3, 7, D, seed=41, masked=masked)
    grad_out = randn(2, 2, 4, 3, dtype=D, seed=42)
    want = _autograd(ref.linformer_attention, kw, ("q", "k", "v", "E", "F"), (grad_out,))
    got = ref.linformer_attention_backward(grad_out, **kw)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert_same(got[3][:, 5:], torch.zeros(3, 2, dtype=D))  # columns past N get no gradient
    if masked:
        pad = kw["key_padding_mask"][:, None, :, None].expand_as(got[1])
        assert (got[1][pad] == 0).all() and (got[2][pad] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_linformer_backward_dtypes_follow_the_inputs(dtype):
    kw = make_linformer(1, 2, 3, 4, 5, 2, 6, dtype, seed=43)
    grads = ref.linformer_attention_backward(randn(1, 2, 3, 5, dtype=dtype, seed=44), **kw)
    assert [g.dtype for g in grads] == [dtype] * 5
    assert [g.shape for g in grads] == [kw[n].shape for n in ("q", "k", "v", "E", "F")]


# ---- multi_lora ---------------------------------------------------------------------------------------


def _per_adapter_loop(x, A, B, adapter_ids, scale, base):
    """float64: for each adapter, its tokens through ``x A^T B^T``, scaled, added to the base."""
    y = torch.zeros(x.shape[0], B.shape[1], dtype=D) if base is None else base.double().clone()
    for g in range(A.shape[0]):
        rows = adapter_ids == g
        y[rows] += float(scale[g]) * (x[rows].double() @ A[g].double().T @ B[g].double().T)
    return y


@pytest.mark.parametrize("dtype", [*DTYPES, D])
@pytest.mark.parametrize("base", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_lora_matches_the_oracle(dtype, base, id_dtype):
    kw = make_lora(11, 7, 5, 3, 4, dtype, seed=50, base=base, id_dtype=id_dtype)
    y = ref.multi_lora(**kw)
    assert y.dtype == dtype and y.shape == (11, 5)
    assert_close(y, oracle_lora(**kw), dtype, gemm=True)
    assert_close(y, _per_adapter_loop(**kw), dtype, gemm=True)


@pytest.mark.parametrize(("rank", "in_features", "out_features"), [(1, 1, 1), (1, 13, 7), (5, 9, 3), (16, 33, 17)])
def test_lora_ranks_and_odd_sizes(rank, in_features, out_features):
    kw = make_lora(10, in_features, out_features, rank, 3, seed=51)
    assert_close(ref.multi_lora(**kw), oracle_lora(**kw), torch.float32, gemm=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_id_minus_one_adds_nothing(dtype):
    kw = make_lora(8, 6, 4, 2, 3, dtype, seed=52, unrouted=0.0)
    kw["adapter_ids"][::2] = -1
    y = ref.multi_lora(**kw)
    assert_same(y[::2], kw["base"][::2])
    none = {**kw, "adapter_ids": torch.full_like(kw["adapter_ids"], -1)}
    assert_same(ref.multi_lora(**none), kw["base"])
    assert_same(ref.multi_lora(**{**none, "base": None}), torch.zeros(8, 4, dtype=dtype))


def test_lora_out_of_range_ids_are_treated_as_minus_one():
    kw = make_lora(6, 5, 4, 2, 2, seed=53, unrouted=0.0)
    bad = {**kw, "adapter_ids": torch.tensor([0, 2, 1, -3, 99, 1])}
    minus = {**kw, "adapter_ids": torch.tensor([0, -1, 1, -1, -1, 1])}
    assert_same(ref.multi_lora(**bad), ref.multi_lora(**minus))


def test_lora_scale_is_per_adapter():
    kw = make_lora(9, 5, 4, 2, 3, D, seed=54, base=False, unrouted=0.0)
    one = ref.multi_lora(**{**kw, "scale": torch.ones(3)})
    y = ref.multi_lora(**kw)
    ids = kw["adapter_ids"]
    torch.testing.assert_close(y, one * kw["scale"].double()[ids][:, None])


def test_lora_keeps_the_intermediate_in_fp32():
    """bf16 inputs: the result is the float64 oracle rounded once, not a bf16 round trip of ``A x``."""
    g = gen(55)
    x = (torch.rand(16, 64, generator=g) + 1).bfloat16()
    A = (torch.rand(1, 4, 64, generator=g) + 1).bfloat16()
    B = torch.ones(1, 1, 4).bfloat16()
    ids = torch.zeros(16, dtype=torch.int64)
    y = ref.multi_lora(x, A, B, ids, torch.ones(1), None)
    want = oracle_lora(x, A, B, ids, torch.ones(1), None).to(torch.bfloat16)
    assert_same(y, want)
    rounded = ((x.float() @ A[0].float().T).bfloat16().float() @ B[0].float().T).bfloat16()
    assert (rounded != want).any()  # the test can tell the two apart


def test_lora_empty():
    kw = make_lora(0, 4, 3, 2, 2, seed=56)
    assert ref.multi_lora(**kw).shape == (0, 3)
    none = make_lora(4, 4, 3, 2, 0, seed=57)
    assert_same(ref.multi_lora(**none), none["base"])


@pytest.mark.parametrize("rank", [1, 3])
def test_lora_backward_matches_autograd(rank):
    kw = make_lora(9, 6, 5, rank, 3, D, seed=58, base=False)
    grad_out = randn(9, 5, dtype=D, seed=59)
    want = _autograd(lambda **k: ref.multi_lora(base=None, **k), {k: v for k, v in kw.items() if k != "base"},
                     ("x", "A", "B"), (grad_out,))
    got = ref.multi_lora_backward(grad_out, kw["x"], kw["A"], kw["B"], kw["adapter_ids"], kw["scale"])
    for g, w in zip(got, want, strict=True):
        w = torch.zeros_like(g) if w is None else w
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert_same(got[0][kw["adapter_ids"] == -1], torch.zeros_like(got[0][kw["adapter_ids"] == -1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_backward_dtypes_follow_the_inputs(dtype):
    kw = make_lora(5, 4, 3, 2, 2, dtype, seed=60)
    grads = ref.multi_lora_backward(randn(5, 3, dtype=dtype, seed=61), kw["x"], kw["A"], kw["B"],
                                    kw["adapter_ids"], kw["scale"])
    assert [g.dtype for g in grads] == [dtype] * 3
    assert [g.shape for g in grads] == [kw[n].shape for n in ("x", "A", "B")]


def test_compute_dtype():
    assert ref.compute_dtype(torch.float64) == D
    for dtype in DTYPES:
        assert ref.compute_dtype(dtype) == torch.float32
    assert math.isclose(ref.NORM_EPS, 1e-12)
