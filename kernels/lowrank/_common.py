"""Shared pieces of the low-rank family's Triton kernels: block sizes, autotune configs, a strided
batched GEMM with fp32 accumulation (projections and weight gradients), mask arguments.

Block sizes: on a GPU the GEMM-like kernels are autotuned; under the CPU interpreter
(``TRITON_INTERPRET=1``) one small config runs, so the tests' tiny shapes still cross tile and
loop boundaries. Every ``tl.dot`` is at least 16 x 16 x 16 (masked), which compiles on every GPU
Triton supports; fp64 (gradcheck) multiplies by broadcast products on 16-wide tiles. "fp32" is
float64 for float64 inputs, as in ``mtmerge/reference/lowrank.py``. Only ``merge/_common``'s
stable helpers are shared with other families (``moe/_common`` is not imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._shared import FLOAT_DTYPES, block, check_float, mm, pow2, round_to
from ..merge._common import EXACT, interpreting, store_as

__all__ = [
    "EXACT",
    "FLOAT_DTYPES",
    "acc_dtype",
    "autotune",
    "block",
    "bmm",
    "check_float",
    "interpreting",
    "keep_rows",
    "mask_arg",
    "mm",
    "pow2",
    "round_to",
    "store_as",
]


# fp32 dots run in IEEE precision, which Triton lowers to FMA chains unrolled over the whole tile:
# a 64 x 64 x 64 one takes ~12 s to compile (128 x 64 x 128: minutes). With fp32 (or mixed)
# operands, autotuning keeps only the configs whose dot volume is at most this; fp64 (gradcheck
# sizes) keeps only the first, smallest config.
FMA_VOLUME_LIMIT = 64 * 32 * 32


def autotune(configs: list[triton.Config], key: list[str], operands: tuple[str, ...], volume):
    """``triton.autotune`` on a GPU, pruned by dtype (see :data:`FMA_VOLUME_LIMIT`): ``operands``
    name the tensor arguments whose dtypes decide, ``volume(config_kwargs, args) -> (volume,
    always_fp32)`` measures a config's largest dot. Under the CPU interpreter, just the first
    config (benchmarking configs there is meaningless and slow), and with ``MTMERGE_AUTOTUNE=0``
    (read at import; test runs, where compile time dominates)."""
    if interpreting() or os.environ.get("MTMERGE_AUTOTUNE", "1") == "0":
        return triton.heuristics({name: (lambda _args, v=v: v) for name, v in configs[0].kwargs.items()})

    def prune(cfgs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dtypes = {args[n].dtype for n in operands if isinstance(args.get(n), Tensor)}
        if torch.float64 in dtypes:
            return cfgs[:1]
        kept = []
        for c in cfgs:
            vol, always_fp32 = volume(c.kwargs, args)
            if not (always_fp32 or torch.float32 in dtypes or len(dtypes) > 1) or vol <= FMA_VOLUME_LIMIT:
                kept.append(c)
        return kept or cfgs[:1]

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})


# The batched GEMM on a GPU (autotuned per shape); the first config is the interpreter's.
BMM_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]

# mask modes of the batched GEMM: which index the sequence mask applies to
MASK_NONE, MASK_K, MASK_N, MASK_M = 0, 1, 2, 3


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mask_arg(mask: Tensor | None, like: Tensor) -> tuple[Tensor, int, int]:
    """A bool mask as a uint8 view (no copy) with its two strides; a placeholder when None."""
    if mask is None:
        return like, 0, 0
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise TypeError(f"mask must be a 2-D bool tensor, got {mask.dtype} with {mask.dim()} dims")
    return mask.view(torch.uint8), mask.stride(0), mask.stride(1)


@triton.jit
def keep_rows(mask_ptr, row_off, idx, ok, s_mi, DROP: tl.constexpr):
    """True where position ``idx`` of the mask row at ``row_off`` keeps its token (mask True means
    drop when DROP, keep otherwise); False outside ``ok``."""
    v = tl.load(mask_ptr + row_off + idx.to(tl.int64) * s_mi, mask=ok, other=0)
    if DROP:
        return ok & (v == 0)
    else:
        return ok & (v != 0)


@autotune(BMM_CONFIGS, key=["M", "N", "K", "Z", "HEADS", "REDUCE", "MASK"], operands=("a_ptr", "b_ptr"),
          volume=lambda c, _args: (c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"], False))
@triton.jit
def _bmm_kernel(a_ptr, b_ptr, c_ptr, mask_ptr, M, N, K, Z, HEADS,
                s_ab, s_ah, s_am, s_ak, s_bb, s_bh, s_bk, s_bn, s_cb, s_ch, s_cm, s_cn, s_mb, s_mi,
                REDUCE: tl.constexpr, MASK: tl.constexpr, DROP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[w] = A[w] @ B[w] for the batch index w = program_id(2), or (REDUCE) C = sum_w A[w] @ B[w]
    over w = 0 .. Z - 1 in order, fp32 accumulation. Batch index w = b * HEADS + h addresses each
    operand through two strides (b, h), so [B, H, ...] views of any strides work. MASK: the
    sequence mask row b hides B's K rows (1), B's N columns (2) or zeroes C's M rows (3); hidden
    entries are never read (padded values may be anything, NaN included)."""
    pid_z = tl.program_id(2)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    m64 = m.to(tl.int64)
    n64 = n.to(tl.int64)
    ACC: tl.constexpr = (tl.float64 if (a_ptr.dtype.element_ty == tl.float64) | (b_ptr.dtype.element_ty == tl.float64)
                         else tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    kk = tl.arange(0, BLOCK_K)
    if REDUCE:
        w_lo = 0
        w_hi = Z
    else:
        w_lo = pid_z
        w_hi = pid_z + 1
    for w in range(w_lo, w_hi):
        wb = (w // HEADS).to(tl.int64)
        wh = (w % HEADS).to(tl.int64)
        a_w = a_ptr + wb * s_ab + wh * s_ah + m64[:, None] * s_am
        b_w = b_ptr + wb * s_bb + wh * s_bh + n64[None, :] * s_bn
        cols = n_ok
        if MASK == 2:
            cols = keep_rows(mask_ptr, wb * s_mb, n, n_ok, s_mi, DROP)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            k_ok = k < K
            if MASK == 1:
                k_ok = keep_rows(mask_ptr, wb * s_mb, k, k_ok, s_mi, DROP)
            k64 = k.to(tl.int64)
            a = tl.load(a_w + k64[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(b_w + k64[:, None] * s_bk, mask=k_ok[:, None] & cols[None, :], other=0)
            if a.dtype != b.dtype:  # mixed operands: both in fp32 (exact, like the reference's upcast)
                a = a.to(ACC)
                b = b.to(ACC)
            acc = mm(acc, a, b)
    cb = (pid_z // HEADS).to(tl.int64)
    ch = (pid_z % HEADS).to(tl.int64)
    if MASK == 3:
        rows = keep_rows(mask_ptr, cb * s_mb, m, m_ok, s_mi, DROP)
        acc = tl.where(rows[:, None], acc, 0.0)
    store_as(c_ptr + cb * s_cb + ch * s_ch + m64[:, None] * s_cm + n64[None, :] * s_cn, acc,
             m_ok[:, None] & n_ok[None, :])


def bmm(a: Tensor, a_strides, b: Tensor, b_strides, c: Tensor, c_strides, *, M: int, N: int, K: int, Z: int = 1,
        heads: int = 1, reduce: bool = False, mask: Tensor | None = None, mask_mode: int = MASK_NONE,
        drop: bool = False) -> Tensor:
    """Launch :func:`_bmm_kernel`. Strides are 4-tuples (batch b, head h, row, column) in elements
    for A [M, K], B [K, N] and C [M, N]; ``Z`` batches w = b * heads + h (C has one batch when
    ``reduce``). ``mask`` [B, S] bool with ``mask_mode`` (MASK_K, MASK_N or MASK_M) and ``drop``
    (True: mask True hides the position). Returns ``c``, written in its own dtype."""
    if M == 0 or N == 0 or Z == 0:
        if reduce and M and N:  # an empty sum
            c.zero_()
        return c
    m_arg, s_mb, s_mi = mask_arg(mask, a)
    mode = MASK_NONE if mask is None else mask_mode
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]),  # noqa: E731
                         1 if reduce else Z)
    _bmm_kernel[grid](a, b, c, m_arg, M, N, K, Z, heads, *a_strides, *b_strides, *c_strides, s_mb, s_mi,
                      REDUCE=reduce, MASK=mode, DROP=drop, **EXACT)
    return c
