"""Op specs of the low-rank attention family: schema, reference, validating fake, GPU launcher,
autograd.

Walk: public API in ``mtmerge/ops/lowrank.py`` -> these specs -> CPU kernels in
``csrc/lowrank/`` (registered by ``csrc/lowrank/bindings.cpp``), GPU kernels in
``kernels/lowrank/``, the math in ``mtmerge/reference/lowrank.py``. The schemas are the contract
of docs/lowrank.md; every backend accepts exactly what the fakes accept (the public
wrappers check the data too, e.g. adapter id ranges).

Dtypes every backend may rely on: the float tensors of one op share the dtype of its first
input (``h``, ``q`` or ``x``: float32, bfloat16, float16 or float64), except ``multi_lora``'s
``scale`` (float32) and the gradients a backward op receives for fp32 outputs (``grad_attn``:
fp32); masks are bool; ``adapter_ids`` is int32 or int64. Outputs are fresh tensors: never an
input (``multi_lora`` with every id -1 still returns a copy of ``base``) nor each other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtmerge._library import Autograd, OpSpec
from mtmerge.reference import lowrank as ref

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _triton(name: str) -> str:
    return f"triton:mtmerge.kernels.lowrank:{name}"


# ---- fakes: check what the kernels rely on, return output metadata ---------------------------


def _check_float(t: Tensor, name: str) -> None:
    torch._check(t.dtype in FLOATS, lambda: f"{name} must be a float tensor, got {t.dtype}")


def _check_dtype(t: Tensor, name: str, like: Tensor, like_name: str) -> None:
    torch._check(t.dtype == like.dtype, lambda: f"{name} must have {like_name}'s dtype {like.dtype}, got {t.dtype}")


def _check_shape(t: Tensor, name: str, shape: tuple) -> None:
    torch._check(tuple(t.shape) == tuple(shape), lambda: f"{name} must have shape {tuple(shape)}, "
                                                         f"got {tuple(t.shape)}")


def _check_dim(t: Tensor, name: str, dim: int, layout: str) -> None:
    torch._check(t.dim() == dim, lambda: f"{name} must be {layout}, got {t.dim()}-D")


def _check_mask(mask: Tensor | None, name: str, shape: tuple) -> None:
    if mask is not None:
        torch._check(mask.dtype == torch.bool, lambda: f"{name} must be bool, got {mask.dtype}")
        _check_shape(mask, name, shape)


def _check_lama(h: Tensor, P: Tensor, Q: Tensor, mask: Tensor | None, context: Tensor | None) -> None:
    _check_dim(h, "h", 3, "[B, T, D]")
    _check_float(h, "h")
    batch, tokens, hidden = h.shape
    _check_dim(P, "P", 2, "[D, m]")
    torch._check(P.shape[0] == hidden, lambda: f"P must be [D={hidden}, m], got {tuple(P.shape)}")
    _check_shape(Q, "Q", tuple(P.shape))
    _check_dtype(P, "P", h, "h")
    _check_dtype(Q, "Q", h, "h")
    _check_mask(mask, "mask", (batch, tokens))
    if context is not None:
        _check_shape(context, "context", (batch, hidden))
        _check_dtype(context, "context", h, "h")


def _lama_fake(h, P, Q, mask, context):
    _check_lama(h, P, Q, mask, context)
    batch, tokens, hidden = h.shape
    heads = P.shape[1]
    return (h.new_empty((batch, heads, tokens), dtype=ref.compute_dtype(h.dtype)),
            h.new_empty((batch, heads, hidden)))


def _lama_backward_fake(grad_attn, grad_pooled, h, P, Q, mask, context):
    _check_lama(h, P, Q, mask, context)
    batch, tokens, hidden = h.shape
    heads = P.shape[1]
    _check_shape(grad_attn, "grad_attn", (batch, heads, tokens))
    torch._check(grad_attn.dtype == ref.compute_dtype(h.dtype),
                 lambda: f"grad_attn must be {ref.compute_dtype(h.dtype)} (attn's dtype), got {grad_attn.dtype}")
    _check_shape(grad_pooled, "grad_pooled", (batch, heads, hidden))
    _check_dtype(grad_pooled, "grad_pooled", h, "h")
    grad_context = h.new_empty((0,)) if context is None else context.new_empty(context.shape)
    return h.new_empty(h.shape), P.new_empty(P.shape), Q.new_empty(Q.shape), grad_context


def _check_linformer(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, key_padding_mask: Tensor | None) -> None:
    _check_dim(q, "q", 4, "[B, Hh, Nq, d]")
    _check_float(q, "q")
    batch, heads, _, head_dim = q.shape
    _check_dim(k, "k", 4, "[B, Hh, N, d]")
    torch._check(k.shape[0] == batch and k.shape[1] == heads and k.shape[3] == head_dim,
                 lambda: f"k must be [B={batch}, Hh={heads}, N, d={head_dim}], got {tuple(k.shape)}")
    _check_shape(v, "v", tuple(k.shape))
    _check_dim(E, "E", 2, "[r, Nmax]")
    _check_shape(F, "F", tuple(E.shape))
    torch._check(k.shape[2] <= E.shape[1], lambda: f"N={k.shape[2]} keys exceed E's width Nmax={E.shape[1]}")
    for name, t in (("k", k), ("v", v), ("E", E), ("F", F)):
        _check_dtype(t, name, q, "q")
    _check_mask(key_padding_mask, "key_padding_mask", (batch, k.shape[2]))


def _linformer_fake(q, k, v, E, F, key_padding_mask, scale):
    _check_linformer(q, k, v, E, F, key_padding_mask)
    return q.new_empty(q.shape)


def _linformer_backward_fake(grad_out, q, k, v, E, F, key_padding_mask, scale):
    _check_linformer(q, k, v, E, F, key_padding_mask)
    _check_shape(grad_out, "grad_out", tuple(q.shape))
    _check_dtype(grad_out, "grad_out", q, "q")
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), E.new_empty(E.shape), F.new_empty(F.shape)


def _check_lora(x: Tensor, A: Tensor, B: Tensor, adapter_ids: Tensor, scale: Tensor) -> None:
    _check_dim(x, "x", 2, "[T, in]")
    _check_float(x, "x")
    tokens, features = x.shape
    _check_dim(A, "A", 3, "[L, r, in]")
    torch._check(A.shape[2] == features, lambda: f"A must be [L, r, in={features}], got {tuple(A.shape)}")
    _check_dim(B, "B", 3, "[L, out, r]")
    torch._check(B.shape[0] == A.shape[0] and B.shape[2] == A.shape[1],
                 lambda: f"B must be [L={A.shape[0]}, out, r={A.shape[1]}], got {tuple(B.shape)}")
    _check_dtype(A, "A", x, "x")
    _check_dtype(B, "B", x, "x")
    torch._check(adapter_ids.dtype in INDEX_DTYPES,
                 lambda: f"adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
    _check_shape(adapter_ids, "adapter_ids", (tokens,))
    torch._check(scale.dtype == torch.float32, lambda: f"scale must be float32, got {scale.dtype}")
    _check_shape(scale, "scale", (A.shape[0],))


def _lora_fake(x, A, B, adapter_ids, scale, base):
    _check_lora(x, A, B, adapter_ids, scale)
    if base is not None:
        _check_shape(base, "base", (x.shape[0], B.shape[1]))
        _check_dtype(base, "base", x, "x")
    return x.new_empty((x.shape[0], B.shape[1]))


def _lora_backward_fake(grad_out, x, A, B, adapter_ids, scale):
    _check_lora(x, A, B, adapter_ids, scale)
    _check_shape(grad_out, "grad_out", (x.shape[0], B.shape[1]))
    _check_dtype(grad_out, "grad_out", x, "x")
    return x.new_empty(x.shape), A.new_empty(A.shape), B.new_empty(B.shape)


# ---- autograd: each forward op's backward is its *_backward op --------------------------------


def _lama_setup_context(ctx, inputs, output) -> None:
    h, P, Q, mask, context = inputs
    ctx.has_context = context is not None
    ctx.save_for_backward(h, P, Q, mask, context)


def _lama_backward(ctx, grad_attn, grad_pooled):
    h, P, Q, mask, context = ctx.saved_tensors
    batch, tokens, hidden = h.shape
    heads = P.shape[1]
    if grad_attn is None:
        grad_attn = h.new_zeros((batch, heads, tokens), dtype=ref.compute_dtype(h.dtype))
    if grad_pooled is None:
        grad_pooled = h.new_zeros((batch, heads, hidden))
    grad_h, grad_P, grad_Q, grad_context = torch.ops.mtmerge.lama_pool_backward(
        grad_attn=grad_attn.contiguous(), grad_pooled=grad_pooled.contiguous(), h=h, P=P, Q=Q, mask=mask,
        context=context)
    return grad_h, grad_P, grad_Q, None, grad_context if ctx.has_context else None


def _linformer_setup_context(ctx, inputs, output) -> None:
    q, k, v, E, F, key_padding_mask, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, E, F, key_padding_mask)


def _linformer_backward(ctx, grad):
    q, k, v, E, F, key_padding_mask = ctx.saved_tensors
    grads = torch.ops.mtmerge.linformer_attention_backward(
        grad_out=grad.contiguous(), q=q, k=k, v=v, E=E, F=F, key_padding_mask=key_padding_mask, scale=ctx.scale)
    grad_q, grad_k, grad_v, grad_E, grad_F = grads
    return grad_q, grad_k, grad_v, grad_E, grad_F, None, None


def _lora_setup_context(ctx, inputs, output) -> None:
    x, A, B, adapter_ids, scale, base = inputs
    ctx.has_base = base is not None
    ctx.save_for_backward(x, A, B, adapter_ids, scale)


def _lora_backward(ctx, grad):
    x, A, B, adapter_ids, scale = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x, grad_A, grad_B = torch.ops.mtmerge.multi_lora_backward(
        grad_out=grad, x=x, A=A, B=B, adapter_ids=adapter_ids, scale=scale)
    return grad_x, grad_A, grad_B, None, None, grad if ctx.has_base else None


# ---- the family -------------------------------------------------------------------------------

LOWRANK_OPS: list[OpSpec] = [
    OpSpec("lama_pool(Tensor h, Tensor P, Tensor Q, Tensor? mask, Tensor? context) -> (Tensor attn, Tensor pooled)",
           ref.lama_pool, _lama_fake, _triton("lama_pool"),
           Autograd(_lama_setup_context, _lama_backward)),
    OpSpec("lama_pool_backward(Tensor grad_attn, Tensor grad_pooled, Tensor h, Tensor P, Tensor Q, Tensor? mask, "
           "Tensor? context) -> (Tensor grad_h, Tensor grad_P, Tensor grad_Q, Tensor grad_context)",
           ref.lama_pool_backward, _lama_backward_fake, _triton("lama_pool_backward")),
    OpSpec("linformer_attention(Tensor q, Tensor k, Tensor v, Tensor E, Tensor F, Tensor? key_padding_mask, "
           "float scale) -> Tensor",
           ref.linformer_attention, _linformer_fake, _triton("linformer_attention"),
           Autograd(_linformer_setup_context, _linformer_backward)),
    OpSpec("linformer_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor E, Tensor F, "
           "Tensor? key_padding_mask, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, "
           "Tensor grad_E, Tensor grad_F)",
           ref.linformer_attention_backward, _linformer_backward_fake, _triton("linformer_attention_backward")),
    OpSpec("multi_lora(Tensor x, Tensor A, Tensor B, Tensor adapter_ids, Tensor scale, Tensor? base) -> Tensor",
           ref.multi_lora, _lora_fake, _triton("multi_lora"),
           Autograd(_lora_setup_context, _lora_backward)),
    OpSpec("multi_lora_backward(Tensor grad_out, Tensor x, Tensor A, Tensor B, Tensor adapter_ids, Tensor scale) "
           "-> (Tensor grad_x, Tensor grad_A, Tensor grad_B)",
           ref.multi_lora_backward, _lora_backward_fake, _triton("multi_lora_backward")),
]
