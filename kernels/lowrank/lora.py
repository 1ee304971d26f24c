"""``multi_lora`` and ``multi_lora_backward``: one LoRA adapter per token, tokens grouped by adapter.

Grouping: a stable counting sort of the tokens by adapter on the device (the algorithm of
``kernels/moe/align.py``, written again here for groups 0 .. L - 1 plus the group L of tokens
without an adapter: id -1 or out of range): :func:`_count_kernel` counts per block of tokens, torch
scans the small [blocks, L] table on the device, :func:`_scatter_kernel` places each token. No
float math, no atomics. A few tokens (decode) skip the sort: each tile is one token (DIRECT).

Forward, :func:`_lora_fwd_kernel`, per tile of one adapter's tokens (and a share of the output
blocks): the shrink s = x A_g^T in fp32, kept in registers ([BLOCK_M, R]), then per output block
the expand s B_g^T (fp32 operands, fp32 accumulation), times scale[g], plus base; rows of group L
get base (or 0). Every output row is written exactly once.

Backward: :func:`_lora_dx_kernel` per tile: v = scale[g] grad_out B_g and u = x A_g^T (fp32, stored
per token for the weight gradients) and grad_x = v A_g; :func:`_lora_dw_kernel` per adapter and
output tile: grad_A[g] = sum_t v_t^T x_t and grad_B[g] = scale[g] sum_t grad_out_t^T u_t over the
adapter's tokens in sorted (token) order: fixed-order sums, the same bits on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import EXACT, acc_dtype, autotune, block, check_float, mm, pow2, store_as

# At most this many tokens: the DIRECT path (no sort; each tile is one token).
SMALL_BATCH_TOKENS = 16

# Fused shrink/expand tiles on a GPU (autotuned per shape); the first config is the interpreter's.
LORA_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]



def _lora_volume(c: dict, args: dict) -> tuple[int, bool]:
    # the expand multiplies fp32 operands whatever x's dtype
    return c["BLOCK_M"] * max(c["BLOCK_N"], c["BLOCK_K"]) * args["R_P2"], True


def _dw_volume(c: dict, _args: dict) -> tuple[int, bool]:
    return c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"], False


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, T, L, BLOCK: tl.constexpr, GROUPS: tl.constexpr):
    """counts[b, g] = #tokens of block b with adapter g (int64 [blocks, L])."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < T, other=-1).to(tl.int64)
    for g0 in range(0, L, GROUPS):
        gs = g0 + tl.arange(0, GROUPS)
        hit = (ids[:, None] == gs[None, :]) & (gs[None, :] < L)
        tl.store(counts_ptr + pid * L + gs, tl.sum(hit.to(tl.int64), axis=0), mask=gs < L)


@triton.jit
def _scatter_kernel(ids_ptr, prefix_ptr, offsets_ptr, valid_before_ptr, sorted_ptr, T, L,
                    BLOCK: tl.constexpr, GROUPS: tl.constexpr):
    """sorted[offsets[g] + rank] = t for the tokens t of adapter g (rank: among g's tokens, in token
    order); the tokens without an adapter after offsets[L], in token order. prefix[b, g]: g's tokens
    in blocks before b; valid_before[b]: tokens with an adapter before block b."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < T
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1).to(tl.int64)
    dest = tl.zeros([BLOCK], dtype=tl.int64)
    for g0 in range(0, L, GROUPS):
        gs = g0 + tl.arange(0, GROUPS)
        g_ok = gs < L
        hit = (ids[:, None] == gs[None, :]) & g_ok[None, :]
        before = tl.load(prefix_ptr + pid * L + gs, mask=g_ok, other=0)
        first = tl.load(offsets_ptr + gs, mask=g_ok, other=0)
        inblock = tl.cumsum(hit.to(tl.int64), axis=0)  # 1-based rank inside the block, per column
        dest += tl.sum(tl.where(hit, first[None, :] + before[None, :] + inblock - 1, 0), axis=1)
    valid = (ids >= 0) & (ids < L)
    v = valid.to(tl.int64)
    vb = tl.load(valid_before_ptr + pid) + tl.cumsum(v, axis=0) - v
    dest = tl.where(valid, dest, tl.load(offsets_ptr + L) + offs - vb)  # offs - vb: earlier tokens without one
    tl.store(sorted_ptr + dest, offs, mask=in_range)


@triton.jit
def _tile(pid, offsets_ptr, sorted_ptr, ids_ptr, L, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr,
          G_P2: tl.constexpr):
    """(group, tokens [BLOCK_M] int64, row mask) of tile ``pid``. Sorted: group g in 0 .. L (L: no
    adapter) owns cdiv(count_g, BLOCK_M) consecutive tiles; tiles past the last get L + 1 (nothing to
    do). DIRECT: tile t is token t alone, group ids[t] (L when outside [0, L))."""
    r = tl.arange(0, BLOCK_M)
    if DIRECT:
        g = tl.load(ids_ptr + pid).to(tl.int64)
        g = tl.where((g >= 0) & (g < L), g, L)
        toks = pid.to(tl.int64) + r * 0
        rows = r == 0
    else:
        gx = tl.arange(0, G_P2)
        gx_ok = gx <= L
        lo = tl.load(offsets_ptr + gx, mask=gx_ok, other=0)
        hi = tl.load(offsets_ptr + gx + 1, mask=gx_ok, other=0)
        tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        ends = tl.cumsum(tiles, axis=0)
        g = tl.sum((ends <= pid).to(tl.int64), axis=0)  # groups whose tiles all come before pid
        first = tl.sum(tl.where(gx == g, ends - tiles, 0), axis=0)
        start = tl.sum(tl.where(gx == g, lo, 0), axis=0)
        stop = tl.sum(tl.where(gx == g, hi, 0), axis=0)
        pos = start + (pid - first) * BLOCK_M + r
        rows = pos < stop
        toks = tl.load(sorted_ptr + pos, mask=rows, other=0)
    return g, toks, rows


@triton.jit
def _shrink(x_ptr, w_ptr, toks, rows, K, RANK, s_xt, s_xk, s_wr, s_wk, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_K: tl.constexpr, R_P2: tl.constexpr):
    """sum_k x[toks, k] W[r, k] -> [BLOCK_M, R_P2] in fp32 (padded rows and ranks 0)."""
    rr = tl.arange(0, R_P2)
    r_ok = rr < RANK
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, R_P2], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        k64 = k.to(tl.int64)
        xa = tl.load(x_ptr + toks[:, None] * s_xt + k64[None, :] * s_xk, mask=rows[:, None] & k_ok[None, :], other=0)
        wt = tl.load(w_ptr + rr.to(tl.int64)[None, :] * s_wr + k64[:, None] * s_wk, mask=k_ok[:, None] & r_ok[None, :],
                     other=0)
        if xa.dtype != wt.dtype:
            xa = xa.to(ACC)
            wt = wt.to(ACC)
        acc = mm(acc, xa, wt)
    return acc


@autotune(LORA_CONFIGS, key=["IN", "OUT", "R_P2", "M_BUCKET", "DIRECT", "HAS_BASE"], operands=("x_ptr",),
          volume=_lora_volume)
@triton.jit
def _lora_fwd_kernel(x_ptr, a_ptr, b_ptr, scale_ptr, base_ptr, y_ptr, offsets_ptr, sorted_ptr, ids_ptr,
                     L, IN, OUT, RANK, SPLITS, M_BUCKET, s_xt, s_xk, s_al, s_ar, s_ak, s_bl, s_bn, s_br, s_bt, s_bo,
                     HAS_BASE: tl.constexpr, DIRECT: tl.constexpr, G_P2: tl.constexpr, R_P2: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[t, n] = base[t, n] + scale[g] * sum_r B[g, n, r] s[t, r], s = x A_g^T in fp32, for the tile's
    tokens and the output blocks pid1, pid1 + SPLITS, ... (y contiguous [T, OUT]); group L: base or 0."""
    g, toks, rows = _tile(tl.program_id(0), offsets_ptr, sorted_ptr, ids_ptr, L, DIRECT, BLOCK_M, G_P2)
    if g <= L:
        ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
        ga = tl.minimum(g, L - 1)  # group L reads nothing (masked) and gets s = 0
        rr = tl.arange(0, R_P2)
        r_ok = (rr < RANK) & (rr * 0 + g < L)  # vector & vector: the interpreter rejects scalar masks
        s = _shrink(x_ptr, a_ptr + ga * s_al, toks, rows & (toks * 0 + g < L), IN, RANK, s_xt, s_xk, s_ar, s_ak, ACC,
                    BLOCK_M, BLOCK_K, R_P2)
        sc = tl.load(scale_ptr + ga).to(ACC)
        nn = tl.arange(0, BLOCK_N)
        for nb in range(tl.program_id(1), tl.cdiv(OUT, BLOCK_N), SPLITS):
            n = nb * BLOCK_N + nn
            n_ok = n < OUT
            n64 = n.to(tl.int64)
            tile = rows[:, None] & n_ok[None, :]
            bt = tl.load(b_ptr + ga * s_bl + n64[None, :] * s_bn + rr.to(tl.int64)[:, None] * s_br,
                         mask=r_ok[:, None] & n_ok[None, :], other=0).to(ACC)
            y = mm(tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC), s, bt) * sc
            if HAS_BASE:
                y = tl.load(base_ptr + toks[:, None] * s_bt + n64[None, :] * s_bo, mask=tile, other=0).to(ACC) + y
            store_as(y_ptr + toks[:, None] * OUT + n64[None, :], y, tile)


@autotune(LORA_CONFIGS, key=["IN", "OUT", "R_P2", "M_BUCKET", "DIRECT"], operands=("x_ptr",), volume=_lora_volume)
@triton.jit
def _lora_dx_kernel(go_ptr, x_ptr, a_ptr, b_ptr, scale_ptr, gx_ptr, u_ptr, v_ptr, offsets_ptr, sorted_ptr, ids_ptr,
                    L, IN, OUT, RANK, SPLITS, M_BUCKET, s_gt, s_go, s_xt, s_xk, s_al, s_ar, s_ak, s_bl, s_bn, s_br,
                    DIRECT: tl.constexpr, G_P2: tl.constexpr, R_P2: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """v = scale[g] grad_out B_g, grad_x = v A_g (0 for tokens without an adapter); the programs with
    pid1 = 0 also store v and u = x A_g^T (fp32 [T, R_P2]) of the adapter tokens for the weight
    gradients."""
    g, toks, rows = _tile(tl.program_id(0), offsets_ptr, sorted_ptr, ids_ptr, L, DIRECT, BLOCK_M, G_P2)
    if g <= L:
        ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
        ga = tl.minimum(g, L - 1)  # group L reads nothing (masked) and gets v = 0
        rr = tl.arange(0, R_P2)
        r_ok = (rr < RANK) & (rr * 0 + g < L)
        r64 = rr.to(tl.int64)
        # v: grad_out "shrunk" by B_g^T, [r, out] through B's strides
        v = _shrink(go_ptr, b_ptr + ga * s_bl, toks, rows & (toks * 0 + g < L), OUT, RANK, s_gt, s_go, s_br, s_bn,
                    ACC, BLOCK_M, BLOCK_K, R_P2)
        v = v * tl.load(scale_ptr + ga).to(ACC)
        if (tl.program_id(1) == 0) & (g < L):
            u = _shrink(x_ptr, a_ptr + ga * s_al, toks, rows, IN, RANK, s_xt, s_xk, s_ar, s_ak, ACC, BLOCK_M, BLOCK_K,
                        R_P2)
            keep = rows[:, None] & (r64[None, :] >= 0)
            tl.store(u_ptr + toks[:, None] * R_P2 + r64[None, :], u, mask=keep)
            tl.store(v_ptr + toks[:, None] * R_P2 + r64[None, :], v, mask=keep)
        nn = tl.arange(0, BLOCK_N)
        for ib in range(tl.program_id(1), tl.cdiv(IN, BLOCK_N), SPLITS):
            i = ib * BLOCK_N + nn
            i_ok = i < IN
            i64 = i.to(tl.int64)
            at = tl.load(a_ptr + ga * s_al + r64[:, None] * s_ar + i64[None, :] * s_ak,
                         mask=r_ok[:, None] & i_ok[None, :], other=0).to(ACC)
            gx = mm(tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC), v, at)
            store_as(gx_ptr + toks[:, None] * IN + i64[None, :], gx, rows[:, None] & i_ok[None, :])


@autotune(LORA_CONFIGS, key=["M", "N", "SCALE"], operands=("l_ptr", "r_ptr"), volume=_dw_volume)
@triton.jit
def _lora_dw_kernel(l_ptr, r_ptr, scale_ptr, offsets_ptr, sorted_ptr, out_ptr, M, N, s_lt, s_lm, s_rt, s_rn,
                    SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[g] = (scale[g] *) sum over adapter g's sorted tokens t of left[t, :M]^T right[t, :N], in
    sorted order (out contiguous [L, M, N]; zeros for an adapter without tokens)."""
    g = tl.program_id(0).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    m = (tl.program_id(1) // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (tl.program_id(1) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    m64 = m.to(tl.int64)
    n64 = n.to(tl.int64)
    lo = tl.load(offsets_ptr + g)
    hi = tl.load(offsets_ptr + g + 1)
    ACC: tl.constexpr = (tl.float64 if (l_ptr.dtype.element_ty == tl.float64) | (r_ptr.dtype.element_ty == tl.float64)
                         else tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    kk = tl.arange(0, BLOCK_K)
    for p0 in range(lo, hi, BLOCK_K):
        p = p0 + kk
        p_ok = p < hi
        toks = tl.load(sorted_ptr + p, mask=p_ok, other=0)
        left = tl.load(l_ptr + toks[None, :] * s_lt + m64[:, None] * s_lm, mask=m_ok[:, None] & p_ok[None, :],
                       other=0)
        right = tl.load(r_ptr + toks[:, None] * s_rt + n64[None, :] * s_rn, mask=p_ok[:, None] & n_ok[None, :],
                        other=0)
        if left.dtype != right.dtype:
            left = left.to(ACC)
            right = right.to(ACC)
        acc = mm(acc, left, right)
    if SCALE:
        acc = acc * tl.load(scale_ptr + g).to(ACC)
    store_as(out_ptr + g * M * N + m64[:, None] * N + n64[None, :], acc, m_ok[:, None] & n_ok[None, :])


# ---- launchers --------------------------------------------------------------------------------


class _Groups:
    """The token schedule shared by the launches: sorted by adapter (counting sort) or DIRECT."""

    def __init__(self, ids: Tensor, L: int, direct: bool):
        self.ids = ids.reshape(-1).contiguous()
        self.T = T = self.ids.numel()
        self.L = L
        self.direct = direct
        dev = ids.device
        if direct:
            self.sorted = self.offsets = self.ids
            return
        BLOCK = block(256, 16)
        GROUPS = min(pow2(L), block(64, 8))
        nb = triton.cdiv(T, BLOCK)
        self.sorted = torch.empty(T, dtype=torch.int64, device=dev)
        # offsets[g] .. offsets[g + 1]: group g's sorted tokens; group L: no adapter
        self.offsets = torch.empty(L + 2, dtype=torch.int64, device=dev)
        self.offsets[:1].zero_()
        self.offsets[L + 1:].fill_(T)
        counts = torch.empty((nb, L), dtype=torch.int64, device=dev)
        _count_kernel[(nb,)](self.ids, counts, T, L, BLOCK=BLOCK, GROUPS=GROUPS)
        inclusive = counts.cumsum(0)  # device-side scans of the small [blocks, L] table
        prefix = inclusive - counts
        torch.cumsum(inclusive[-1], 0, out=self.offsets[1:L + 1])
        per_block = counts.sum(1)
        valid_before = per_block.cumsum(0) - per_block
        _scatter_kernel[(nb,)](self.ids, prefix, self.offsets, valid_before, self.sorted, T, L, BLOCK=BLOCK,
                               GROUPS=GROUPS)

    def tiles(self, block_m: int) -> int:
        # an upper bound: every group may end with a partial tile; the extra tiles do nothing
        return self.T if self.direct else triton.cdiv(self.T, block_m) + self.L + 1

    def grid(self, width: int):
        """(tiles, programs sharing a tile's output blocks): enough programs to fill the device, as
        few per tile as possible (each one redoes the tile's shrink)."""
        splits = max(1, min(triton.cdiv(width, 16), triton.cdiv(block(264, 8), self.tiles(16))))
        return splits, lambda meta: (self.tiles(meta["BLOCK_M"]), splits)

    def args(self) -> dict:
        return {"offsets_ptr": self.offsets, "sorted_ptr": self.sorted, "ids_ptr": self.ids}

    def meta(self) -> dict:
        return {"M_BUCKET": pow2(self.T), "DIRECT": self.direct, "G_P2": pow2(self.L + 2)}


def _check(x: Tensor, A: Tensor, B: Tensor, adapter_ids: Tensor, scale: Tensor):
    for name, t in (("x", x), ("A", A), ("B", B)):
        check_float(t, name)
    if x.dim() != 2 or A.dim() != 3 or B.dim() != 3 or adapter_ids.dim() != 1:
        raise ValueError("x must be [T, in], A [L, r, in], B [L, out, r] and adapter_ids [T]")
    T, IN = x.shape
    L, R, _ = A.shape
    OUT = B.shape[1]
    if tuple(A.shape) != (L, R, IN) or tuple(B.shape) != (L, OUT, R) or adapter_ids.shape[0] != T:
        raise ValueError(f"shape mismatch: x {list(x.shape)}, A {list(A.shape)}, B {list(B.shape)}, adapter_ids "
                         f"{list(adapter_ids.shape)}")
    if adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
    if scale.numel() != L:
        raise ValueError(f"scale must hold one value per adapter ({L}), got {scale.numel()}")
    return T, IN, OUT, L, R


def multi_lora(x: Tensor, A: Tensor, B: Tensor, adapter_ids: Tensor, scale: Tensor, base: Tensor | None) -> Tensor:
    """Triton launcher of ``mtmerge::multi_lora``: y_t = base_t + scale[g] B_g (A_g x_t), g = adapter_ids[t].

    Parameters
    ----------
    x : Tensor
        ``[T, in]`` float32, bfloat16, float16 or float64, any strides.
    A, B : Tensor
        ``[L, r, in]`` and ``[L, out, r]``, x's dtype, any strides.
    adapter_ids : Tensor
        int32/int64 ``[T]``; -1 and ids outside ``[0, L)`` add nothing.
    scale : Tensor
        ``[L]`` float32 (read in fp32; fp64 for fp64 x).
    base : Tensor or None
        ``[T, out]``, x's dtype, any strides; None: zeros.

    Returns
    -------
    Tensor
        ``[T, out]`` in x's dtype (contiguous); A_g x_t is kept in fp32, the expand accumulated in fp32.
    """
    T, IN, OUT, L, R = _check(x, A, B, adapter_ids, scale)
    if base is not None and tuple(base.shape) != (T, OUT):
        raise ValueError(f"base must be [T, out] = {[T, OUT]}, got {list(base.shape)}")
    y = torch.empty((T, OUT), dtype=x.dtype, device=x.device)
    if T == 0 or OUT == 0:
        return y
    if L == 0 or R == 0:  # no adapter can add anything
        return y.copy_(base) if base is not None else y.zero_()
    groups = _Groups(adapter_ids, L, direct=T <= SMALL_BATCH_TOKENS)
    splits, grid = groups.grid(OUT)
    sc = scale.reshape(-1).contiguous()
    _lora_fwd_kernel[grid](x, A, B, sc, base if base is not None else x, y, L=L, IN=IN, OUT=OUT, RANK=R,
                           SPLITS=splits, s_xt=x.stride(0), s_xk=x.stride(1), s_al=A.stride(0), s_ar=A.stride(1),
                           s_ak=A.stride(2), s_bl=B.stride(0), s_bn=B.stride(1), s_br=B.stride(2),
                           s_bt=base.stride(0) if base is not None else 0,
                           s_bo=base.stride(1) if base is not None else 0, HAS_BASE=base is not None,
                           R_P2=pow2(R, 16), **groups.args(), **groups.meta(), **EXACT)
    return y


def multi_lora_backward(grad_out: Tensor, x: Tensor, A: Tensor, B: Tensor, adapter_ids: Tensor,
                        scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triton launcher of ``mtmerge::multi_lora_backward``.

    Parameters
    ----------
    grad_out : Tensor
        ``[T, out]``, any float dtype, any strides.
    x, A, B, adapter_ids, scale
        As in :func:`multi_lora`.

    Returns
    -------
    grad_x : Tensor
        ``[T, in]`` in x's dtype (0 for tokens without an adapter).
    grad_A, grad_B : Tensor
        ``[L, r, in]`` and ``[L, out, r]`` in A's and B's dtypes (0 for adapters without tokens);
        fixed-order sums over each adapter's tokens.
    """
    T, IN, OUT, L, R = _check(x, A, B, adapter_ids, scale)
    check_float(grad_out, "grad_out")
    if tuple(grad_out.shape) != (T, OUT):
        raise ValueError(f"grad_out must be [T, out] = {[T, OUT]}, got {list(grad_out.shape)}")
    dev = x.device
    grad_x = torch.zeros((T, IN), dtype=x.dtype, device=dev)
    grad_A = torch.zeros((L, R, IN), dtype=A.dtype, device=dev)
    grad_B = torch.zeros((L, OUT, R), dtype=B.dtype, device=dev)
    if T == 0 or L == 0 or R == 0:
        return grad_x, grad_A, grad_B
    acc = acc_dtype(x.dtype)
    groups = _Groups(adapter_ids, L, direct=False)
    r_p2 = pow2(R, 16)
    u = torch.empty((T, r_p2), dtype=acc, device=dev)
    v = torch.empty((T, r_p2), dtype=acc, device=dev)
    sc = scale.reshape(-1).contiguous()
    splits, grid = groups.grid(IN)
    _lora_dx_kernel[grid](
        grad_out, x, A, B, sc, grad_x, u, v, L=L, IN=IN, OUT=OUT, RANK=R, SPLITS=splits, s_gt=grad_out.stride(0),
        s_go=grad_out.stride(1), s_xt=x.stride(0), s_xk=x.stride(1), s_al=A.stride(0), s_ar=A.stride(1),
        s_ak=A.stride(2), s_bl=B.stride(0), s_bn=B.stride(1), s_br=B.stride(2), R_P2=r_p2, **groups.args(),
        **groups.meta(), **EXACT)
    for out, left, right, M, N, with_scale in ((grad_A, v, x, R, IN, False), (grad_B, grad_out, u, OUT, R, True)):
        if M and N:
            grid = lambda meta, M=M, N=N: (L, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
            _lora_dw_kernel[grid](left, right, sc, groups.offsets, groups.sorted, out, M, N, left.stride(0),
                                  left.stride(1), right.stride(0), right.stride(1), SCALE=with_scale, **EXACT)
    return grad_x, grad_A, grad_B


__all__ = ["multi_lora", "multi_lora_backward"]
