"""``linformer_attention`` and ``linformer_attention_backward``: attention over keys and values
projected along the sequence to r rows.

Forward, per batch-head z = b * Hh + h:

1. kp = E[:, :N] k0 and vp = F[:, :N] v0 with the batched GEMM of ``_common`` (fp32 accumulation,
   fp32 results [Z, r, d]); the padded rows of k and v are never read (k0, v0 = 0 there), so their
   values, NaN included, do not matter.
2. :func:`_attn_fwd_kernel`, flash-style: per block of queries, a loop over blocks of the r
   projected keys with an online softmax (running max and sum in fp32).

Backward (the op saves nothing, so everything is recomputed from the inputs): kp and vp again,
then :func:`_attn_fwd_kernel` in its backward mode stores the logsumexp and
delta = rowsum(grad_out * out) per query (flash-attention's preprocessing);
:func:`_attn_dq_kernel` (per block of queries, looping over r) gives grad_q;
:func:`_attn_dkv_kernel` (per block of r, looping over every query block: non-causal) gives gkp
and gvp in fp32. Then grad_k = E[:, :N]^T gkp
(0 at padded rows), grad_E[:, :N] = sum over (b, h) of gkp k0^T in (b, h) order (no atomics;
columns N: stay 0), and the same for v and F.

Precision: fp32 and fp64 inputs compute in their own dtype throughout (fp32 dots in IEEE
precision). For bf16/fp16 inputs the attention dots take kp, vp and the probabilities rounded to
the input dtype (fp32 accumulation and statistics), as flash attention does; the projections and
the weight gradients stay in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import EXACT, MASK_K, MASK_M, MASK_N, acc_dtype, autotune, bmm, check_float, mm, pow2, round_to, store_as

# Attention tiles on a GPU (autotuned per shape); the first config is the interpreter's.
ATTN_CONFIGS = [
    triton.Config({"BLOCK_Q": 16, "BLOCK_R": 16}, num_warps=1),
    triton.Config({"BLOCK_Q": 32, "BLOCK_R": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_Q": 64, "BLOCK_R": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_Q": 128, "BLOCK_R": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_Q": 64, "BLOCK_R": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_Q": 32, "BLOCK_R": 64}, num_warps=4, num_stages=2),
]



def _attn_volume(c: dict, args: dict) -> tuple[int, bool]:
    return c["BLOCK_Q"] * c["BLOCK_R"] * args["D_P2"], False


def _attn_autotune(key: list[str]):
    return autotune(ATTN_CONFIGS, key=key, operands=("q_ptr",), volume=_attn_volume)


@triton.jit
def _operand(x, LOW: tl.constexpr, DT: tl.constexpr):
    """A dot operand: rounded to the inputs' 16-bit dtype DT when LOW, else as is (fp32/fp64)."""
    if LOW:
        return round_to(x, DT)
    else:
        return x


@triton.jit
def _load_rows(ptr, base, rows, r_ok, cols, c_ok, s_r, s_c):
    return tl.load(ptr + base + rows.to(tl.int64)[:, None] * s_r + cols.to(tl.int64)[None, :] * s_c,
                   mask=r_ok[:, None] & c_ok[None, :], other=0)


@_attn_autotune(key=["Nq", "R", "D_P2", "BWD"])
@triton.jit
def _attn_fwd_kernel(q_ptr, kp_ptr, vp_ptr, scale_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, Nq, R, D, HEADS,
                     s_qb, s_qh, s_qn, s_qd, s_ob, s_oh, s_on, s_od, BWD: tl.constexpr, LOW: tl.constexpr,
                     D_P2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """out = softmax(q kp^T * scale) vp for a block of queries (kp, vp: fp32 [Z, R, D]).
    BWD: instead of out, store lse = max + log(sum) and delta = rowsum(do * out) (fp32 [Z, Nq]);
    ``do``/``o`` share the strides s_o*."""
    z = tl.program_id(1)
    zb = (z // HEADS).to(tl.int64)
    zh = (z % HEADS).to(tl.int64)
    qi = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qi < Nq
    dd = tl.arange(0, D_P2)
    d_ok = dd < D
    q = _load_rows(q_ptr, zb * s_qb + zh * s_qh, qi, q_ok, dd, d_ok, s_qn, s_qd)
    ACC: tl.constexpr = kp_ptr.dtype.element_ty
    DT: tl.constexpr = q_ptr.dtype.element_ty
    if not LOW:
        q = q.to(ACC)
    scale = tl.load(scale_ptr)
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_Q], dtype=ACC)
    acc = tl.zeros([BLOCK_Q, D_P2], dtype=ACC)
    kv = z.to(tl.int64) * R * D
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        r_ok = r < R
        k = _operand(_load_rows(kp_ptr, kv, r, r_ok, dd, d_ok, D, 1), LOW, DT)
        s = mm(tl.zeros([BLOCK_Q, BLOCK_R], dtype=ACC), q, tl.trans(k)) * scale
        s = tl.where(r_ok[None, :], s, float("-inf"))
        # r >= 1 and every r-block holds a real column: m_new is finite from the first block on
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _operand(_load_rows(vp_ptr, kv, r, r_ok, dd, d_ok, D, 1), LOW, DT)
        acc = mm(acc * alpha[:, None], _operand(p, LOW, DT), v)
        m_i = m_new
    out = acc / l_i[:, None]
    o_base = zb * s_ob + zh * s_oh
    tile = q_ok[:, None] & d_ok[None, :]
    if BWD:
        do = _load_rows(do_ptr, o_base, qi, q_ok, dd, d_ok, s_on, s_od).to(ACC)
        row = z.to(tl.int64) * Nq + qi
        tl.store(delta_ptr + row, tl.sum(do * out, axis=1), mask=q_ok)
        tl.store(lse_ptr + row, m_i + tl.log(l_i), mask=q_ok)
    else:
        store_as(o_ptr + o_base + qi.to(tl.int64)[:, None] * s_on + dd[None, :] * s_od, out, tile)


@_attn_autotune(key=["Nq", "R", "D_P2"])
@triton.jit
def _attn_dq_kernel(q_ptr, kp_ptr, vp_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, Nq, R, D, HEADS,
                    s_qb, s_qh, s_qn, s_qd, s_ob, s_oh, s_on, s_od, LOW: tl.constexpr, D_P2: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """grad_q = scale * sum_j ds_j kp_j, ds = p (dp - delta), p = exp(s - lse), dp = do vp^T;
    grad_q contiguous [B, Hh, Nq, D] in q's dtype."""
    z = tl.program_id(1)
    zb = (z // HEADS).to(tl.int64)
    zh = (z % HEADS).to(tl.int64)
    qi = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qi < Nq
    dd = tl.arange(0, D_P2)
    d_ok = dd < D
    ACC: tl.constexpr = kp_ptr.dtype.element_ty
    DT: tl.constexpr = q_ptr.dtype.element_ty
    q = _load_rows(q_ptr, zb * s_qb + zh * s_qh, qi, q_ok, dd, d_ok, s_qn, s_qd)
    do = _load_rows(do_ptr, zb * s_ob + zh * s_oh, qi, q_ok, dd, d_ok, s_on, s_od)
    if LOW:
        do = round_to(do, DT)
    else:
        q = q.to(ACC)
        do = do.to(ACC)
    row = z.to(tl.int64) * Nq + qi
    lse = tl.load(lse_ptr + row, mask=q_ok, other=0)
    delta = tl.load(delta_ptr + row, mask=q_ok, other=0)
    scale = tl.load(scale_ptr)
    dq = tl.zeros([BLOCK_Q, D_P2], dtype=ACC)
    kv = z.to(tl.int64) * R * D
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        r_ok = r < R
        k = _operand(_load_rows(kp_ptr, kv, r, r_ok, dd, d_ok, D, 1), LOW, DT)
        v = _operand(_load_rows(vp_ptr, kv, r, r_ok, dd, d_ok, D, 1), LOW, DT)
        s = mm(tl.zeros([BLOCK_Q, BLOCK_R], dtype=ACC), q, tl.trans(k)) * scale
        p = tl.where(r_ok[None, :] & q_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = mm(tl.zeros([BLOCK_Q, BLOCK_R], dtype=ACC), do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = mm(dq, _operand(ds, LOW, DT), k)
    store_as(dq_ptr + z.to(tl.int64) * Nq * D + qi.to(tl.int64)[:, None] * D + dd[None, :], dq * scale,
             q_ok[:, None] & d_ok[None, :])


@_attn_autotune(key=["Nq", "R", "D_P2"])
@triton.jit
def _attn_dkv_kernel(q_ptr, kp_ptr, vp_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr, dkp_ptr, dvp_ptr, Nq, R, D,
                     HEADS, s_qb, s_qh, s_qn, s_qd, s_ob, s_oh, s_on, s_od, LOW: tl.constexpr, D_P2: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """For a block of the r projected keys, over every query (non-causal): gvp = p^T do and
    gkp = scale * ds^T q, fp32 [Z, R, D]."""
    z = tl.program_id(1)
    zb = (z // HEADS).to(tl.int64)
    zh = (z % HEADS).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    dd = tl.arange(0, D_P2)
    d_ok = dd < D
    ACC: tl.constexpr = kp_ptr.dtype.element_ty
    DT: tl.constexpr = q_ptr.dtype.element_ty
    kv = z.to(tl.int64) * R * D
    k = _operand(_load_rows(kp_ptr, kv, r, r_ok, dd, d_ok, D, 1), LOW, DT)
    v = _operand(_load_rows(vp_ptr, kv, r, r_ok, dd, d_ok, D, 1), LOW, DT)
    scale = tl.load(scale_ptr)
    dk = tl.zeros([BLOCK_R, D_P2], dtype=ACC)
    dv = tl.zeros([BLOCK_R, D_P2], dtype=ACC)
    qq = tl.arange(0, BLOCK_Q)
    q_base = zb * s_qb + zh * s_qh
    o_base = zb * s_ob + zh * s_oh
    for q0 in range(0, Nq, BLOCK_Q):
        qi = q0 + qq
        q_ok = qi < Nq
        q = _load_rows(q_ptr, q_base, qi, q_ok, dd, d_ok, s_qn, s_qd)
        do = _load_rows(do_ptr, o_base, qi, q_ok, dd, d_ok, s_on, s_od)
        if LOW:
            do = round_to(do, DT)
        else:
            q = q.to(ACC)
            do = do.to(ACC)
        row = z.to(tl.int64) * Nq + qi
        lse = tl.load(lse_ptr + row, mask=q_ok, other=0)
        delta = tl.load(delta_ptr + row, mask=q_ok, other=0)
        st = mm(tl.zeros([BLOCK_R, BLOCK_Q], dtype=ACC), k, tl.trans(q)) * scale  # s^T
        pt = tl.where(q_ok[None, :] & r_ok[:, None], tl.exp(st - lse[None, :]), 0.0)
        dv = mm(dv, _operand(pt, LOW, DT), do)
        dpt = mm(tl.zeros([BLOCK_R, BLOCK_Q], dtype=ACC), v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk = mm(dk, _operand(dst, LOW, DT), q)
    tile = r_ok[:, None] & d_ok[None, :]
    offs = kv + r.to(tl.int64)[:, None] * D + dd[None, :]
    tl.store(dkp_ptr + offs, dk * scale, mask=tile)
    tl.store(dvp_ptr + offs, dv, mask=tile)


# ---- launchers --------------------------------------------------------------------------------


def _check(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, key_padding_mask: Tensor | None):
    for name, x in (("q", q), ("k", k), ("v", v), ("E", E), ("F", F)):
        check_float(x, name)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or E.dim() != 2 or F.dim() != 2:
        raise ValueError("q, k, v must be [B, Hh, N, d] and E, F [r, Nmax]")
    B, H, Nq, d = q.shape
    N = k.shape[2]
    r, n_max = E.shape
    if tuple(k.shape) != (B, H, N, d) or tuple(v.shape) != (B, H, N, d):
        raise ValueError(f"k and v must be [B, Hh, N, d] with q's B, Hh, d: {list(k.shape)}, {list(v.shape)}")
    if tuple(F.shape) != (r, n_max) or N > n_max:
        raise ValueError(f"E and F must be [r, Nmax] with N={N} <= Nmax: {list(E.shape)}, {list(F.shape)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, N):
        raise ValueError(f"key_padding_mask must be [B, N] = {[B, N]}, got {list(key_padding_mask.shape)}")
    return B, H, Nq, N, d, r


def _project(x: Tensor, W: Tensor, mask: Tensor | None, r: int, acc: torch.dtype) -> Tensor:
    """W[:, :N] x0 for x [B, Hh, N, d]: fp32 [B, Hh, r, d] (padded rows of x never read)."""
    B, H, N, d = x.shape
    out = torch.empty((B, H, r, d), dtype=acc, device=x.device)
    bmm(W, (0, 0, W.stride(0), W.stride(1)), x, x.stride(), out, out.stride(), M=r, N=d, K=N, Z=B * H, heads=H,
        mask=mask, mask_mode=MASK_K, drop=True)
    return out


def _lse_delta(q, kp, vp, scale, grad_out, r, low, d_p2):
    B, H, Nq, d = q.shape
    lse = torch.empty((B * H, Nq), dtype=kp.dtype, device=q.device)
    delta = torch.empty((B * H, Nq), dtype=kp.dtype, device=q.device)
    if Nq:
        grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_Q"]), B * H)  # noqa: E731
        _attn_fwd_kernel[grid](q, kp, vp, scale, grad_out, grad_out, lse, delta, Nq, r, d, H, *q.stride(),
                               *grad_out.stride(), BWD=True, LOW=low, D_P2=d_p2, **EXACT)
    return lse, delta


def _scale(scale: float, acc: torch.dtype, device) -> Tensor:
    # a device scalar in the compute dtype (a Python float argument would be fp32 in the kernel)
    return torch.full((1,), float(scale), dtype=acc, device=device)


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, key_padding_mask: Tensor | None,
                        scale: float) -> Tensor:
    """Triton launcher of ``mtmerge::linformer_attention``.

    Parameters
    ----------
    q : Tensor
        ``[B, Hh, Nq, d]`` float32, bfloat16, float16 or float64, any strides.
    k, v : Tensor
        ``[B, Hh, N, d]``, q's dtype, any strides.
    E, F : Tensor
        ``[r, Nmax]`` with N <= Nmax (columns 0:N are used).
    key_padding_mask : Tensor or None
        ``[B, N]`` bool, True for padding.
    scale : float
        Multiplies the scores.

    Returns
    -------
    Tensor
        ``[B, Hh, Nq, d]`` in q's dtype (contiguous): softmax(q kp^T * scale) vp.
    """
    B, H, Nq, _, d, r = _check(q, k, v, E, F, key_padding_mask)
    out = torch.empty((B, H, Nq, d), dtype=q.dtype, device=q.device)
    if B * H * Nq == 0 or r == 0:
        return out.zero_()
    acc = acc_dtype(q.dtype)
    kp = _project(k, E, key_padding_mask, r, acc)
    vp = _project(v, F, key_padding_mask, r, acc)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_Q"]), B * H)  # noqa: E731
    _attn_fwd_kernel[grid](q, kp, vp, _scale(scale, acc, q.device), out, out, out, out, Nq, r, d, H, *q.stride(),
                           *out.stride(), BWD=False, LOW=q.dtype in (torch.bfloat16, torch.float16),
                           D_P2=pow2(d, 16), **EXACT)
    return out


def linformer_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor,
                                 key_padding_mask: Tensor | None,
                                 scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton launcher of ``mtmerge::linformer_attention_backward``.

    Parameters
    ----------
    grad_out : Tensor
        ``[B, Hh, Nq, d]``, any float dtype, any strides.
    q, k, v, E, F, key_padding_mask, scale
        As in :func:`linformer_attention`.

    Returns
    -------
    grad_q, grad_k, grad_v, grad_E, grad_F : Tensor
        Shaped and typed like q, k, v, E, F (contiguous); grad_k and grad_v are 0 at padded rows,
        grad_E and grad_F 0 in columns N:.
    """
    B, H, Nq, N, d, r = _check(q, k, v, E, F, key_padding_mask)
    check_float(grad_out, "grad_out")
    if tuple(grad_out.shape) != (B, H, Nq, d):
        raise ValueError(f"grad_out must be [B, Hh, Nq, d] = {[B, H, Nq, d]}, got {list(grad_out.shape)}")
    dev = q.device
    acc = acc_dtype(q.dtype)
    grad_q = torch.zeros((B, H, Nq, d), dtype=q.dtype, device=dev)
    grad_k = torch.zeros((B, H, N, d), dtype=k.dtype, device=dev)
    grad_v = torch.zeros((B, H, N, d), dtype=v.dtype, device=dev)
    grad_E = torch.zeros(E.shape, dtype=E.dtype, device=dev)
    grad_F = torch.zeros(F.shape, dtype=F.dtype, device=dev)
    if B * H * Nq == 0 or r == 0:
        return grad_q, grad_k, grad_v, grad_E, grad_F
    low = q.dtype in (torch.bfloat16, torch.float16)
    d_p2 = pow2(d, 16)
    sc = _scale(scale, acc, dev)
    kp = _project(k, E, key_padding_mask, r, acc)
    vp = _project(v, F, key_padding_mask, r, acc)
    lse, delta = _lse_delta(q, kp, vp, sc, grad_out, r, low, d_p2)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_Q"]), B * H)  # noqa: E731
    _attn_dq_kernel[grid](q, kp, vp, sc, grad_out, lse, delta, grad_q, Nq, r, d, H, *q.stride(), *grad_out.stride(),
                          LOW=low, D_P2=d_p2, **EXACT)
    gkp = torch.empty_like(kp)
    gvp = torch.empty_like(vp)
    grid_r = lambda meta: (triton.cdiv(r, meta["BLOCK_R"]), B * H)  # noqa: E731
    _attn_dkv_kernel[grid_r](q, kp, vp, sc, grad_out, lse, delta, gkp, gvp, Nq, r, d, H, *q.stride(),
                             *grad_out.stride(), LOW=low, D_P2=d_p2, **EXACT)
    for gxp, W, x, gx, gW in ((gkp, E, k, grad_k, grad_E), (gvp, F, v, grad_v, grad_F)):
        # grad_x[z] = W[:, :N]^T gxp[z], 0 at padded rows
        bmm(W, (0, 0, W.stride(1), W.stride(0)), gxp, gxp.stride(), gx, gx.stride(), M=N, N=d, K=r, Z=B * H,
            heads=H, mask=key_padding_mask, mask_mode=MASK_M, drop=True)
        # grad_W[:, :N] = sum_z gxp[z] x0[z]^T, in z order
        bmm(gxp, gxp.stride(), x, (x.stride(0), x.stride(1), x.stride(3), x.stride(2)), gW, (0, 0, *gW.stride()),
            M=r, N=N, K=d, Z=B * H, heads=H, reduce=True, mask=key_padding_mask, mask_mode=MASK_N, drop=True)
    return grad_q, grad_k, grad_v, grad_E, grad_F


__all__ = ["linformer_attention", "linformer_attention_backward"]
