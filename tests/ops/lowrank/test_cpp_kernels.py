"""The C++ CPU kernels of the low-rank family (csrc/lowrank/) against mtmerge.reference.lowrank:
every dtype, odd shapes, masks with fully masked rows, strided inputs, T = 0, ids -1 and out of
range, chunk/block boundaries of the kernels' work items, and the same bits on 1 and 2 threads."""

from __future__ import annotations

import math

import pytest
import torch

from mtmerge.reference import lowrank as ref
from tests.ops.lowrank.helpers import assert_close, make_lama, make_linformer, make_lora, randn

pytestmark = pytest.mark.usefixtures("cpp_kernels")

ops = torch.ops.mtmerge
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def check(got, want, dtype, *, gemm=True, scale=1.0):
    """Each output like the reference: dtype, shape, contiguity, values within tolerance."""
    got = got if isinstance(got, tuple | list) else (got,)
    want = want if isinstance(want, tuple | list) else (want,)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), (i, g.dtype, w.dtype, g.shape, w.shape)
        assert g.is_contiguous(), i
        if scale == 1.0:
            assert_close(g, w, dtype, gemm=gemm)
        else:  # sums of many products: the tolerance grows with their size
            torch.testing.assert_close(g.double(), w.double(), atol=1e-4 * scale, rtol=1e-4 * scale)


def strided(t):
    """A non-contiguous view with t's values."""
    return torch.stack([t, t], dim=-1)[..., 0]


def lama_grads(kw, seed=50):
    b, t, d = kw["h"].shape
    m = kw["P"].shape[1]
    return dict(grad_attn=randn(b, m, t, dtype=ref.compute_dtype(kw["h"].dtype), seed=seed),
                grad_pooled=randn(b, m, d, dtype=kw["h"].dtype, seed=seed + 1))


def lama_tol(dtype):
    return dict(scale=20.0) if dtype in (torch.bfloat16, torch.float16) else {}


# ---- lama_pool ------------------------------------------------------------------------------------

# (B, T, D, m): T = 0, one token, odd sizes, T crossing the kernel's 256-token chunks
LAMA_SHAPES = [(1, 0, 3, 2), (2, 1, 5, 3), (3, 7, 6, 3), (2, 300, 9, 4), (1, 513, 5, 1)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("context", [False, True])
def test_lama_matches_reference(dtype, masked, context):
    for i, shape in enumerate(LAMA_SHAPES):
        kw = make_lama(*shape, dtype=dtype, seed=10 * i, masked=masked, context=context)
        check(ops.lama_pool(**kw), ref.lama_pool(**kw), dtype, **lama_tol(dtype))
        g = lama_grads(kw)
        check(ops.lama_pool_backward(**g, **kw), ref.lama_pool_backward(**g, **kw), dtype, **lama_tol(dtype))


def test_lama_fully_masked_rows_and_tiny_norms():
    kw = make_lama(3, 9, 4, 3, masked=True)
    kw["mask"][1] = False
    kw["h"][2] *= 1e-9  # z ~ 1e-9: the normalization's epsilon branch stays exact
    attn, pooled = ops.lama_pool(**kw)
    assert torch.isfinite(attn).all() and torch.isfinite(pooled).all()
    assert (attn[1] == 0).all() and (pooled[1] == 0).all() and (attn[2] == 0).all()
    check((attn, pooled), ref.lama_pool(**kw), torch.float32)
    g = lama_grads(kw)
    check(ops.lama_pool_backward(**g, **kw), ref.lama_pool_backward(**g, **kw), torch.float32, scale=10.0)


def test_lama_strided_inputs():
    kw = make_lama(2, 11, 6, 3, masked=True, context=True)
    want = ref.lama_pool(**kw)
    g = lama_grads(kw)
    want_g = ref.lama_pool_backward(**g, **kw)
    sk = {**kw, "h": strided(kw["h"]), "P": kw["P"].t().contiguous().t(), "context": strided(kw["context"]),
          "mask": strided(kw["mask"])}
    assert not sk["h"].is_contiguous() and not sk["P"].is_contiguous()
    check(ops.lama_pool(**sk), want, torch.float32)
    sg = {"grad_attn": strided(g["grad_attn"]), "grad_pooled": strided(g["grad_pooled"])}
    check(ops.lama_pool_backward(**sg, **sk), want_g, torch.float32)


def test_lama_outputs_are_fresh():
    kw = make_lama(2, 5, 4, 2, context=True)
    outs = ops.lama_pool_backward(**lama_grads(kw), **kw)
    ptrs = [t.data_ptr() for t in outs if t.numel()] + [kw["context"].data_ptr(), kw["h"].data_ptr()]
    assert len(set(ptrs)) == len(ptrs)
    no_ctx = ops.lama_pool_backward(**lama_grads(kw), **{**kw, "context": None})
    assert no_ctx[3].shape == (0,) and no_ctx[3].dtype == kw["h"].dtype


# ---- linformer_attention ------------------------------------------------------------------------

# (B, Hh, Nq, N, d, r, Nmax): N = 0, one key, odd sizes, Nq crossing the 256-query blocks,
# N crossing the 512-column blocks of grad_E, r = 1
LIN_SHAPES = [(1, 2, 3, 0, 4, 3, 5), (2, 1, 1, 1, 3, 2, 1), (2, 3, 7, 9, 5, 4, 12), (1, 2, 300, 40, 8, 16, 41),
              (1, 1, 5, 530, 4, 1, 600)]


def lin_case(shape, dtype, seed, masked):
    B, Hh, Nq, N, d, r, Nmax = shape
    kw = make_linformer(B, Hh, Nq, max(N, 1), d, r, Nmax, dtype, seed, masked=masked)
    if N == 0:  # no keys at all (the helper divides by N)
        mask = kw["key_padding_mask"]
        kw.update(k=kw["k"][:, :, :0], v=kw["v"][:, :, :0], key_padding_mask=None if mask is None else mask[:, :0])
    return kw


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_linformer_matches_reference(dtype, masked):
    for i, shape in enumerate(LIN_SHAPES):
        kw = lin_case(shape, dtype, 20 * i, masked)
        check(ops.linformer_attention(**kw), ref.linformer_attention(**kw), dtype)
        go = randn(*kw["q"].shape, dtype=dtype, seed=99)
        scale = 1.0 if dtype == torch.float64 or shape[3] < 100 else 4.0
        check(ops.linformer_attention_backward(go, **kw), ref.linformer_attention_backward(go, **kw), dtype,
              scale=scale)


def test_linformer_padding_changes_nothing_and_masked_rows_are_zero():
    kw = make_linformer(2, 2, 5, 6, 4, 3, 10, masked=True)
    out = ops.linformer_attention(**kw)
    assert (out[-1] == 0).all() and torch.isfinite(out).all()
    # padded keys/values may be anything, even inf or NaN
    k, v = kw["k"].clone(), kw["v"].clone()
    k[0, :, 4:] = float("inf")
    v[0, :, 4:] = float("nan")
    k[1], v[1] = float("nan"), float("inf")
    bad = {**kw, "k": k, "v": v}
    torch.testing.assert_close(ops.linformer_attention(**bad), out, rtol=0, atol=0)
    go = randn(*kw["q"].shape, seed=4)
    for g, w in zip(ops.linformer_attention_backward(go, **bad), ops.linformer_attention_backward(go, **kw),
                    strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_linformer_identity_projection_is_sdpa():
    q, k, v = (randn(2, 3, 8, 16, seed=s) for s in range(3))
    eye = torch.eye(8)
    out = ops.linformer_attention(q, k, v, eye, eye, None, 1 / math.sqrt(16))
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_linformer_fp16_large_inputs_stay_finite():
    kw = make_linformer(1, 2, 5, 6, 8, 3, dtype=torch.float16)
    big = {**kw, "q": kw["q"] * 100, "k": kw["k"] * 100, "v": kw["v"] * 100}
    out = ops.linformer_attention(**big)
    assert torch.isfinite(out).all()
    check(out, ref.linformer_attention(**big), torch.float16, scale=100.0)


def test_linformer_strided_inputs():
    kw = make_linformer(2, 2, 5, 6, 4, 3, 8, masked=True)
    want = ref.linformer_attention(**kw)
    go = randn(*kw["q"].shape, seed=7)
    want_g = ref.linformer_attention_backward(go, **kw)
    sk = {**kw, "q": kw["q"].transpose(1, 2).contiguous().transpose(1, 2), "k": strided(kw["k"]),
          "v": strided(kw["v"]), "E": kw["E"].t().contiguous().t(), "key_padding_mask": strided(kw["key_padding_mask"])}
    assert not sk["q"].is_contiguous() and not sk["E"].is_contiguous()
    check(ops.linformer_attention(**sk), want, torch.float32)
    check(ops.linformer_attention_backward(strided(go), **sk), want_g, torch.float32)


# ---- multi_lora -----------------------------------------------------------------------------------

# (T, in, out, r, L): T = 0, one token, odd sizes, an adapter with more than 256 tokens
# ranks 8 and 16 with groups of at most 16 tokens: the fixed-rank fused expand (odd out, any in)
LORA_SHAPES = [(0, 4, 3, 2, 2), (1, 7, 5, 3, 3), (9, 13, 11, 1, 4), (40, 33, 17, 5, 3), (600, 9, 7, 4, 2),
               (9, 35, 37, 8, 4), (12, 20, 19, 16, 3), (50, 18, 70, 16, 2)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("base", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_lora_matches_reference(dtype, base, id_dtype):
    for i, (T, fin, fout, r, L) in enumerate(LORA_SHAPES):
        kw = make_lora(T, fin, fout, r, L, dtype, seed=30 * i, base=base, id_dtype=id_dtype)
        check(ops.multi_lora(**kw), ref.multi_lora(**kw), dtype)
        kw.pop("base")
        go = randn(T, fout, dtype=dtype, seed=31 * i)
        check(ops.multi_lora_backward(go, **kw), ref.multi_lora_backward(go, **kw), dtype,
              scale=1.0 if T < 100 or dtype == torch.float64 else 4.0)


def test_lora_unrouted_and_out_of_range_ids():
    kw = make_lora(12, 6, 5, 2, 3, unrouted=0.0)
    kw["adapter_ids"] = torch.tensor([-1, 0, 3, 1, -7, 2, 99, 0, -1, 1, 2, 2**40])
    y = ops.multi_lora(**kw)
    want = ref.multi_lora(**kw)  # the reference treats ids outside [0, L) as -1
    check(y, want, torch.float32)
    for t in (0, 2, 4, 6, 8, 11):
        assert torch.equal(y[t], kw["base"][t])
    kw.pop("base")
    go = randn(12, 5, seed=3)
    got = ops.multi_lora_backward(go, **kw)
    check(got, ref.multi_lora_backward(go, **kw), torch.float32)
    assert (got[0][[0, 2, 4, 6, 8, 11]] == 0).all()


def test_lora_all_unrouted_returns_a_copy_of_base():
    kw = make_lora(5, 4, 3, 2, 2, unrouted=1.0)
    y = ops.multi_lora(**kw)
    assert torch.equal(y, kw["base"]) and y.data_ptr() != kw["base"].data_ptr()
    kw.pop("base")
    gx, gA, gB = ops.multi_lora_backward(randn(5, 3, seed=1), **kw)
    assert (gx == 0).all() and (gA == 0).all() and (gB == 0).all()


def test_lora_strided_inputs():
    kw = make_lora(10, 6, 5, 3, 3, id_dtype=torch.int32)
    want = ref.multi_lora(**kw)
    sk = {**kw, "x": strided(kw["x"]), "A": kw["A"].transpose(1, 2).contiguous().transpose(1, 2),
          "B": strided(kw["B"]), "adapter_ids": strided(kw["adapter_ids"]), "base": strided(kw["base"])}
    assert not sk["x"].is_contiguous() and not sk["A"].is_contiguous()
    check(ops.multi_lora(**sk), want, torch.float32)
    kw.pop("base")
    sk.pop("base")
    go = randn(10, 5, seed=2)
    check(ops.multi_lora_backward(strided(go), **sk), ref.multi_lora_backward(go, **kw), torch.float32)


# ---- determinism ----------------------------------------------------------------------------------


def run_all(dtype):
    lama = make_lama(3, 600, 24, 4, dtype, seed=1, masked=True)
    lin = make_linformer(2, 3, 600, 700, 8, 16, 700, dtype, seed=2, masked=True)
    lora = make_lora(700, 24, 20, 4, 3, dtype, seed=3)
    go_lin = randn(*lin["q"].shape, dtype=dtype, seed=4)
    go_lora = randn(700, 20, dtype=dtype, seed=5)
    no_base = {k: v for k, v in lora.items() if k != "base"}
    return (*ops.lama_pool(**lama), *ops.lama_pool_backward(**lama_grads(lama), **lama),
            ops.linformer_attention(**lin), *ops.linformer_attention_backward(go_lin, **lin),
            ops.multi_lora(**lora), *ops.multi_lora_backward(go_lora, **no_base))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_bits_on_1_and_2_threads(dtype):
    results = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        results.append(run_all(dtype))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
