"""``moe_experts`` and ``moe_experts_backward``: dropless experts as grouped GEMMs over the slots
sorted by expert.

Forward, for the n = T * k slots (slot s = t * k + j, token t = s // k):

1. :func:`~.align.moe_align` sorts the slots by expert on the device (skipped for a few slots:
   the DIRECT path, where each tile is one slot; decode).
2. :func:`_gate_up_kernel`: per tile of one expert's sorted slots, the gathered x rows times
   gate_up[e]^T in two accumulators (gate rows and up rows), the activation in the epilogue, and
   ``a`` stored per slot, rounded to x's dtype.
3. :func:`_grouped_kernel`: the down GEMM of ``a`` into an fp32 per-slot buffer ``o`` (+ bias).
4. :func:`_combine_kernel`: y[t] = sum_j w[t, j] * o[t * k + j] in j order (fixed order, no atomics).

Backward recomputes h and a, then: o (for grad_weights, a per-slot dot), g_h (down^T times the
token's grad_out, scaled by w, through the activation's derivative; the grouped kernel's second
epilogue), grad_x (gate_up^T g_h per slot, then the fixed-order combine) and the weight gradients
as per-expert GEMMs over the expert's sorted slots, in slot order (:func:`_expert_grad_kernel`).

Weights are read through their strides (transposed views welcome); every tile's expert comes
from the device-side offsets, so nothing is read back to the host. fp32 accumulation (fp64 for
fp64 inputs); fp32 dots in IEEE precision, never TF32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    EXACT,
    activate,
    activate_backward,
    activation_code,
    block,
    check_float,
    gate_up_rows,
    gemm_autotune,
    launch_gemm,
    mm,
    pow2,
    round_to,
    store_as,
    tile_rows,
)
from .align import moe_align

# At most this many slots: the DIRECT path (no sort; each tile is one slot).
SMALL_BATCH_SLOTS = 16


@gemm_autotune(key=["N", "K", "M_BUCKET", "ACT", "DIRECT", "HAS_BIAS", "STORE_H"])
@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, bias_ptr, offsets_ptr, sorted_ptr, ids_ptr, a_ptr, h_ptr,
                    E, N, K, topk, stride_x, s_we, s_wr, s_wk, M_BUCKET,
                    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr, DIRECT: tl.constexpr,
                    E_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """a[s, n] = act(gate) * up for the tile's slots s, with (gate, up) = gate_up[e] rows
    gate_up_rows(n) dotted with x[s // topk]; N = F, K = H. STORE_H: also h[s, :] (fp32, [n, 2F])."""
    e, slots, rows = tile_rows(tl.program_id(0), offsets_ptr, sorted_ptr, ids_ptr, E, DIRECT, BLOCK_M, E_P2)
    if e < E:
        ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
        tokens = slots // topk
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        rg, ru = gate_up_rows(n.to(tl.int64), N, ACT)
        w_e = w_ptr + e.to(tl.int64) * s_we
        kk = tl.arange(0, BLOCK_K)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            k_ok = k < K
            xa = tl.load(x_ptr + tokens[:, None] * stride_x + k[None, :], mask=rows[:, None] & k_ok[None, :], other=0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            wk = k.to(tl.int64)[:, None] * s_wk
            acc_g = mm(acc_g, xa, tl.load(w_e + rg[None, :] * s_wr + wk, mask=w_mask, other=0))
            acc_u = mm(acc_u, xa, tl.load(w_e + ru[None, :] * s_wr + wk, mask=w_mask, other=0))
        if HAS_BIAS:
            b_e = bias_ptr + e.to(tl.int64) * (2 * N)
            acc_g += tl.load(b_e + rg, mask=n_ok, other=0).to(ACC)[None, :]
            acc_u += tl.load(b_e + ru, mask=n_ok, other=0).to(ACC)[None, :]
        out = rows[:, None] & n_ok[None, :]
        if STORE_H:
            h_rows = h_ptr + slots[:, None] * (2 * N)
            tl.store(h_rows + rg[None, :], acc_g, mask=out)
            tl.store(h_rows + ru[None, :], acc_u, mask=out)
        store_as(a_ptr + slots[:, None] * N + n[None, :], activate(acc_g, acc_u, ACT), out)


@gemm_autotune(key=["N", "K", "M_BUCKET", "EPI", "IN_BY_TOKEN", "DIRECT", "HAS_BIAS", "ACT"])
@triton.jit
def _grouped_kernel(in_ptr, w_ptr, bias_ptr, scale_ptr, h_ptr, offsets_ptr, sorted_ptr, ids_ptr, out_ptr,
                    E, N, K, topk, stride_in, s_we, s_wn, s_wk, M_BUCKET,
                    IN_BY_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, EPI: tl.constexpr, ACT: tl.constexpr,
                    DIRECT: tl.constexpr, E_P2: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[s, n] = sum_k in[row(s), k] * W_e(n, k), W_e(n, k) = w[e, n, k] through the strides
    (row(s) = s // topk if IN_BY_TOKEN else s). The input is rounded to w's dtype for the dot.

    EPI 0: out[s, n] = acc (+ bias[e, n]), fp32 [n_slots, N].
    EPI 1: out[s, :] = g_h, the activation's backward at h[s, :] for g_a = scale[s] * acc
    (N = F; out and h fp32 [n_slots, 2F]).
    """
    e, slots, rows = tile_rows(tl.program_id(0), offsets_ptr, sorted_ptr, ids_ptr, E, DIRECT, BLOCK_M, E_P2)
    if e < E:
        ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
        in_rows = slots // topk if IN_BY_TOKEN else slots
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        w_e = w_ptr + e.to(tl.int64) * s_we + n.to(tl.int64)[None, :] * s_wn
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            k_ok = k < K
            xa = tl.load(in_ptr + in_rows[:, None] * stride_in + k[None, :], mask=rows[:, None] & k_ok[None, :],
                         other=0)
            wb = tl.load(w_e + k.to(tl.int64)[:, None] * s_wk, mask=k_ok[:, None] & n_ok[None, :], other=0)
            acc = mm(acc, round_to(xa, wb.dtype), wb)
        out = rows[:, None] & n_ok[None, :]
        if EPI == 0:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + e.to(tl.int64) * N + n, mask=n_ok, other=0).to(ACC)[None, :]
            tl.store(out_ptr + slots[:, None] * N + n[None, :], acc, mask=out)
        else:
            ga = acc * tl.load(scale_ptr + slots, mask=rows, other=0).to(ACC)[:, None]
            rg, ru = gate_up_rows(n.to(tl.int64), N, ACT)
            h_rows = h_ptr + slots[:, None] * (2 * N)
            g = tl.load(h_rows + rg[None, :], mask=out, other=0)
            u = tl.load(h_rows + ru[None, :], mask=out, other=0)
            dg, du = activate_backward(g, u, ga, ACT)
            o_rows = out_ptr + slots[:, None] * (2 * N)
            tl.store(o_rows + rg[None, :], dg, mask=out)
            tl.store(o_rows + ru[None, :], du, mask=out)


@triton.jit
def _combine_kernel(o_ptr, w_ptr, ids_ptr, y_ptr, E, H, topk, HAS_W: tl.constexpr, BLOCK_H: tl.constexpr):
    """y[t, :] = sum_j w[t, j] * o[t * topk + j, :] over the routed slots, in j order, in o's dtype
    (fp32 or fp64); without HAS_W the plain sum."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    acc = tl.zeros([BLOCK_H], dtype=o_ptr.dtype.element_ty)
    for j in range(topk):
        s = t * topk + j
        e = tl.load(ids_ptr + s + h * 0)  # broadcast: the interpreter rejects scalar & vector masks
        valid = (e >= 0) & (e < E)
        o = tl.load(o_ptr + s * H + h, mask=h_ok & valid, other=0)
        if HAS_W:
            acc += tl.where(valid, tl.load(w_ptr + s + h * 0).to(acc.dtype) * o, 0.0)
        else:
            acc += o
    store_as(y_ptr + t * H + h, acc, h_ok)


@triton.jit
def _slot_dot_kernel(g_ptr, o_ptr, ids_ptr, out_ptr, E, H, topk, BLOCK_H: tl.constexpr):
    """out[s] = <g[s // topk, :], o[s, :]> for routed slots s, 0 for the others."""
    s = tl.program_id(0).to(tl.int64)
    hh = tl.arange(0, BLOCK_H)
    e = tl.load(ids_ptr + s + hh * 0)  # broadcast: the interpreter rejects scalar & vector masks
    valid = (e >= 0) & (e < E)
    acc = tl.zeros([BLOCK_H], dtype=o_ptr.dtype.element_ty)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hh
        m = (h < H) & valid
        acc += tl.load(g_ptr + (s // topk) * H + h, mask=m, other=0).to(acc.dtype) * tl.load(o_ptr + s * H + h,
                                                                                           mask=m, other=0)
    store_as(out_ptr + s, tl.sum(acc, axis=0), True)


@gemm_autotune(key=["M", "N", "LEFT_BY_TOKEN", "SCALE", "HAS_BIAS"])
@triton.jit
def _expert_grad_kernel(l_ptr, r_ptr, scale_ptr, offsets_ptr, sorted_ptr, out_ptr, bias_ptr, M, N, topk,
                        stride_l, stride_r, LEFT_BY_TOKEN: tl.constexpr, SCALE: tl.constexpr,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """out[e] = sum over expert e's sorted slots s of L(s)^T R(s), in slot order ([M, N], out's dtype)
    with L(s) = l[lrow(s), :] (* scale[s]) and R(s) = r[rrow(s), :]; one of lrow, rrow is the token
    s // topk (LEFT_BY_TOKEN: lrow), the other the slot. HAS_BIAS: bias[e] = sum_s L(s)."""
    e = tl.program_id(0).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    m = (tl.program_id(1) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_n = tl.program_id(1) % tiles_n
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    ACC: tl.constexpr = tl.float64 if r_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    # the bias sum stays 2-D in the loop, reduced once after it (a reduction inside the loop trips
    # Triton 3.6's OptimizeThreadLocality pass)
    bias = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    kk = tl.arange(0, BLOCK_K)
    for p0 in range(lo, hi, BLOCK_K):
        p = p0 + kk
        p_ok = p < hi
        slots = tl.load(sorted_ptr + p, mask=p_ok, other=0)
        lrow = slots // topk if LEFT_BY_TOKEN else slots
        rrow = slots if LEFT_BY_TOKEN else slots // topk
        left = tl.load(l_ptr + lrow[None, :] * stride_l + m[:, None], mask=m_ok[:, None] & p_ok[None, :],
                       other=0).to(ACC)
        if SCALE:
            left = left * tl.load(scale_ptr + slots, mask=p_ok, other=0).to(ACC)[None, :]
        if HAS_BIAS:
            bias += left
        right = tl.load(r_ptr + rrow[:, None] * stride_r + n[None, :], mask=p_ok[:, None] & n_ok[None, :], other=0)
        acc = mm(acc, round_to(left, right.dtype), right)
    store_as(out_ptr + e * M * N + m[:, None] * N + n[None, :], acc, m_ok[:, None] & n_ok[None, :])
    if HAS_BIAS:
        store_as(bias_ptr + e * M + m, tl.sum(bias, axis=1), m_ok & (m * 0 + pid_n == 0))


# ---- launchers --------------------------------------------------------------------------------


class _Routing:
    """The slot schedule shared by the grouped launches: sorted (with moe_align) or DIRECT."""

    def __init__(self, ids: Tensor, num_experts: int, direct: bool):
        self.ids = ids.reshape(-1).contiguous()
        self.n = self.ids.numel()
        self.E = num_experts
        self.direct = direct
        if direct:
            self.sorted = self.offsets = self.ids
        else:
            self.sorted, self.offsets, _ = moe_align(ids, num_experts, -1)

    def grid(self, N: int):
        if self.direct:
            return lambda meta: (self.n, triton.cdiv(N, meta["BLOCK_N"]))
        return lambda meta: (triton.cdiv(self.n, meta["BLOCK_M"]) + self.E, triton.cdiv(N, meta["BLOCK_N"]))

    def args(self) -> dict:
        return {"offsets_ptr": self.offsets, "sorted_ptr": self.sorted, "ids_ptr": self.ids}

    def meta(self) -> dict:
        return {"M_BUCKET": pow2(self.n), "DIRECT": self.direct, "E_P2": pow2(self.E + 1)}


def _inputs(x: Tensor, gate_up: Tensor, down: Tensor, weights: Tensor, ids: Tensor, gate_up_bias: Tensor | None,
            down_bias: Tensor | None):
    """Cheap defensive checks (the public wrapper validates); the small inputs made contiguous."""
    for name, t in (("x", x), ("gate_up", gate_up), ("down", down), ("weights", weights)):
        check_float(t, name)
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3 or ids.dim() != 2:
        raise ValueError("x must be [T, H], gate_up [E, 2F, H], down [E, H, F] and ids [T, k]")
    T, H = x.shape
    E, F2, _ = gate_up.shape
    if (tuple(gate_up.shape) != (E, F2, H) or F2 % 2 or tuple(down.shape) != (E, H, F2 // 2)
            or ids.shape[0] != T or tuple(weights.shape) != tuple(ids.shape)):
        raise ValueError(f"shape mismatch: x {list(x.shape)}, gate_up {list(gate_up.shape)}, down "
                         f"{list(down.shape)}, weights {list(weights.shape)}, ids {list(ids.shape)}")
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise TypeError(f"gate_up and down must have x's dtype {x.dtype}, got {gate_up.dtype} and {down.dtype}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    gub = None if gate_up_bias is None else gate_up_bias.reshape(E, F2).contiguous()
    db = None if down_bias is None else down_bias.reshape(E, H).contiguous()
    return x, weights.contiguous(), ids.contiguous(), gub, db


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gate_up(x, gate_up, bias, route: _Routing, act: int, store_h: bool, topk: int):
    """``a`` [n, F] (x's dtype) and, with ``store_h``, ``h`` [n, 2F] fp32 (fp64 for fp64 x)."""
    n, F, H = route.n, gate_up.shape[1] // 2, x.shape[1]
    a = torch.empty((n, F), dtype=x.dtype, device=x.device)
    h = torch.empty((n, 2 * F) if store_h else (0,), dtype=_acc_dtype(x), device=x.device)
    if F:
        launch_gemm(
            _gate_up_kernel, route.grid(F), x.dtype == torch.float64, x, gate_up, x if bias is None else bias,
            a_ptr=a, h_ptr=h if store_h else a, E=route.E, N=F, K=H, topk=topk, stride_x=x.stride(0),
            s_we=gate_up.stride(0), s_wr=gate_up.stride(1), s_wk=gate_up.stride(2), ACT=act,
            HAS_BIAS=bias is not None, STORE_H=store_h, **route.args(), **route.meta(), **EXACT)
    return a, h


def _grouped(inp, w, strides, N: int, K: int, route: _Routing, topk: int, out_dtype: torch.dtype, *,
             in_by_token: bool, bias=None, scale=None, h=None, act: int = 0):
    """The grouped GEMM of :func:`_grouped_kernel`; EPI 1 (activation backward) when ``h`` is given."""
    epi = 0 if h is None else 1
    out = torch.empty((route.n, N if epi == 0 else 2 * N), dtype=out_dtype, device=inp.device)
    if N:
        launch_gemm(
            _grouped_kernel, route.grid(N), out_dtype == torch.float64, inp, w, inp if bias is None else bias,
            inp if scale is None else scale, inp if h is None else h, out_ptr=out, E=route.E, N=N, K=K, topk=topk,
            stride_in=inp.stride(0), s_we=strides[0], s_wn=strides[1], s_wk=strides[2], IN_BY_TOKEN=in_by_token,
            HAS_BIAS=bias is not None, EPI=epi, ACT=act, **route.args(), **route.meta(), **EXACT)
    return out


def _combine(o: Tensor, weights: Tensor | None, ids: Tensor, E: int, T: int, topk: int, dtype: torch.dtype):
    H = o.shape[1]
    y = torch.empty((T, H), dtype=dtype, device=o.device)
    if T and H:
        BLOCK_H = min(pow2(H), block(1024, 16))
        _combine_kernel[(T, triton.cdiv(H, BLOCK_H))](o, o if weights is None else weights, ids, y, E, H, topk,
                                                      HAS_W=weights is not None, BLOCK_H=BLOCK_H, **EXACT)
    return y


def moe_experts(x: Tensor, gate_up: Tensor, down: Tensor, weights: Tensor, ids: Tensor, activation: str,
                gate_up_bias: Tensor | None, down_bias: Tensor | None) -> Tensor:
    """Triton launcher of ``mtmerge::moe_experts``: y[t] = sum_j w[t, j] * FFN_{ids[t, j]}(x[t]).

    Parameters
    ----------
    x : Tensor
        ``[T, H]`` float32, bfloat16, float16 or float64.
    gate_up : Tensor
        ``[E, 2F, H]`` of x's dtype, any strides (gate rows 0:F, up rows F:2F; gpt_oss interleaves).
    down : Tensor
        ``[E, H, F]`` of x's dtype, any strides.
    weights : Tensor
        ``[T, k]`` routing weights, any float dtype (read in fp32).
    ids : Tensor
        int32/int64 ``[T, k]``; ids outside ``[0, E)`` contribute nothing.
    activation : {"silu", "gelu", "gelu_tanh", "relu", "gpt_oss"}
        The gated activation.
    gate_up_bias, down_bias : Tensor or None
        ``[E, 2F]`` and ``[E, H]`` of x's dtype.

    Returns
    -------
    Tensor
        ``[T, H]`` in x's dtype.
    """
    act = activation_code(activation)
    x, weights, ids, gub, db = _inputs(x, gate_up, down, weights, ids, gate_up_bias, down_bias)
    (T, H), E, topk = x.shape, gate_up.shape[0], ids.shape[1]
    F = gate_up.shape[1] // 2
    if T * topk == 0 or E == 0 or H == 0:
        return torch.zeros((T, H), dtype=x.dtype, device=x.device)
    route = _Routing(ids, E, direct=T * topk <= SMALL_BATCH_SLOTS)
    a, _ = _gate_up(x, gate_up, gub, route, act, False, topk)
    o = _grouped(a, down, (down.stride(0), down.stride(1), down.stride(2)), H, F, route, topk, _acc_dtype(x),
                 in_by_token=False, bias=db)
    return _combine(o, weights, route.ids, E, T, topk, x.dtype)


def _expert_grad(left, right, scale, route: _Routing, M: int, N: int, topk: int, dtype: torch.dtype, *,
                 left_by_token: bool, with_bias: bool):
    """Per-expert weight gradients ``[E, M, N]`` (and bias gradients ``[E, M]``) of
    :func:`_expert_grad_kernel`; zeros for experts without slots."""
    E = route.E
    out = torch.empty((E, M, N), dtype=dtype, device=left.device)
    bias = torch.empty((E, M) if with_bias else (0,), dtype=dtype, device=left.device)
    if E and M and N:
        grid = lambda meta: (E, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        launch_gemm(_expert_grad_kernel, grid, right.dtype == torch.float64, left, right,
                    left if scale is None else scale, route.offsets, route.sorted, out, bias if with_bias else out,
                    M, N, topk, left.stride(0), right.stride(0), LEFT_BY_TOKEN=left_by_token,
                    SCALE=scale is not None, HAS_BIAS=with_bias, **EXACT)
    else:
        out.zero_()
        bias.zero_()
    return out, bias


def moe_experts_backward(grad_out: Tensor, x: Tensor, gate_up: Tensor, down: Tensor, weights: Tensor, ids: Tensor,
                         activation: str, gate_up_bias: Tensor | None,
                         down_bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton launcher of ``mtmerge::moe_experts_backward``.

    Parameters
    ----------
    grad_out : Tensor
        ``[T, H]``, x's dtype: the gradient of :func:`moe_experts`' output.
    x, gate_up, down, weights, ids, activation, gate_up_bias, down_bias
        As in :func:`moe_experts`.

    Returns
    -------
    grad_x : Tensor
        ``[T, H]``, x's dtype.
    grad_gate_up, grad_down : Tensor
        ``[E, 2F, H]`` and ``[E, H, F]``, contiguous, the weights' dtype (zero for unused experts).
    grad_weights : Tensor
        ``[T, k]``, weights' dtype (0 for unrouted slots).
    grad_gate_up_bias, grad_down_bias : Tensor
        ``[E, 2F]`` and ``[E, H]``; empty ``[0]`` tensors of x's dtype when the bias is None.
    """
    act = activation_code(activation)
    check_float(grad_out, "grad_out")
    wdtype = weights.dtype
    x, weights, ids, gub, db = _inputs(x, gate_up, down, weights, ids, gate_up_bias, down_bias)
    if tuple(grad_out.shape) != tuple(x.shape):
        raise ValueError(f"grad_out must have x's shape {list(x.shape)}, got {list(grad_out.shape)}")
    go = grad_out.to(x.dtype).contiguous()
    (T, H), E, topk = x.shape, gate_up.shape[0], ids.shape[1]
    F = gate_up.shape[1] // 2
    acc = _acc_dtype(x)
    route = _Routing(ids, E, direct=False)
    n = route.n
    empty = x.new_empty((0,))
    a, h = _gate_up(x, gate_up, gub, route, act, True, topk) if n and E else (x.new_empty((n, F)), None)
    # o per slot, for grad_weights = <grad_out[t], o>
    grad_weights = torch.zeros((T, topk), dtype=wdtype, device=x.device)
    grad_x = torch.zeros((T, H), dtype=x.dtype, device=x.device)
    if n and E:
        down_nk = (down.stride(0), down.stride(1), down.stride(2))  # W(n=h, k=f) = down[e, h, f]
        o = _grouped(a, down, down_nk, H, F, route, topk, acc, in_by_token=False, bias=db)
        BLOCK_H = min(pow2(H), block(1024, 16))
        _slot_dot_kernel[(n,)](go, o, route.ids, grad_weights, E, H, topk, BLOCK_H=BLOCK_H, **EXACT)
        # g_h = act'(h) (w * down^T grad_out[t]), W(n=f, k=h) = down[e, h, f]
        down_kn = (down.stride(0), down.stride(2), down.stride(1))
        g_h = _grouped(go, down, down_kn, F, H, route, topk, acc, in_by_token=True, scale=weights, h=h, act=act)
        # grad_x[t] = sum_j gate_up[e]^T g_h, W(n=h, k=r) = gate_up[e, r, h]
        gu_kn = (gate_up.stride(0), gate_up.stride(2), gate_up.stride(1))
        gx = _grouped(g_h, gate_up, gu_kn, H, 2 * F, route, topk, acc, in_by_token=False)
        grad_x = _combine(gx, None, route.ids, E, T, topk, x.dtype)
    else:
        g_h = torch.empty((n, 2 * F), dtype=acc, device=x.device)
    # weight gradients per expert, over its sorted slots (zeros for experts without slots)
    grad_down, grad_db = _expert_grad(go, a, weights, route, H, F, topk, down.dtype, left_by_token=True,
                                      with_bias=db is not None)
    grad_gate_up, grad_gub = _expert_grad(g_h, x, None, route, 2 * F, H, topk, gate_up.dtype, left_by_token=False,
                                          with_bias=gub is not None)
    return (grad_x, grad_gate_up, grad_down, grad_weights, grad_gub if gub is not None else empty,
            grad_db if db is not None else empty)
