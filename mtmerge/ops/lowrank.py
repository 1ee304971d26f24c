"""Typed public API of the low-rank attention family: validation once, then the ops.

Walk: ``mtmerge.multi_lora`` -> here -> specs in ``mtmerge/ops/_lowrank_ops.py`` ->
``csrc/lowrank/`` (CPU), ``kernels/lowrank/`` (GPU), ``mtmerge/reference/lowrank.py`` (truth)
-> ``tests/ops/lowrank/`` -> ``benchmarks/bench_lowrank.py``.

Every function checks its arguments here, naming them, before any kernel runs: wrong types are
``TypeError``; shapes, dtypes, devices and ranges are ``ValueError``. ``multi_lora``'s adapter ids
must lie in ``[-1, L)`` (``-1``: no adapter); that check reads one small reduction back to the
host. All three ops are differentiable (LAMA wrt ``h``, ``P``, ``Q`` and ``context``; Linformer
wrt ``q``, ``k``, ``v``, ``E`` and ``F``; LoRA wrt ``x``, ``A``, ``B`` and ``base``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from mtmerge.ops._validation import (
    bool_arg,
    dims_is,
    finite_float,
    float_arg,
    ids_in_range,
    index_arg,
    same_device,
    same_dtype,
    shape_is,
)

__all__ = ["LamaOutput", "lama_pool", "linformer_attention", "multi_lora"]


class LamaOutput(NamedTuple):
    """``attn [B, m, T]`` float32 (float64 for float64 ``h``) and ``pooled [B, m, D]`` in ``h``'s dtype."""

    attn: Tensor
    pooled: Tensor


# ---- checks -------------------------------------------------------------------------------------


def _like(t, name: str, ref: Tensor, ref_name: str) -> Tensor:
    """A float tensor with ``ref``'s dtype and device."""
    t = float_arg(t, name)
    same_dtype(t, name, ref, ref_name)
    same_device(t, name, ref, ref_name)
    return t


# ---- LAMA pooling -------------------------------------------------------------------------------


def lama_pool(h: Tensor, P: Tensor, Q: Tensor, *, mask: Tensor | None = None,
              context: Tensor | None = None) -> LamaOutput:
    """LAMA low-rank multi-head attention pooling ("Low Rank Factorization for Compact Multi-Head
    Self-Attention"): ``m`` heads, each scoring the tokens by a rank-1 bilinear affinity with a
    global context vector; one streaming pass over ``T``.

    Parameters
    ----------
    h : Tensor ``[B, T, D]``
        Token states, float32/bfloat16/float16 (float64 for gradcheck).
    P, Q : Tensor ``[D, m]``
        The heads' factors, ``m >= 1``, ``h``'s dtype and device.
    mask : Tensor ``[B, T]`` bool, optional
        True for a real token, False for padding (default: every token is real).
    context : Tensor ``[B, D]``, optional
        The global context ``c`` (``h``'s dtype); default: the mean of ``h`` over the real tokens.

    Returns
    -------
    LamaOutput
        ``attn [B, m, T]`` float32 (float64 for float64 h): per head, a softmax over the real
        tokens of ``f = normalize(tanh((P^T c) * (Q^T h_t)))`` (0 at padding; a row without any
        real token is all zeros, never NaN), and ``pooled = attn @ h`` ``[B, m, D]`` in ``h``'s
        dtype. Differentiable with respect to ``h``, ``P``, ``Q`` and ``context``.
    """
    h = float_arg(h, "h")
    dims_is(h, "h", 3, "[B, T, D]")
    batch, tokens, hidden = h.shape
    P = _like(P, "P", h, "h")
    dims_is(P, "P", 2, "[D, m]")
    if P.shape[0] != hidden or P.shape[1] < 1:
        raise ValueError(f"P must be [D, m] with D = {hidden} and m >= 1, got shape {tuple(P.shape)}")
    Q = _like(Q, "Q", h, "h")
    shape_is(Q, "Q", tuple(P.shape), "P's shape [D, m]")
    if mask is not None:
        mask = bool_arg(mask, "mask")
        shape_is(mask, "mask", (batch, tokens), "[B, T]")
        same_device(mask, "mask", h, "h")
    if context is not None:
        context = _like(context, "context", h, "h")
        shape_is(context, "context", (batch, hidden), "[B, D]")
    attn, pooled = torch.ops.mtmerge.lama_pool(h=h, P=P, Q=Q, mask=mask, context=context)
    return LamaOutput(attn, pooled)


# ---- Linformer attention ------------------------------------------------------------------------


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, *,
                        key_padding_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Linformer attention: keys and values projected along the sequence to ``r`` rows, then a
    fused softmax attention over the ``r`` projected keys (fp32 statistics).

    Parameters
    ----------
    q : Tensor ``[B, Hh, Nq, d]``
        Queries, float32/bfloat16/float16 (float64 for gradcheck).
    k, v : Tensor ``[B, Hh, N, d]``
        Keys and values, ``q``'s dtype and device; any ``N`` up to ``E``'s width.
    E, F : Tensor ``[r, Nmax]``
        Key and value projections (``r >= 1``, ``Nmax >= N``; columns ``0:N`` are used),
        ``q``'s dtype and device.
    key_padding_mask : Tensor ``[B, N]`` bool, optional
        True for padding (PyTorch's convention). Padded keys and values are zeroed before the
        projection, so they change nothing; a row whose keys are all padded gives zeros.
    scale : float, optional
        Multiplies the scores; default ``1 / sqrt(d)``.

    Returns
    -------
    Tensor ``[B, Hh, Nq, d]``, ``q``'s dtype
        ``softmax(q (E[:, :N] k)^T * scale) (F[:, :N] v)``. Differentiable with respect to
        ``q``, ``k``, ``v``, ``E`` and ``F``.
    """
    q = float_arg(q, "q")
    dims_is(q, "q", 4, "[B, Hh, Nq, d]")
    batch, heads, _, head_dim = q.shape
    k = _like(k, "k", q, "q")
    dims_is(k, "k", 4, "[B, Hh, N, d]")
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, head_dim):
        raise ValueError(f"k must be [B, Hh, N, d] with B = {batch}, Hh = {heads}, d = {head_dim} (q's), "
                         f"got shape {tuple(k.shape)}")
    v = _like(v, "v", q, "q")
    shape_is(v, "v", tuple(k.shape), "k's shape [B, Hh, N, d]")
    num_keys = k.shape[2]
    E = _like(E, "E", q, "q")
    dims_is(E, "E", 2, "[r, Nmax]")
    if E.shape[0] < 1:
        raise ValueError(f"E must have at least one row (r >= 1), got shape {tuple(E.shape)}")
    if E.shape[1] < num_keys:
        raise ValueError(f"E is {E.shape[1]} columns wide but k and v have N = {num_keys} positions: "
                         f"N must be <= E's width")
    F = _like(F, "F", q, "q")
    shape_is(F, "F", tuple(E.shape), "E's shape [r, Nmax]")
    if key_padding_mask is not None:
        key_padding_mask = bool_arg(key_padding_mask, "key_padding_mask")
        shape_is(key_padding_mask, "key_padding_mask", (batch, num_keys), "[B, N]")
        same_device(key_padding_mask, "key_padding_mask", q, "q")
    scale = (1.0 / math.sqrt(head_dim) if head_dim else 1.0) if scale is None else finite_float(scale, "scale")
    return torch.ops.mtmerge.linformer_attention(q=q, k=k, v=v, E=E, F=F, key_padding_mask=key_padding_mask,
                                                 scale=scale)


# ---- multi-adapter LoRA -------------------------------------------------------------------------


def _lora_scale(scale, num_adapters: int, x: Tensor) -> Tensor:
    """``scale`` as a float32 ``[L]`` tensor on x's device (one float is expanded)."""
    if isinstance(scale, Tensor):
        float_arg(scale, "scale")
        same_device(scale, "scale", x, "x")
        if scale.dim() == 0:
            return scale.to(torch.float32).expand(num_adapters).contiguous()
        shape_is(scale, "scale", (num_adapters,), "[L]")
        return scale.to(torch.float32)
    value = finite_float(scale, "scale")
    return torch.full((num_adapters,), value, dtype=torch.float32, device=x.device)


def multi_lora(x: Tensor, A: Tensor, B: Tensor, adapter_ids: Tensor, *,
               scale: float | Tensor = 1.0, base: Tensor | None = None) -> Tensor:
    """One LoRA adapter per token: ``base + scale[g] * B_g A_g x`` with ``g`` the token's adapter
    (MTLoRA's task-specific adapters; serving many adapters in one batch). Tokens are grouped by
    adapter and the shrink and expand GEMMs fused, with an fp32 intermediate.

    Parameters
    ----------
    x : Tensor ``[..., in]``
        Tokens (``T`` = the product of the leading dimensions), float32/bfloat16/float16
        (float64 for gradcheck).
    A : Tensor ``[L, r, in]``
        The adapters' down projections (``lora_A``), ``r >= 1``, ``x``'s dtype and device.
    B : Tensor ``[L, out, r]``
        The adapters' up projections (``lora_B``), ``x``'s dtype and device.
    adapter_ids : Tensor ``[...]`` (x's leading shape) or ``[T]``
        int32/int64 adapter of each token in ``[-1, L)``; ``-1`` adds nothing.
    scale : float or Tensor ``[L]``
        The adapters' scaling (PEFT's ``lora_alpha / r``): one for all, or one per adapter
        (read as float32); not differentiated.
    base : Tensor ``[..., out]`` or ``[T, out]``, optional
        Added to the result (the base layer's output), ``x``'s dtype and device.

    Returns
    -------
    Tensor ``[..., out]``, ``x``'s dtype
        Accumulated in float32 and rounded once. Differentiable with respect to ``x``, ``A``,
        ``B`` and ``base``.
    """
    x = float_arg(x, "x")
    if x.dim() < 1:
        raise ValueError("x must be [..., in], got a 0-d tensor")
    features = x.shape[-1]
    lead = tuple(x.shape[:-1])
    num_tokens = math.prod(lead)
    A = _like(A, "A", x, "x")
    dims_is(A, "A", 3, "[L, r, in]")
    if A.shape[2] != features or A.shape[1] < 1:
        raise ValueError(f"A must be [L, r, in] with in = {features} (x's last dimension) and r >= 1, "
                         f"got shape {tuple(A.shape)}")
    num_adapters, rank = A.shape[:2]
    B = _like(B, "B", x, "x")
    dims_is(B, "B", 3, "[L, out, r]")
    if B.shape[0] != num_adapters or B.shape[2] != rank:
        raise ValueError(f"B must be [L, out, r] with L = {num_adapters} and r = {rank} (A's), "
                         f"got shape {tuple(B.shape)}")
    out_features = B.shape[1]
    adapter_ids = index_arg(adapter_ids, "adapter_ids")
    if tuple(adapter_ids.shape) not in (lead, (num_tokens,)):
        raise ValueError(f"adapter_ids must have x's leading shape {lead} or [T] = ({num_tokens},), "
                         f"got shape {tuple(adapter_ids.shape)}")
    same_device(adapter_ids, "adapter_ids", x, "x")
    scale = _lora_scale(scale, num_adapters, x)
    if base is not None:
        base = _like(base, "base", x, "x")
        if tuple(base.shape) not in ((*lead, out_features), (num_tokens, out_features)):
            raise ValueError(f"base must be [..., out] = {(*lead, out_features)} or [T, out] = "
                             f"{(num_tokens, out_features)}, got shape {tuple(base.shape)}")
        base = base.reshape(num_tokens, out_features)
    ids_in_range(adapter_ids, "adapter_ids", -1, num_adapters)
    y = torch.ops.mtmerge.multi_lora(x=x.reshape(num_tokens, features), A=A, B=B,
                                     adapter_ids=adapter_ids.reshape(num_tokens), scale=scale, base=base)
    return y.reshape((*lead, out_features))
