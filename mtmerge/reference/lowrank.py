"""Plain-PyTorch reference for the low-rank attention family: the math, written to be read.

These functions define what "correct" means for the compiled kernels (``csrc/lowrank``) and the
Triton kernels (``kernels/lowrank``); each is named like its op (``torch.ops.mtmerge.<name>``)
and takes the op's arguments. They favour clarity over speed. The backward functions are
written by hand (the kernels implement the same formulas); the tests check them against
``torch.autograd`` on the forward functions in float64.

Conventions
-----------
* "fp32" is the compute dtype: float32, or float64 when the inputs are float64 (float64 exists
  so that ``torch.autograd.gradcheck`` can run). Everything is computed in fp32 and rounded once.
* Masks are bool. ``lama_pool``'s ``mask`` is True for a *real* token; ``linformer_attention``'s
  ``key_padding_mask`` is True for *padding* (PyTorch's convention).
* An op returning an optional gradient that does not exist returns a separate empty ``[0]``
  tensor (``torch.library.opcheck`` forbids outputs aliasing each other or the inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-12  # LAMA: f = z / max(||z||_2, NORM_EPS)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_grad(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ---- LAMA pooling ---------------------------------------------------------------------------------


def _real_tokens(h: Tensor, mask: Tensor | None) -> Tensor:
    """bool ``[B, T]``: True for a real token (all True when ``mask`` is None)."""
    if mask is None:
        return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    return mask.to(torch.bool)


def lama_context(h: Tensor, mask: Tensor | None) -> Tensor:
    """fp32 ``[B, D]``: the mean of ``h`` over the real tokens of each row (zeros for a row with
    none)."""
    cd = compute_dtype(h.dtype)
    real = _real_tokens(h, mask).to(cd)
    count = real.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (h.to(cd) * real[:, :, None]).sum(dim=1) / count


def masked_softmax(logits: Tensor, real: Tensor) -> Tensor:
    """Softmax of ``logits [..., T]`` over the positions where ``real [..., T]`` is True;
    masked positions get 0, and a row with no real position is all zeros (never NaN)."""
    if logits.shape[-1] == 0:
        return torch.zeros_like(logits)
    neg_inf = torch.full_like(logits, float("-inf"))
    masked = torch.where(real, logits, neg_inf)
    row_max = masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.where(real, torch.exp(masked - row_max), torch.zeros_like(logits))
    total = e.sum(dim=-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def _lama_features(h: Tensor, P: Tensor, Q: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(u [B,m], g [B,T,m], z [B,T,m], norm [B,T,1], f [B,T,m])`` in fp32 for the fp32 ``c``."""
    cd = c.dtype
    u = c @ P.to(cd)  # u[b] = P^T c[b]
    g = h.to(cd) @ Q.to(cd)  # g[b, t] = Q^T h[b, t]
    z = torch.tanh(u[:, None, :] * g)
    norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    f = z / norm.clamp_min(NORM_EPS)
    return u, g, z, norm, f


def lama_pool(h: Tensor, P: Tensor, Q: Tensor, mask: Tensor | None, context: Tensor | None) -> tuple[Tensor, Tensor]:
    """LAMA's low-rank multi-head attention pooling ("Low Rank Factorization for Compact
    Multi-Head Self-Attention"): ``m`` heads, each a rank-1 bilinear affinity with a global
    context vector.

    Parameters
    ----------
    h : Tensor ``[B, T, D]``
        Token states, float32/bfloat16/float16/float64.
    P, Q : Tensor ``[D, m]``
        The factors of the heads' affinities, ``h``'s dtype.
    mask : Tensor ``[B, T]`` bool or None
        True for a real token (None: every token is real).
    context : Tensor ``[B, D]`` or None
        The global context ``c`` in ``h``'s dtype (None: the mean of ``h`` over the real tokens,
        zeros for a row without any).

    Returns
    -------
    attn : Tensor ``[B, m, T]``
        fp32: ``softmax_t(f[b, t, i])`` over the real ``t`` (0 at masked ``t``; a row without
        a real token is all zeros), where ``u = P^T c``, ``g_t = Q^T h_t``,
        ``z_t = tanh(u * g_t)`` and ``f_t = z_t / max(||z_t||_2, 1e-12)`` (norm over the heads).
    pooled : Tensor ``[B, m, D]``
        ``attn @ h``, in ``h``'s dtype.
    """
    cd = compute_dtype(h.dtype)
    real = _real_tokens(h, mask)
    c = lama_context(h, mask) if context is None else context.to(cd)
    _, _, _, _, f = _lama_features(h, P, Q, c)
    attn = masked_softmax(f.transpose(1, 2), real[:, None, :])
    pooled = attn @ h.to(cd)
    return attn.contiguous(), pooled.to(h.dtype)


def lama_pool_backward(grad_attn: Tensor, grad_pooled: Tensor, h: Tensor, P: Tensor, Q: Tensor,
                       mask: Tensor | None, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`lama_pool` given ``grad_attn [B, m, T]`` and ``grad_pooled [B, m, D]``.

    With ``a = attn`` and ``f, z, u, g`` recomputed, in fp32:
    ``ga = grad_attn + grad_pooled @ h^T``, ``grad_h = a^T @ grad_pooled + ...``;
    the softmax ``gl = a * (ga - sum_t a * ga)``; the normalization
    ``gz = (gf - f <f, gf>) / ||z||`` (``gf / eps`` where ``||z|| < eps``) with ``gf = gl^T``;
    the tanh ``gs = gz (1 - z^2)``; then ``grad_Q = sum_b h_b^T (gs u)``,
    ``grad_h += (gs u) Q^T``, ``gu = sum_t gs g``, ``grad_P = c^T gu``, ``gc = gu P^T``.

    Returns
    -------
    grad_h : ``[B, T, D]`` h's dtype; grad_P : ``[D, m]`` P's dtype; grad_Q : ``[D, m]`` Q's
    dtype; grad_context : ``[B, D]`` context's dtype, ``gc`` -- or, when ``context`` is None,
    an empty ``[0]`` tensor (``gc`` then flows back into ``grad_h`` through the masked mean,
    ``gc / count`` at each real token).
    """
    cd = compute_dtype(h.dtype)
    hc = h.to(cd)
    real = _real_tokens(h, mask)
    c = lama_context(h, mask) if context is None else context.to(cd)
    u, g, z, norm, f = _lama_features(h, P, Q, c)
    attn = masked_softmax(f.transpose(1, 2), real[:, None, :])  # [B, m, T]
    gp = grad_pooled.to(cd)
    # pooled = attn @ h
    g_attn = grad_attn.to(cd) + gp @ hc.transpose(1, 2)
    grad_h = attn.transpose(1, 2) @ gp
    # attn = masked softmax over t of f^T (masked t: attn = 0, so their logit gets no gradient)
    g_logits = attn * (g_attn - (attn * g_attn).sum(dim=-1, keepdim=True))
    g_f = g_logits.transpose(1, 2)  # [B, T, m]
    # f = z / max(||z||, eps)
    big = norm >= NORM_EPS
    g_z = torch.where(big, (g_f - f * (f * g_f).sum(dim=-1, keepdim=True)) / norm.clamp_min(NORM_EPS),
                      g_f / NORM_EPS)
    # z = tanh(u * g)
    g_s = g_z * (1 - z * z)
    g_g = g_s * u[:, None, :]  # [B, T, m]
    g_u = (g_s * g).sum(dim=1)  # [B, m]
    grad_Q = (hc.transpose(1, 2) @ g_g).sum(dim=0)  # [D, m]
    grad_h = grad_h + g_g @ Q.to(cd).T
    grad_P = c.T @ g_u  # [D, m]
    g_c = g_u @ P.to(cd).T  # [B, D]
    if context is None:
        real_f = real.to(cd)
        count = real_f.sum(dim=1, keepdim=True).clamp_min(1.0)  # [B, 1]
        grad_h = grad_h + (g_c / count)[:, None, :] * real_f[:, :, None]
        grad_context = _empty_grad(h)
    else:
        grad_context = g_c.to(context.dtype)
    return grad_h.to(h.dtype), grad_P.to(P.dtype), grad_Q.to(Q.dtype), grad_context


# ---- Linformer attention --------------------------------------------------------------------------


def _linformer_projected(k: Tensor, v: Tensor, E: Tensor, F: Tensor,
                         key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(keep [B,1,N,1], k0, v0, kp, vp)`` in fp32: padded rows zeroed, then projected along the
    sequence by the first ``N`` columns of ``E`` / ``F``."""
    cd = compute_dtype(k.dtype)
    batch, _, n, _ = k.shape
    if key_padding_mask is None:
        keep = torch.ones((batch, 1, n, 1), dtype=torch.bool, device=k.device)
    else:
        keep = ~key_padding_mask.to(torch.bool)[:, None, :, None]
    zero = torch.zeros((), dtype=cd, device=k.device)
    k0 = torch.where(keep, k.to(cd), zero)  # where, not *: padded values may be anything
    v0 = torch.where(keep, v.to(cd), zero)
    kp = E[:, :n].to(cd) @ k0  # [B, Hh, r, d]
    vp = F[:, :n].to(cd) @ v0
    return keep, k0, v0, kp, vp


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, key_padding_mask: Tensor | None,
                        scale: float) -> Tensor:
    """Linformer self-attention: keys and values projected along the sequence to ``r`` rows.

    Parameters
    ----------
    q : Tensor ``[B, Hh, Nq, d]``
        Queries, float32/bfloat16/float16/float64.
    k, v : Tensor ``[B, Hh, N, d]``
        Keys and values, ``q``'s dtype.
    E, F : Tensor ``[r, Nmax]``
        The key and value projections, ``q``'s dtype, ``N <= Nmax`` (columns ``0:N`` are used).
    key_padding_mask : Tensor ``[B, N]`` bool or None
        True for a padded position. Padded rows of ``k`` and ``v`` are zeroed *before* the
        projection (fairseq's Linformer forgets this), so their values never matter.
    scale : float
        Multiplies the scores (the public API passes ``1/sqrt(d)`` by default).

    Returns
    -------
    Tensor ``[B, Hh, Nq, d]``, ``q``'s dtype
        ``softmax(q kp^T * scale) vp`` over the ``r`` projected keys, with
        ``kp = E[:, :N] k0`` and ``vp = F[:, :N] v0``, all in fp32. A batch row whose keys are all
        padded gives zeros (``vp = 0``).
    """
    cd = compute_dtype(q.dtype)
    _, _, _, kp, vp = _linformer_projected(k, v, E, F, key_padding_mask)
    p = torch.softmax((q.to(cd) @ kp.transpose(-1, -2)) * scale, dim=-1)
    return (p @ vp).to(q.dtype)


def linformer_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor,
                                 key_padding_mask: Tensor | None,
                                 scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`linformer_attention` given ``grad_out [B, Hh, Nq, d]``.

    With ``p`` and ``kp, vp`` recomputed, in fp32: ``gp = grad_out vp^T``,
    ``gvp = p^T grad_out``, ``gs = p * (gp - sum_j p gp)``, ``grad_q = scale gs kp``,
    ``gkp = scale gs^T q``; then ``grad_k = E[:, :N]^T gkp`` and ``grad_v = F[:, :N]^T gvp``
    (0 at padded rows), ``grad_E[:, :N] = sum_{b,h} gkp k0^T`` and
    ``grad_F[:, :N] = sum_{b,h} gvp v0^T`` (columns ``N:`` get 0).

    Returns
    -------
    grad_q, grad_k, grad_v, grad_E, grad_F
        Shaped and typed like ``q, k, v, E, F`` (contiguous).
    """
    cd = compute_dtype(q.dtype)
    n = k.shape[2]
    qc = q.to(cd)
    keep, k0, v0, kp, vp = _linformer_projected(k, v, E, F, key_padding_mask)
    p = torch.softmax((qc @ kp.transpose(-1, -2)) * scale, dim=-1)  # [B, Hh, Nq, r]
    go = grad_out.to(cd)
    g_p = go @ vp.transpose(-1, -2)
    g_vp = p.transpose(-1, -2) @ go  # [B, Hh, r, d]
    g_s = p * (g_p - (p * g_p).sum(dim=-1, keepdim=True))
    grad_q = (g_s @ kp) * scale
    g_kp = (g_s.transpose(-1, -2) @ qc) * scale  # [B, Hh, r, d]
    zero = torch.zeros((), dtype=cd, device=q.device)
    grad_k = torch.where(keep, E[:, :n].to(cd).T @ g_kp, zero)
    grad_v = torch.where(keep, F[:, :n].to(cd).T @ g_vp, zero)
    grad_E = torch.zeros(E.shape, dtype=cd, device=E.device)
    grad_F = torch.zeros(F.shape, dtype=cd, device=F.device)
    grad_E[:, :n] = (g_kp @ k0.transpose(-1, -2)).sum(dim=(0, 1))
    grad_F[:, :n] = (g_vp @ v0.transpose(-1, -2)).sum(dim=(0, 1))
    return (grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_E.to(E.dtype), grad_F.to(F.dtype))


# ---- multi-adapter LoRA ---------------------------------------------------------------------------


def valid_adapter_ids(adapter_ids: Tensor, num_adapters: int) -> Tensor:
    """``adapter_ids`` as int64 with anything outside ``[0, L)`` replaced by -1 (no adapter)."""
    ids = adapter_ids.to(torch.int64)
    valid = (ids >= 0) & (ids < num_adapters)
    return torch.where(valid, ids, torch.full_like(ids, -1))


def multi_lora(x: Tensor, A: Tensor, B: Tensor, adapter_ids: Tensor, scale: Tensor, base: Tensor | None) -> Tensor:
    """One LoRA adapter per token (MTLoRA's task adapters; many adapters served in one batch).

    Parameters
    ----------
    x : Tensor ``[T, in]``
        Tokens, float32/bfloat16/float16/float64.
    A : Tensor ``[L, r, in]``, B : Tensor ``[L, out, r]``
        The adapters' down and up projections, ``x``'s dtype.
    adapter_ids : Tensor ``[T]``
        int32/int64 adapter of each token; ``-1`` (and anything outside ``[0, L)``, which the
        public API rejects) adds nothing.
    scale : Tensor ``[L]`` float32
        Per-adapter scaling (``lora_alpha / r`` in PEFT).
    base : Tensor ``[T, out]`` or None
        Added to the result (the base layer's output), ``x``'s dtype; None: zeros.

    Returns
    -------
    Tensor ``[T, out]``, ``x``'s dtype
        ``y_t = base_t + scale[g] * B_g (A_g x_t)`` with ``g = adapter_ids[t]``, the
        intermediate ``A_g x_t`` kept in fp32 and everything accumulated in fp32, rounded once.
    """
    cd = compute_dtype(x.dtype)
    num_adapters = A.shape[0]
    ids = valid_adapter_ids(adapter_ids, num_adapters)
    xc = x.to(cd)
    y = torch.zeros((x.shape[0], B.shape[1]), dtype=cd, device=x.device) if base is None else base.to(cd, copy=True)
    s = scale.to(cd)
    for g in range(num_adapters):
        rows = torch.nonzero(ids == g).flatten()
        if rows.numel() == 0:
            continue
        shrunk = xc[rows] @ A[g].to(cd).T  # [n, r], fp32
        y = y.index_add(0, rows, s[g] * (shrunk @ B[g].to(cd).T))
    return y.to(x.dtype)


def multi_lora_backward(grad_out: Tensor, x: Tensor, A: Tensor, B: Tensor, adapter_ids: Tensor,
                        scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`multi_lora` given ``grad_out [T, out]`` (``base``'s gradient is
    ``grad_out`` itself; ``scale`` gets none).

    Per adapter ``g`` and its tokens, in fp32: ``a = x A_g^T``, ``gy = scale[g] grad_out``,
    ``grad_B[g] = gy^T a``, ``ga = gy B_g``, ``grad_A[g] = ga^T x``, ``grad_x = ga A_g``.
    Tokens with id -1 get a zero ``grad_x``; adapters without tokens get zero gradients.

    Returns
    -------
    grad_x : ``[T, in]`` x's dtype; grad_A : ``[L, r, in]`` A's dtype; grad_B : ``[L, out, r]``
    B's dtype.
    """
    cd = compute_dtype(x.dtype)
    num_adapters = A.shape[0]
    ids = valid_adapter_ids(adapter_ids, num_adapters)
    xc, go, s = x.to(cd), grad_out.to(cd), scale.to(cd)
    grad_x = torch.zeros_like(xc)
    grad_A = torch.zeros(A.shape, dtype=cd, device=A.device)
    grad_B = torch.zeros(B.shape, dtype=cd, device=B.device)
    for g in range(num_adapters):
        rows = torch.nonzero(ids == g).flatten()
        if rows.numel() == 0:
            continue
        a_g, b_g = A[g].to(cd), B[g].to(cd)
        x_rows = xc[rows]
        shrunk = x_rows @ a_g.T  # [n, r]
        g_y = s[g] * go[rows]  # [n, out]
        grad_B[g] = g_y.T @ shrunk
        g_a = g_y @ b_g  # [n, r]
        grad_A[g] = g_a.T @ x_rows
        grad_x[rows] = g_a @ a_g
    return grad_x.to(x.dtype), grad_A.to(A.dtype), grad_B.to(B.dtype)
