"""Gradients of the low-rank family through the public API, ``torch.autograd.gradcheck`` in
float64: ``lama_pool`` wrt ``h``, ``P``, ``Q`` and ``context`` (both outputs; with and without a
mask, with and without a context, a fully masked row), ``linformer_attention`` wrt ``q``, ``k``,
``v``, ``E`` and ``F`` (with and without padding, ``N`` below E's width, a fully padded row), and
``multi_lora`` wrt ``x``, ``A``, ``B`` and ``base`` (rank 1 and odd sizes, id -1, batched ``x``).
On CPU this runs the C++ kernels (forward and the ``*_backward`` ops), on CUDA the Triton ones."""

from __future__ import annotations

import pytest
import torch

import mtmerge
from mtmerge.reference import lowrank as ref
from tests.ops import family_checks as checks
from tests.ops.lowrank.helpers import DEVICES, make_lama, make_linformer, make_lora, randn

pytestmark = pytest.mark.usefixtures("cpp_kernels")
D = torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("context", [False, True])
def test_gradcheck_lama_pool(device, masked, context):
    kw = make_lama(3, 5, 4, 3, D, seed=100, masked=masked, context=context)
    names = ["h", "P", "Q"] + (["context"] if context else [])
    leaves = [checks.leaf(kw[n], device) for n in names]
    mask = None if kw["mask"] is None else kw["mask"].to(device)

    def fn(h, P, Q, *ctx):
        out = mtmerge.lama_pool(h, P, Q, mask=mask, context=ctx[0] if ctx else None)
        return out.attn, out.pooled

    checks.assert_gradcheck(fn, leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_linformer_attention(device, masked):
    kw = make_linformer(2, 2, 3, 4, 3, 2, 6, D, seed=110, masked=masked)  # N = 4 < Nmax = 6
    leaves = [checks.leaf(kw[n], device) for n in ("q", "k", "v", "E", "F")]
    mask = None if kw["key_padding_mask"] is None else kw["key_padding_mask"].to(device)

    def fn(q, k, v, E, F):
        return mtmerge.linformer_attention(q, k, v, E, F, key_padding_mask=mask)

    checks.assert_gradcheck(fn, leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_linformer_attention_with_scale(device):
    kw = make_linformer(1, 1, 2, 5, 2, 3, 5, D, seed=111)
    leaves = [checks.leaf(kw[n], device) for n in ("q", "k", "v", "E", "F")]
    checks.assert_gradcheck(lambda *t: mtmerge.linformer_attention(*t, scale=2.0), leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("rank", "in_features", "out_features", "with_base"),
                         [(1, 5, 3, True), (3, 4, 7, False), (2, 1, 1, True)])
def test_gradcheck_multi_lora(device, rank, in_features, out_features, with_base):
    kw = make_lora(7, in_features, out_features, rank, 3, D, seed=120, base=with_base, unrouted=0.3)
    names = ["x", "A", "B"] + (["base"] if with_base else [])
    leaves = [checks.leaf(kw[n], device) for n in names]
    ids, scale = kw["adapter_ids"].to(device), kw["scale"].to(device)

    def fn(x, A, B, *base):
        return mtmerge.multi_lora(x, A, B, ids, scale=scale, base=base[0] if base else None)

    checks.assert_gradcheck(fn, leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_multi_lora_batched_with_one_scale(device):
    kw = make_lora(6, 4, 3, 2, 2, D, seed=121)
    leaves = [checks.leaf(t, device) for t in (kw["x"].reshape(2, 3, 4), kw["A"], kw["B"], kw["base"].reshape(2, 3, 3))]
    ids = kw["adapter_ids"].reshape(2, 3).to(device)
    checks.assert_gradcheck(lambda x, A, B, base: mtmerge.multi_lora(x, A, B, ids, scale=0.7, base=base), leaves)


# ---- the autograd formulas run the backward ops -----------------------------------------------------


def test_lama_backward_runs_the_backward_op():
    kw = make_lama(2, 6, 4, 3, seed=130, masked=True, context=True)
    h, P, Q, context = (kw[n].clone().requires_grad_() for n in ("h", "P", "Q", "context"))
    out = mtmerge.lama_pool(h, P, Q, mask=kw["mask"], context=context)
    g_attn, g_pooled = randn(2, 3, 6, seed=131), randn(2, 3, 4, seed=132)
    with checks.dispatches("lama_pool_backward"):
        torch.autograd.backward([out.attn, out.pooled], [g_attn, g_pooled])
    want = ref.lama_pool_backward(g_attn, g_pooled, **kw)
    for got, expect in zip((h.grad, P.grad, Q.grad, context.grad), want, strict=True):
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


def test_lama_backward_with_one_output_used():
    """Only ``pooled`` (or only ``attn``) feeds the loss: the other output's gradient is zeros."""
    kw = make_lama(2, 5, 3, 2, D, seed=133, masked=True)
    for pick in (0, 1):
        h = kw["h"].clone().requires_grad_()
        mtmerge.lama_pool(h, kw["P"], kw["Q"], mask=kw["mask"])[pick].sum().backward()
        grads = [torch.ones(2, 2, 5, dtype=D), torch.zeros(2, 2, 3, dtype=D)]
        if pick == 1:
            grads = [torch.zeros(2, 2, 5, dtype=D), torch.ones(2, 2, 3, dtype=D)]
        torch.testing.assert_close(h.grad, ref.lama_pool_backward(*grads, **kw)[0])


def test_linformer_backward_runs_the_backward_op():
    kw = make_linformer(2, 2, 3, 5, 4, 3, 7, seed=140, masked=True)
    leaves = {n: kw[n].clone().requires_grad_() for n in ("q", "k", "v", "E", "F")}
    out = mtmerge.linformer_attention(**leaves, key_padding_mask=kw["key_padding_mask"])
    g = randn(*out.shape, seed=141)
    with checks.dispatches("linformer_attention_backward"):
        out.backward(g)
    want = ref.linformer_attention_backward(g, **kw)
    for name, expect in zip(("q", "k", "v", "E", "F"), want, strict=True):
        torch.testing.assert_close(leaves[name].grad, expect, rtol=1e-4, atol=1e-5)


def test_multi_lora_backward_runs_the_backward_op():
    kw = make_lora(9, 6, 4, 2, 3, seed=150)
    leaves = {n: kw[n].clone().requires_grad_() for n in ("x", "A", "B", "base")}
    y = mtmerge.multi_lora(leaves["x"], leaves["A"], leaves["B"], kw["adapter_ids"], scale=kw["scale"],
                           base=leaves["base"])
    g = randn(9, 4, seed=151)
    with checks.dispatches("multi_lora_backward"):
        y.backward(g)
    want = ref.multi_lora_backward(g, kw["x"], kw["A"], kw["B"], kw["adapter_ids"], kw["scale"])
    for name, expect in zip(("x", "A", "B"), want, strict=True):
        torch.testing.assert_close(leaves[name].grad, expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(leaves["base"].grad, g, rtol=0, atol=0)


def test_multi_lora_scale_gets_no_gradient():
    kw = make_lora(5, 4, 3, 2, 2, seed=152)
    scale = kw["scale"].clone().requires_grad_()
    y = mtmerge.multi_lora(kw["x"].requires_grad_(), kw["A"], kw["B"], kw["adapter_ids"], scale=scale)
    y.sum().backward()
    assert scale.grad is None and kw["x"].grad is not None
