"""``LAMAPooling``, ``LinformerSelfAttention`` and ``MultiLoRALinear`` (mtmerge/nn/lowrank.py,
mtmerge/nn/multi_lora.py):
outputs and every parameter's gradient equal a plain PyTorch reimplementation written from
DESIGN.md ("Low-rank attention semantics"); initialization is deterministic; a few SGD steps
lower a loss; ``MultiLoRALinear.from_peft`` equals PEFT's mixed-adapter batch on adapters saved
by the real peft package (tests/peers/peft_lora.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from mtmerge.nn import LAMAPooling, LinformerSelfAttention, MultiLoRALinear
from mtmerge.ops.lowrank import LamaOutput
from tests.peers import peft_lora

TOL = {torch.float64: {"atol": 1e-10, "rtol": 1e-9}, torch.float32: {"atol": 2e-5, "rtol": 2e-5}}
DTYPES = [torch.float64, torch.float32]


def _close(actual, expected, dtype, what=""):
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def _sgd_lowers(module, loss_fn, steps=8, lr=0.05):
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    final = float(loss_fn().detach())
    assert final < 0.9 * first, (first, final)


# ---- LAMA -------------------------------------------------------------------------------------------


def plain_lama(h, P, Q, mask=None, context=None):
    """(attn [B,m,T], pooled [B,m,D]) from the text: c = masked mean (or context),
    f = normalize(tanh((P^T c) * (Q^T h_t))), masked softmax over T, attn @ h."""
    real = torch.ones(h.shape[:2], dtype=torch.bool) if mask is None else mask
    if context is None:
        w = real.to(h.dtype)[..., None]
        context = (h * w).sum(1) / w.sum(1).clamp_min(1)
    z = torch.tanh((context @ P)[:, None, :] * (h @ Q))
    f = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1e-12)
    logits = f.transpose(1, 2).masked_fill(~real[:, None, :], -math.inf)
    attn = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return attn, attn @ h


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given_context", [False, True])
def test_lama_matches_plain(dtype, given_context):
    layer = LAMAPooling(12, 4, seed=1, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(3, 9, 12, generator=gen, dtype=dtype, requires_grad=True)
    mask = torch.rand(3, 9, generator=gen) > 0.3
    mask[2] = False  # a row without real tokens: zeros, not NaN
    context = torch.randn(3, 12, generator=gen, dtype=dtype, requires_grad=True) if given_context else None
    out = layer(h, mask, context)
    assert isinstance(out, LamaOutput)
    attn, pooled = plain_lama(h, layer.P, layer.Q, mask, context)
    _close(out.attn, attn, dtype, "attn")
    _close(out.pooled, pooled, dtype, "pooled")
    assert not out.pooled[2].any() and not out.attn[2].any()
    grad_attn = torch.randn(attn.shape, generator=gen, dtype=dtype)
    grad_pooled = torch.randn(pooled.shape, generator=gen, dtype=dtype)
    params = [h, layer.P, layer.Q] + ([context] if given_context else [])
    ours = _grads((out.attn * grad_attn).sum() + (out.pooled * grad_pooled).sum(), params)
    ref = _grads((attn * grad_attn).sum() + (pooled * grad_pooled).sum(), params)
    for name, a, b in zip(["h", "P", "Q", "context"], ours, ref, strict=False):
        _close(a, b, dtype, f"grad {name}")


def test_lama_init_deterministic_and_trains():
    a, b = LAMAPooling(8, 3, seed=5), LAMAPooling(8, 3, seed=5)
    assert torch.equal(a.P, b.P) and torch.equal(a.Q, b.Q) and not torch.equal(a.P, a.Q)
    assert "dim=8, heads=3" in repr(a)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(4, 10, 8, generator=gen)
    target = torch.randn(4, 3, 8, generator=gen)
    _sgd_lowers(a, lambda: F.mse_loss(a(h).pooled, target), steps=30, lr=2.0)
    with pytest.raises(ValueError):
        LAMAPooling(0, 3)


# ---- Linformer --------------------------------------------------------------------------------------


def plain_linformer(layer, x, key_padding_mask=None):
    """The module from the text: projections, padded keys/values zeroed, E k and F v, softmax
    attention over the k projected keys, output projection."""
    bsz, n, _ = x.shape

    def heads(t):
        return t.reshape(bsz, n, layer.heads, layer.head_dim).transpose(1, 2)

    q, k, v = heads(layer.to_q(x)), heads(layer.to_k(x)), heads(layer.to_v(x))
    if key_padding_mask is not None:
        keep = (~key_padding_mask).to(x.dtype)[:, None, :, None]
        k, v = k * keep, v * keep
    E = layer.E[:, :n]
    F_ = E if layer.F is None else layer.F[:, :n]
    kp, vp = torch.einsum("rn,bhnd->bhrd", E, k), torch.einsum("rn,bhnd->bhrd", F_, v)
    attn = torch.softmax(q @ kp.transpose(-1, -2) / math.sqrt(layer.head_dim), dim=-1)
    return layer.to_out((attn @ vp).transpose(1, 2).reshape(bsz, n, -1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("share_kv", [False, True])
def test_linformer_matches_plain(dtype, share_kv):
    layer = LinformerSelfAttention(16, 2, 12, 5, share_kv=share_kv, seed=3, dtype=dtype)
    assert (layer.F is None) == share_kv
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 10, 16, generator=gen, dtype=dtype, requires_grad=True)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 7:] = True
    mask[2] = True  # every key padded: the attention gives zeros (the output is to_out's bias)
    out = layer(x, key_padding_mask=mask)
    ref = plain_linformer(layer, x, mask)
    _close(out, ref, dtype, "out")
    torch.testing.assert_close(out[2], layer.to_out.bias.expand(10, -1))
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    params = [x, *layer.parameters()]
    for a, b in zip(_grads((out * grad).sum(), params), _grads((ref * grad).sum(), params), strict=True):
        _close(a, b, dtype, "grad")


def test_linformer_padding_changes_nothing_and_checks_length():
    layer = LinformerSelfAttention(8, 2, 16, 4, seed=0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 8, generator=gen, dtype=torch.float64)
    padded = torch.cat([x, 100 * torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)], dim=1)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[:, 6:] = True
    # E's columns past 6 only ever meet padded (zeroed) keys, and the real rows' outputs do not move
    torch.testing.assert_close(layer(padded, mask)[:, :6], layer(x), atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="seq_len"):
        layer(torch.randn(1, 17, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible"):
        LinformerSelfAttention(10, 3, 8, 2)


def test_linformer_dropout_path():
    """Training with dropout runs the composed torch ops; with dropout_p = 0 that path equals the
    fused op, and evaluation ignores dropout."""
    layer = LinformerSelfAttention(8, 2, 10, 3, dropout=0.5, seed=2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 8, generator=gen, dtype=torch.float64)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 4:] = True
    layer.eval()
    torch.testing.assert_close(layer(x, mask), plain_linformer(layer, x, mask))
    q = torch.randn(2, 2, 9, 4, generator=gen, dtype=torch.float64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    fused = torch.ops.mtmerge.linformer_attention(q, k, v, layer.E, layer.F, mask, 0.5)
    torch.testing.assert_close(layer._composed(q, k, v, layer.E, layer.F, mask, 0.0), fused)
    layer.train()
    torch.manual_seed(0)
    a = layer(x, mask)
    torch.manual_seed(1)
    assert not torch.allclose(a, layer(x, mask))  # dropout is on


def test_linformer_init_deterministic_and_trains():
    a, b = LinformerSelfAttention(8, 2, 12, 4, seed=9), LinformerSelfAttention(8, 2, 12, 4, seed=9)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 12, 8, generator=gen)
    target = torch.randn(4, 12, 8, generator=gen)
    _sgd_lowers(a, lambda: F.mse_loss(a(x), target), steps=20, lr=0.5)


# ---- MultiLoRALinear --------------------------------------------------------------------------------


def plain_multi_lora(layer, x, ids):
    """base(x) + s_shared B_s A_s x + s_t B_t A_t x per token (t = -1: no task adapter)."""
    flat = x.reshape(-1, x.shape[-1])
    ids = ids.reshape(-1)
    y = layer.base_layer(flat)
    if layer.shared_A is not None:
        y = y + layer.shared_scaling[0].to(x.dtype) * (flat @ layer.shared_A[0].T @ layer.shared_B[0].T)
    t = ids.clamp_min(0)
    delta = torch.einsum("tor,tri,ti->to", layer.lora_B[t], layer.lora_A[t], flat)
    y = y + (layer.scaling[t].to(x.dtype) * (ids >= 0).to(x.dtype))[:, None] * delta
    return y.reshape(*x.shape[:-1], -1)


def _lora_layer(dtype, shared=True, seed=0, **kwargs):
    linear = nn.Linear(12, 10, dtype=dtype)
    layer = MultiLoRALinear(linear, 3, 4, alpha=6.0, shared_adapter=shared, shared_r=2, seed=seed, **kwargs)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # B is zero at init: give it values so that every gradient is non-trivial
        for B in (layer.lora_B, layer.shared_B):
            if B is not None:
                B.copy_(torch.randn(B.shape, generator=gen) * 0.3)
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
def test_multi_lora_matches_plain(dtype, shared):
    layer = _lora_layer(dtype, shared, freeze_base=False)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 12, generator=gen, dtype=dtype, requires_grad=True)
    ids = torch.randint(-1, 3, (2, 5), generator=gen)
    out = layer(x, ids)
    ref = plain_multi_lora(layer, x, ids)
    _close(out, ref, dtype, "out")
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    params = [x, *layer.parameters()]
    assert len(params) == (7 if shared else 5)  # x, A, B, (shared A, B), base weight and bias
    for a, b in zip(_grads((out * grad).sum(), params), _grads((ref * grad).sum(), params), strict=True):
        _close(a, b, dtype, "grad")


def test_multi_lora_task_id_forms():
    layer = _lora_layer(torch.float64)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, 12, generator=gen, dtype=torch.float64)
    per_seq = torch.tensor([2, -1, 0])
    expected = plain_multi_lora(layer, x, per_seq[:, None].expand(3, 4))
    torch.testing.assert_close(layer(x, per_seq), expected)  # one task per sequence
    torch.testing.assert_close(layer(x, per_seq.repeat_interleave(4).to(torch.int32)), expected)  # flat [T]
    for task in (1, -1, torch.tensor(2)):  # one task for the batch
        full = torch.full((3, 4), int(task))
        torch.testing.assert_close(layer(x, task), plain_multi_lora(layer, x, full))
    # the merged weight of a task gives the same output
    merged = x @ (layer.base_layer.weight + layer.delta_weight(1)).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x, 1), merged)
    for bad in (3, -2, True, 1.5, torch.zeros(5, dtype=torch.int64)):
        with pytest.raises(ValueError):
            layer(x, bad)
    with pytest.raises(ValueError, match="adapter_ids"):
        layer(x, torch.full((3, 4), 3))


def test_multi_lora_init_freeze_and_trains():
    linear = nn.Linear(12, 10)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(0))
    before = linear(x).detach()
    layer = MultiLoRALinear(linear, 2, 3, seed=4)
    twin = MultiLoRALinear(nn.Linear(12, 10), 2, 3, seed=4)
    assert torch.equal(layer.lora_A, twin.lora_A) and torch.equal(layer.shared_A, twin.shared_A)
    assert layer.base_layer is linear and not linear.weight.requires_grad  # frozen, held not copied
    torch.testing.assert_close(layer(x, torch.tensor([0, 1, 1, 0, -1, 1])), before)  # B = 0: the base layer
    assert layer.scaling.tolist() == [1.0, 1.0] and "r=3" in repr(layer)
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    target = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    _sgd_lowers(layer, lambda: F.mse_loss(layer(x, ids), target), steps=25, lr=0.5)
    rs = MultiLoRALinear(nn.Linear(4, 4), 2, 16, alpha=5.6, use_rslora=True)
    assert rs.scaling.tolist() == pytest.approx([1.4, 1.4]) and rs.shared_scaling.item() == pytest.approx(1.4)
    scales = rs.scaling.clone()
    rs = rs.to(torch.bfloat16)  # the scales stay float32, not rounded to bf16
    assert rs.lora_A.dtype == torch.bfloat16 and rs.scaling.dtype == rs.shared_scaling.dtype == torch.float32
    assert torch.equal(rs.scaling, scales)
    rs(torch.ones(3, 4, dtype=torch.bfloat16), 1)


# ---- from_peft ----------------------------------------------------------------------------------------

needs_peft = pytest.mark.skipif(peft_lora.PEFT is None, reason=peft_lora.UNAVAILABLE)
# (r, lora_alpha, use_rslora) per adapter: different ranks, scales and rsLoRA
SPECS = [(4, 8, False), (8, 4, True), (2, 16, False)]


def _saved(tmp_path, linear):
    dirs = [peft_lora.save_random_adapter(linear, tmp_path / f"task{i}", r=r, alpha=a, use_rslora=rs, seed=i)
            for i, (r, a, rs) in enumerate(SPECS)]
    return dirs, [d.name for d in dirs]


@needs_peft
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_peft_equals_peft_mixed_batch(tmp_path, dtype):
    """Adapters saved by peft, loaded by both; peft's ``model(x, adapter_names=...)`` (one name per
    sequence, ``__base__`` too) equals ``layer(x, task_ids)``. fp32: the same sums in another
    order; bf16: peft rounds the base output and the adapter's output separately."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    dirs, names = _saved(tmp_path, linear)
    linear = linear.to(dtype)
    model = peft_lora.load_mixed(linear, dirs, names)
    layer = MultiLoRALinear.from_peft(linear, dirs)
    assert layer.task_names == names and layer.ranks == [4, 8, 2] and layer.r == 8
    assert layer.scaling.tolist() == pytest.approx([8 / 4, 4 / math.sqrt(8), 16 / 2])
    peft_layer = peft_lora.lora_layer(model)
    assert layer.scaling.tolist() == pytest.approx([peft_layer.scaling[n] for n in names])
    x = torch.randn(6, 5, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    adapter_names = ["task1", "__base__", "task0", "task2", "task1", "task2"]
    expected = peft_lora.mixed_forward(model, x, adapter_names)
    with torch.no_grad():
        got = layer(x, layer.task_ids_for(adapter_names))
    assert got.dtype == expected.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(got[1], linear(x[1]))  # __base__: the base layer alone
    # padded ranks stay zero and stay inert under training
    assert not layer.lora_A[0, 4:].any() and not layer.lora_B[2, :, 2:].any()


@needs_peft
def test_from_peft_trains_and_padding_stays_zero(tmp_path):
    linear = nn.Linear(32, 24)
    dirs, _ = _saved(tmp_path, linear)
    layer = MultiLoRALinear.from_peft(linear, dirs, module_name="proj", names=["a", "b", "c"])
    assert layer.shared_A is None and not linear.weight.requires_grad
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(12, 32, generator=gen)
    ids = torch.arange(12) % 3
    target = torch.randn(12, 24, generator=gen)
    _sgd_lowers(layer, lambda: F.mse_loss(layer(x, ids), target), steps=10, lr=0.2)
    assert not layer.lora_A[0, 4:].any() and not layer.lora_A[2, 2:].any() and not layer.lora_B[2, :, 2:].any()


@needs_peft
def test_from_peft_rejects(tmp_path):
    linear = nn.Linear(32, 24)
    dirs, _ = _saved(tmp_path, linear)
    with pytest.raises(ValueError, match="module_name"):
        MultiLoRALinear.from_peft(linear, dirs[:1], module_name="q_proj")
    with pytest.raises(ValueError, match="do not fit"):
        MultiLoRALinear.from_peft(nn.Linear(16, 24), dirs[:1])
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        MultiLoRALinear.from_peft(linear, [tmp_path])
    with pytest.raises(ValueError, match="distinct"):
        MultiLoRALinear.from_peft(linear, dirs[:2], names=["a", "a"])
    config_path = dirs[0] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        MultiLoRALinear.from_peft(linear, dirs[:1])
    config_path.write_text(json.dumps({**config, "alpha_pattern": {"proj": 3.0}, "rank_pattern": {"other": 9}}))
    layer = MultiLoRALinear.from_peft(linear, dirs[:1])
    assert layer.scaling.item() == pytest.approx(3.0 / 4)  # alpha_pattern read as peft matches it
