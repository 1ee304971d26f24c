"""``lama_pool`` and ``lama_pool_backward``: LAMA's low-rank multi-head attention pooling.

Forward (per batch row b; "fp32" is float64 for float64 inputs):

1. :func:`_mean_kernel` (only when ``context`` is None): c = masked mean of h over the real
   tokens, per (b, block of D), and the real-token count.
2. u = P^T c with the batched GEMM of ``_common``.
3. :func:`_logits_kernel`, per (b, block of T): g = h Q over D, z = tanh(u g), f = z / max(||z||, eps)
   (all m heads in one tile: the norm runs over them); f is stored in the attn buffer [B, m, T].
4. :func:`_pool_kernel`, per (b, block of heads, block of D): the one streaming pass over T with
   an online softmax (running max and sum in fp32) accumulating pooled = softmax(f) @ h, then
   normalized once; the final statistics go to [B, m] buffers.
5. :func:`_normalize_kernel`: attn = exp(f - max) / sum in place over the f buffer (masked t -> 0,
   a row without real tokens -> all 0). We store f and normalize it afterwards: attn is an output
   anyway, and it avoids a second h pass.

Backward recomputes c, u, f, the statistics and attn (pooled in fp32), then, per (b, block of T),
:func:`_grad_logits_kernel`: ga = grad_attn + grad_pooled h^T, the softmax backward with
delta = sum_t a ga = sum_t a grad_attn + <grad_pooled, pooled> (flash-attention's trick), the norm
and tanh backward, storing gg = gs u [B, T, m] and per-block partial sums of gs g (summed in block
order: no atomics). :func:`_grad_h_kernel` then writes grad_h = a^T grad_pooled + gg Q^T
(+ gc / count at real tokens when c is the mean); grad_Q, grad_P and gc are batched GEMMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import EXACT, acc_dtype, block, bmm, check_float, mask_arg, mm, pow2, store_as

NORM_EPS = tl.constexpr(1e-12)  # f = z / max(||z||_2, NORM_EPS), as the reference


@triton.jit
def _real(mask_ptr, b, t, t_ok, s_mb, s_mt, HAS_MASK: tl.constexpr):
    """[BLOCK_T] True for a real token (in range and, with a mask, mask True)."""
    if HAS_MASK:
        v = tl.load(mask_ptr + b * s_mb + t.to(tl.int64) * s_mt, mask=t_ok, other=0)
        return t_ok & (v != 0)
    else:
        return t_ok


@triton.jit
def _tanh(x):
    """tanh to full relative precision: an odd Taylor polynomial for small |x| (where 1 - e^-2|x|
    cancels, and f = z / ||z|| would amplify the error), else sign(x) (1 - e) / (1 + e) with
    e = e^-2|x| <= 1 (no overflow for any x). The cut keeps the dropped x^11 term below the dtype's
    epsilon."""
    ax = tl.abs(x)
    e = tl.exp(ax * -2.0)
    large = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    if x.dtype == tl.float64:
        t = tl.where(ax < 0.04, small, large)
    else:
        t = tl.where(ax < 0.25, small, large)
    return tl.where(x < 0, -t, t)


@triton.jit
def _features(g, u):
    """(z, ||z|| [BLOCK_T], f) of the head pre-activations g [BLOCK_T, M_P2] and u [M_P2]; padded
    heads have g = u = 0, hence z = 0, and do not change the norm."""
    z = _tanh(u[None, :] * g)
    norm = tl.sqrt(tl.sum(z * z, axis=1))
    f = z / tl.maximum(norm, NORM_EPS)[:, None]
    return z, norm, f


@triton.jit
def _head_logits(h_ptr, q_ptr, b, t, rows, M, D, s_hb, s_ht, s_hd, s_qd, s_qm, ACC: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, M_P2: tl.constexpr):
    """g = h[b, t, :] Q [BLOCK_T, M_P2] in fp32 (rows outside ``rows`` read as 0)."""
    i = tl.arange(0, M_P2)
    i_ok = i < M
    kk = tl.arange(0, BLOCK_K)
    g = tl.zeros([BLOCK_T, M_P2], dtype=ACC)
    h_rows = h_ptr + b * s_hb + t.to(tl.int64)[:, None] * s_ht
    for k0 in range(0, D, BLOCK_K):
        d = k0 + kk
        d_ok = d < D
        hx = tl.load(h_rows + d.to(tl.int64)[None, :] * s_hd, mask=rows[:, None] & d_ok[None, :], other=0)
        qt = tl.load(q_ptr + d.to(tl.int64)[:, None] * s_qd + i[None, :] * s_qm, mask=d_ok[:, None] & i_ok[None, :],
                     other=0)
        if hx.dtype != qt.dtype:
            hx = hx.to(ACC)
            qt = qt.to(ACC)
        g = mm(g, hx, qt)
    return g


@triton.jit
def _mean_kernel(h_ptr, mask_ptr, c_ptr, count_ptr, T, D, s_hb, s_ht, s_hd, s_mb, s_mt,
                 HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """c[b, d] = sum of h[b, t, d] over the real t / max(count, 1); count[b] (fp32 [B, D], [B])."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    ACC: tl.constexpr = c_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
    cnt = tl.zeros([BLOCK_T], dtype=ACC)
    tt = tl.arange(0, BLOCK_T)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tt
        real = _real(mask_ptr, b, t, t < T, s_mb, s_mt, HAS_MASK)
        acc += tl.load(h_ptr + b * s_hb + t.to(tl.int64)[:, None] * s_ht + d.to(tl.int64)[None, :] * s_hd,
                       mask=real[:, None] & d_ok[None, :], other=0).to(ACC)
        cnt += real.to(ACC)
    n = tl.sum(cnt, axis=0)
    tl.store(c_ptr + b * D + d, tl.sum(acc, axis=0) / tl.maximum(n, 1.0), mask=d_ok)
    if tl.program_id(1) == 0:
        tl.store(count_ptr + b, n)


@triton.jit
def _logits_kernel(h_ptr, q_ptr, u_ptr, mask_ptr, f_ptr, T, D, M, s_hb, s_ht, s_hd, s_qd, s_qm, s_mb, s_mt,
                   HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, M_P2: tl.constexpr):
    """f[b, :, t] for a block of t (f: fp32 [B, M, T])."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    real = _real(mask_ptr, b, t, t_ok, s_mb, s_mt, HAS_MASK)
    ACC: tl.constexpr = f_ptr.dtype.element_ty
    i = tl.arange(0, M_P2)
    i_ok = i < M
    g = _head_logits(h_ptr, q_ptr, b, t, real, M, D, s_hb, s_ht, s_hd, s_qd, s_qm, ACC, BLOCK_T, BLOCK_K, M_P2)
    u = tl.load(u_ptr + b * M + i, mask=i_ok, other=0)
    _, _, f = _features(g, u)
    tl.store(f_ptr + b * M * T + i[None, :] * T + t[:, None], f, mask=t_ok[:, None] & i_ok[None, :])


@triton.jit
def _pool_kernel(f_ptr, h_ptr, mask_ptr, pooled_ptr, max_ptr, sum_ptr, T, D, M, s_hb, s_ht, s_hd, s_mb, s_mt,
                 HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """pooled[b, heads, d-block] = softmax_t(f) @ h by one streaming pass over T (online softmax);
    the first d-block also stores the final row max and sum."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    i_ok = i < M
    d_ok = d < D
    ACC: tl.constexpr = f_ptr.dtype.element_ty
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_H], dtype=ACC)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=ACC)
    tt = tl.arange(0, BLOCK_T)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tt
        real = _real(mask_ptr, b, t, t < T, s_mb, s_mt, HAS_MASK)
        s = tl.load(f_ptr + b * M * T + i[:, None] * T + t[None, :], mask=i_ok[:, None] & real[None, :],
                    other=float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no real token yet: exp(-inf - 0) = 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        hx = tl.load(h_ptr + b * s_hb + t.to(tl.int64)[:, None] * s_ht + d.to(tl.int64)[None, :] * s_hd,
                     mask=real[:, None] & d_ok[None, :], other=0).to(ACC)
        acc = mm(acc * alpha[:, None], p, hx)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    store_as(pooled_ptr + b * M * D + i[:, None] * D + d[None, :], out, i_ok[:, None] & d_ok[None, :])
    if tl.program_id(2) == 0:
        tl.store(max_ptr + b * M + i, m_i, mask=i_ok)
        tl.store(sum_ptr + b * M + i, l_i, mask=i_ok)


@triton.jit
def _normalize_kernel(f_ptr, mask_ptr, max_ptr, sum_ptr, ga_ptr, da_ptr, T, M, s_mb, s_mt, s_gb, s_gm, s_gt,
                      HAS_MASK: tl.constexpr, HAS_GA: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr):
    """attn = exp(f - max) / sum in place (0 at masked t and in rows without real tokens).
    HAS_GA: also da[b, i] = sum_t attn * grad_attn."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i_ok = i < M
    ACC: tl.constexpr = f_ptr.dtype.element_ty
    m_i = tl.load(max_ptr + b * M + i, mask=i_ok, other=0)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_i = tl.load(sum_ptr + b * M + i, mask=i_ok, other=0)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    da = tl.zeros([BLOCK_H], dtype=ACC)
    tt = tl.arange(0, BLOCK_T)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tt
        t_ok = t < T
        real = _real(mask_ptr, b, t, t_ok, s_mb, s_mt, HAS_MASK)
        ptrs = f_ptr + b * M * T + i[:, None] * T + t[None, :]
        s = tl.load(ptrs, mask=i_ok[:, None] & real[None, :], other=float("-inf"))
        a = tl.where(real[None, :], tl.exp(s - m_safe[:, None]) / l_safe[:, None], 0.0)
        tl.store(ptrs, a, mask=i_ok[:, None] & t_ok[None, :])
        if HAS_GA:
            ga = tl.load(ga_ptr + b * s_gb + i.to(tl.int64)[:, None] * s_gm + t.to(tl.int64)[None, :] * s_gt,
                         mask=i_ok[:, None] & real[None, :], other=0).to(ACC)
            da += tl.sum(a * ga, axis=1)
    if HAS_GA:
        tl.store(da_ptr + b * M + i, da, mask=i_ok)


@triton.jit
def _grad_logits_kernel(h_ptr, q_ptr, u_ptr, mask_ptr, attn_ptr, ga_ptr, gp_ptr, pooled_ptr, da_ptr, gg_ptr,
                        gu_ptr, T, D, M, s_hb, s_ht, s_hd, s_qd, s_qm, s_mb, s_mt, s_gab, s_gam, s_gat,
                        s_gpb, s_gpm, s_gpd, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                        M_P2: tl.constexpr):
    """For a block of t: gg[b, t, :] = gs u and the block's partial sum_t gs g into gu[b, block, :]."""
    b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    real = _real(mask_ptr, b, t, t_ok, s_mb, s_mt, HAS_MASK)
    ACC: tl.constexpr = attn_ptr.dtype.element_ty
    i = tl.arange(0, M_P2)
    i_ok = i < M
    i64 = i.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    g = tl.zeros([BLOCK_T, M_P2], dtype=ACC)
    gah = tl.zeros([BLOCK_T, M_P2], dtype=ACC)  # (grad_pooled h^T)^T
    dl = tl.zeros([M_P2], dtype=ACC)  # <grad_pooled[b, i], pooled[b, i]>
    h_rows = h_ptr + b * s_hb + t.to(tl.int64)[:, None] * s_ht
    for k0 in range(0, D, BLOCK_K):
        d = k0 + kk
        d_ok = d < D
        d64 = d.to(tl.int64)
        hx = tl.load(h_rows + d64[None, :] * s_hd, mask=real[:, None] & d_ok[None, :], other=0)
        qt = tl.load(q_ptr + d64[:, None] * s_qd + i64[None, :] * s_qm, mask=d_ok[:, None] & i_ok[None, :], other=0)
        hk = d_ok[:, None] & i_ok[None, :]
        gpt = tl.load(gp_ptr + b * s_gpb + i64[None, :] * s_gpm + d64[:, None] * s_gpd, mask=hk, other=0).to(ACC)
        pt = tl.load(pooled_ptr + b * M * D + i64[None, :] * D + d64[:, None], mask=hk, other=0)
        dl += tl.sum(gpt * pt, axis=0)
        gah = mm(gah, hx.to(ACC), gpt)
        if hx.dtype != qt.dtype:
            hx = hx.to(ACC)
            qt = qt.to(ACC)
        g = mm(g, hx, qt)
    u = tl.load(u_ptr + b * M + i, mask=i_ok, other=0)
    z, norm, f = _features(g, u)
    tile = real[:, None] & i_ok[None, :]
    a = tl.load(attn_ptr + b * M * T + i64[None, :] * T + t[:, None], mask=tile, other=0)
    ga = tl.load(ga_ptr + b * s_gab + i64[None, :] * s_gam + t.to(tl.int64)[:, None] * s_gat, mask=tile,
                 other=0).to(ACC) + gah
    delta = tl.load(da_ptr + b * M + i, mask=i_ok, other=0) + dl
    gl = a * (ga - delta[None, :])  # softmax backward (0 at masked t: a = 0)
    fg = tl.sum(f * gl, axis=1)
    big = norm >= NORM_EPS
    gz = tl.where(big[:, None], (gl - f * fg[:, None]) / tl.maximum(norm, NORM_EPS)[:, None], gl / NORM_EPS)
    gs = gz * (1.0 - z * z)
    tl.store(gg_ptr + b * T * M + t.to(tl.int64)[:, None] * M + i64[None, :], gs * u[None, :],
             mask=t_ok[:, None] & i_ok[None, :])
    part = tl.sum(tl.where(tile, gs * g, 0.0), axis=0)
    tl.store(gu_ptr + (b * tl.num_programs(1) + pid_t) * M + i, part, mask=i_ok)


@triton.jit
def _grad_h_kernel(attn_ptr, gp_ptr, gg_ptr, q_ptr, gc_ptr, count_ptr, mask_ptr, gh_ptr, T, D, M,
                   s_gpb, s_gpm, s_gpd, s_qd, s_qm, s_mb, s_mt, MEAN: tl.constexpr, HAS_MASK: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_h[b, t, d] = sum_i a[i, t] grad_pooled[i, d] + sum_i gg[t, i] Q[d, i] (+ MEAN: gc[b, d] / count
    at real t); grad_h contiguous [B, T, D] in h's dtype."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < T
    d_ok = d < D
    t64 = t.to(tl.int64)
    d64 = d.to(tl.int64)
    ACC: tl.constexpr = attn_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
    kk = tl.arange(0, BLOCK_K)
    for i0 in range(0, M, BLOCK_K):
        i = i0 + kk
        i_ok = i < M
        i64 = i.to(tl.int64)
        at = tl.load(attn_ptr + b * M * T + i64[None, :] * T + t64[:, None], mask=t_ok[:, None] & i_ok[None, :],
                     other=0)
        gpk = tl.load(gp_ptr + b * s_gpb + i64[:, None] * s_gpm + d64[None, :] * s_gpd,
                      mask=i_ok[:, None] & d_ok[None, :], other=0).to(ACC)
        acc = mm(acc, at, gpk)
        ggt = tl.load(gg_ptr + b * T * M + t64[:, None] * M + i64[None, :], mask=t_ok[:, None] & i_ok[None, :],
                      other=0)
        qk = tl.load(q_ptr + d64[None, :] * s_qd + i64[:, None] * s_qm, mask=i_ok[:, None] & d_ok[None, :],
                     other=0).to(ACC)
        acc = mm(acc, ggt, qk)
    if MEAN:
        real = _real(mask_ptr, b, t, t_ok, s_mb, s_mt, HAS_MASK)
        gc = tl.load(gc_ptr + b * D + d, mask=d_ok, other=0) / tl.maximum(tl.load(count_ptr + b + d * 0), 1.0)
        acc += tl.where(real[:, None], gc[None, :], 0.0)
    store_as(gh_ptr + b * T * D + t64[:, None] * D + d64[None, :], acc, t_ok[:, None] & d_ok[None, :])


# ---- launchers --------------------------------------------------------------------------------


def _check(h: Tensor, P: Tensor, Q: Tensor, mask: Tensor | None, context: Tensor | None):
    for name, x in (("h", h), ("P", P), ("Q", Q)):
        check_float(x, name)
    if h.dim() != 3 or P.dim() != 2 or Q.dim() != 2:
        raise ValueError("h must be [B, T, D], P and Q [D, m]")
    B, T, D = h.shape
    m = P.shape[1]
    if tuple(P.shape) != (D, m) or tuple(Q.shape) != (D, m):
        raise ValueError(f"P and Q must be [D={D}, m], got {list(P.shape)} and {list(Q.shape)}")
    if mask is not None and tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must be [B, T] = {[B, T]}, got {list(mask.shape)}")
    if context is not None and tuple(context.shape) != (B, D):
        raise ValueError(f"context must be [B, D] = {[B, D]}, got {list(context.shape)}")
    return B, T, D, m


class _Blocks:
    """Block sizes of one call: the GPU ones, or small ones under the interpreter and for float64
    (gradcheck sizes; big fp64 tiles take minutes to compile). Not autotuned."""

    def __init__(self, m: int, dtype: torch.dtype):
        small = dtype == torch.float64
        # (every dot here has fp32 operands: IEEE FMA chains, kept small so they compile fast)
        self.T = 16 if small else block(32, 16)
        self.K = 16 if small else block(32, 16)
        self.D = 16 if small else block(64, 16)
        self.H = 16
        self.M_P2 = pow2(m, 16)


def _context(h: Tensor, mask: Tensor | None, context: Tensor | None, acc: torch.dtype, bl: _Blocks):
    """(c fp32 [B, D], count fp32 [B] or None)."""
    B, T, D = h.shape
    if context is not None:
        return context.to(acc).contiguous(), None
    c = torch.empty((B, D), dtype=acc, device=h.device)
    count = torch.empty((B,), dtype=acc, device=h.device)
    m_arg, s_mb, s_mt = mask_arg(mask, h)
    _mean_kernel[(B, max(1, triton.cdiv(D, bl.D)))](h, m_arg, c, count, T, D, *h.stride(), s_mb, s_mt,
                                                     HAS_MASK=mask is not None, BLOCK_T=bl.T, BLOCK_D=bl.D, **EXACT)
    return c, count


def _forward(h, P, Q, mask, context, pooled_dtype, grad_attn=None):
    """(attn fp32 [B, m, T], pooled [B, m, D] of ``pooled_dtype``, c, count, u, da)."""
    B, T, D, m = _check(h, P, Q, mask, context)
    acc = acc_dtype(h.dtype)
    bl = _Blocks(m, h.dtype)
    dev = h.device
    c, count = _context(h, mask, context, acc, bl)
    u = torch.empty((B, m), dtype=acc, device=dev)
    bmm(c, (0, 0, c.stride(0), c.stride(1)), P, (0, 0, P.stride(0), P.stride(1)), u, (0, 0, m, 1), M=B, N=m, K=D)
    attn = torch.empty((B, m, T), dtype=acc, device=dev)
    m_arg, s_mb, s_mt = mask_arg(mask, h)
    has_mask = mask is not None
    _logits_kernel[(B, max(1, triton.cdiv(T, bl.T)))](
        h, Q, u, m_arg, attn, T, D, m, *h.stride(), *Q.stride(), s_mb, s_mt, HAS_MASK=has_mask, BLOCK_T=bl.T,
        BLOCK_K=bl.K, M_P2=bl.M_P2, **EXACT)
    pooled = torch.empty((B, m, D), dtype=pooled_dtype, device=dev)
    row_max = torch.empty((B, m), dtype=acc, device=dev)
    row_sum = torch.empty((B, m), dtype=acc, device=dev)
    heads = triton.cdiv(m, bl.H)
    _pool_kernel[(B, heads, max(1, triton.cdiv(D, bl.D)))](
        attn, h, m_arg, pooled, row_max, row_sum, T, D, m, *h.stride(), s_mb, s_mt, HAS_MASK=has_mask,
        BLOCK_H=bl.H, BLOCK_T=bl.T, BLOCK_D=bl.D, **EXACT)
    has_ga = grad_attn is not None
    da = torch.empty((B, m) if has_ga else (0,), dtype=acc, device=dev)
    ga = grad_attn if has_ga else attn
    _normalize_kernel[(B, heads)](attn, m_arg, row_max, row_sum, ga, da if has_ga else attn, T, m, s_mb, s_mt,
                                  *ga.stride(), HAS_MASK=has_mask, HAS_GA=has_ga, BLOCK_H=bl.H, BLOCK_T=bl.T,
                                  **EXACT)
    return attn, pooled, c, count, u, da


def lama_pool(h: Tensor, P: Tensor, Q: Tensor, mask: Tensor | None, context: Tensor | None) -> tuple[Tensor, Tensor]:
    """Triton launcher of ``mtmerge::lama_pool``.

    Parameters
    ----------
    h : Tensor
        ``[B, T, D]`` float32, bfloat16, float16 or float64, any strides.
    P, Q : Tensor
        ``[D, m]``, h's dtype, any strides.
    mask : Tensor or None
        ``[B, T]`` bool, True for a real token.
    context : Tensor or None
        ``[B, D]``; None: the masked mean of h (zeros for a row without real tokens).

    Returns
    -------
    attn : Tensor
        ``[B, m, T]`` fp32 (float64 for float64 h): the masked softmax over t of the heads' logits.
    pooled : Tensor
        ``[B, m, D]`` in h's dtype: attn @ h.
    """
    B, T, D, m = _check(h, P, Q, mask, context)
    if B == 0 or m == 0:
        acc = acc_dtype(h.dtype)
        return h.new_zeros((B, m, T), dtype=acc), h.new_zeros((B, m, D))
    attn, pooled, *_ = _forward(h, P, Q, mask, context, h.dtype)
    return attn, pooled


def lama_pool_backward(grad_attn: Tensor, grad_pooled: Tensor, h: Tensor, P: Tensor, Q: Tensor, mask: Tensor | None,
                       context: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton launcher of ``mtmerge::lama_pool_backward``.

    Parameters
    ----------
    grad_attn : Tensor
        ``[B, m, T]``, any float dtype: the gradient of attn.
    grad_pooled : Tensor
        ``[B, m, D]``, any float dtype: the gradient of pooled.
    h, P, Q, mask, context
        As in :func:`lama_pool`.

    Returns
    -------
    grad_h, grad_P, grad_Q : Tensor
        Shaped and typed like h, P, Q (contiguous).
    grad_context : Tensor
        ``[B, D]`` in context's dtype; an empty ``[0]`` tensor of h's dtype when context is None
        (the mean's gradient is in grad_h).
    """
    B, T, D, m = _check(h, P, Q, mask, context)
    check_float(grad_attn, "grad_attn")
    check_float(grad_pooled, "grad_pooled")
    if tuple(grad_attn.shape) != (B, m, T) or tuple(grad_pooled.shape) != (B, m, D):
        raise ValueError(f"grad_attn must be [B, m, T] = {[B, m, T]} and grad_pooled [B, m, D] = {[B, m, D]}")
    acc = acc_dtype(h.dtype)
    dev = h.device
    empty_ctx = h.new_empty((0,)) if context is None else None
    if B == 0 or m == 0 or D == 0:
        zeros = lambda x: torch.zeros(x.shape, dtype=x.dtype, device=dev)  # noqa: E731
        return zeros(h), zeros(P), zeros(Q), (empty_ctx if context is None else zeros(context))
    bl = _Blocks(m, h.dtype)
    attn, pooled, c, count, u, da = _forward(h, P, Q, mask, context, acc, grad_attn=grad_attn)
    m_arg, s_mb, s_mt = mask_arg(mask, h)
    has_mask = mask is not None
    tiles_t = max(1, triton.cdiv(T, bl.T))
    gg = torch.empty((B, T, m), dtype=acc, device=dev)
    gu_part = torch.empty((B, tiles_t, m), dtype=acc, device=dev)
    _grad_logits_kernel[(B, tiles_t)](
        h, Q, u, m_arg, attn, grad_attn, grad_pooled, pooled, da, gg, gu_part, T, D, m, *h.stride(), *Q.stride(),
        s_mb, s_mt, *grad_attn.stride(), *grad_pooled.stride(), HAS_MASK=has_mask, BLOCK_T=bl.T, BLOCK_K=bl.K,
        M_P2=bl.M_P2, **EXACT)
    gu = gu_part.sum(dim=1)  # over the T blocks, on the device (a fixed-order reduction)
    # grad_Q = sum_b h_b^T gg_b, grad_P = c^T gu, gc = gu P^T
    grad_Q = torch.empty((D, m), dtype=Q.dtype, device=dev)
    bmm(h, (h.stride(0), 0, h.stride(2), h.stride(1)), gg, (T * m, 0, m, 1), grad_Q, (0, 0, m, 1), M=D, N=m, K=T, Z=B,
        reduce=True)
    grad_P = torch.empty((D, m), dtype=P.dtype, device=dev)
    bmm(c, (0, 0, c.stride(1), c.stride(0)), gu, (0, 0, gu.stride(0), gu.stride(1)), grad_P, (0, 0, m, 1), M=D, N=m,
        K=B)
    gc = torch.empty((B, D), dtype=acc if context is None else context.dtype, device=dev)
    bmm(gu, (0, 0, gu.stride(0), gu.stride(1)), P, (0, 0, P.stride(1), P.stride(0)), gc, (0, 0, D, 1), M=B, N=D, K=m)
    grad_h = torch.empty((B, T, D), dtype=h.dtype, device=dev)
    if T:
        _grad_h_kernel[(B, tiles_t, triton.cdiv(D, bl.D))](
            attn, grad_pooled, gg, Q, gc, count if count is not None else gc, m_arg, grad_h, T, D, m,
            *grad_pooled.stride(), *Q.stride(), s_mb, s_mt, MEAN=context is None, HAS_MASK=has_mask, BLOCK_T=bl.T,
            BLOCK_D=bl.D, BLOCK_K=16, **EXACT)
    return grad_h, grad_P, grad_Q, (empty_ctx if context is None else gc)


__all__ = ["lama_pool", "lama_pool_backward"]
