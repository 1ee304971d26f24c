"""Triton kernels for the merge family (installed as ``mtmerge.kernels.merge``).

Magnitude selection is the same radix selection as the C++ kernel
(``csrc/merge/select.cpp``): the bit pattern of ``|x|`` (sign bit cleared) orders like
``|x|``, so the k-th largest magnitude is found one digit at a time. Each level is one
histogram kernel over the data (integer atomics: exact and order-independent) followed by a
few device-side torch ops that pick the bin; the search state lives in a small device
tensor, so no level waits on the host. Only the NaN check reads a value back.

The merge pipeline's ops (``delta_threshold`` ... ``consensus_mask``, second half of this
file) form task vectors ``finetuned[t] - base`` on the fly in fp32 and never stack the T
inputs: the T finetuned tensors reach a kernel as one tuple argument, its loop over tasks is
unrolled (``tl.static_range``), and each kernel loads base once and each finetuned tensor once
per block. Float math follows the reference's order exactly (fp contraction off, IEEE
division), so results match it bit for bit; per-block partial results (counts, sums) are
combined in a fixed order.

Semantics: ``mtmerge/reference/merge.py``. Tested on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from mtmerge.reference import merge as ref

# dtype -> (int view dtype, |x| mask, bit pattern of +inf, digits (shift, bits) top first)
_KEY_FORMATS = {
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000, ((20, 11), (9, 11), (0, 9))),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80, ((7, 8), (0, 7))),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00, ((7, 8), (0, 7))),
}

# search state, int64 on the device
_PREFIX, _PREFIX_MASK, _REMAINING, _GREATER, _EQUAL = range(5)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune(
    configs: list[triton.Config],
    key: list[str],
    reset_to_zero: list[str] | None = None,
    restore_value: list[str] | None = None,
):
    """``triton.autotune`` on a GPU; under the CPU interpreter, just the first config
    (benchmarking configs there is meaningless and slow)."""
    if _interpreting():
        return triton.heuristics({name: (lambda _args, v=v: v) for name, v in configs[0].kwargs.items()})
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero, restore_value=restore_value)


_BLOCK_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]


@_autotune(_BLOCK_CONFIGS, key=["NBINS", "FILTER"], reset_to_zero=["hist_ptr", "nan_ptr"])
@triton.jit
def _magnitude_histogram_kernel(
    keys_ptr, n, hist_ptr, nan_ptr, state_ptr,
    ABS_MASK: tl.constexpr, INF_KEY: tl.constexpr, SHIFT: tl.constexpr, NBINS: tl.constexpr,
    FILTER: tl.constexpr, COUNT_NAN: tl.constexpr, BLOCK: tl.constexpr,
):
    """hist[digit(|x|)] += 1 for entries whose higher digits equal the state's prefix."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    key = tl.load(keys_ptr + offs, mask=in_range, other=0).to(tl.int32) & ABS_MASK
    counted = in_range
    if FILTER:
        prefix = tl.load(state_ptr + 0).to(tl.int32)
        prefix_mask = tl.load(state_ptr + 1).to(tl.int32)
        counted = counted & ((key & prefix_mask) == prefix)
    digit = tl.where(counted, (key >> SHIFT) & (NBINS - 1), 0)
    hist = tl.histogram(digit, NBINS)
    # entries that are not counted were binned as 0: take them out again
    bins = tl.arange(0, NBINS)
    hist = hist - tl.where(bins == 0, BLOCK - tl.sum(counted.to(tl.int32), axis=0), 0)
    tl.atomic_add(hist_ptr + bins, hist.to(tl.int64), mask=hist != 0)
    if COUNT_NAN:
        nan_count = tl.sum((in_range & (key > INF_KEY)).to(tl.int32), axis=0)
        tl.atomic_add(nan_ptr, nan_count.to(tl.int64))


@triton.jit
def _count_equal_kernel(keys_ptr, n, threshold_ptr, counts_ptr, ABS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """counts[block] = how many entries of this block have |x| == threshold."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    key = tl.load(keys_ptr + offs, mask=in_range, other=0).to(tl.int32) & ABS_MASK
    t = tl.load(threshold_ptr).to(tl.int32) & ABS_MASK
    tl.store(counts_ptr + pid, tl.sum((in_range & (key == t)).to(tl.int64), axis=0))


@triton.jit
def _threshold_mask_kernel(
    keys_ptr, n, threshold_ptr, ties_kept_ptr, ties_before_ptr, out_ptr,
    ABS_MASK: tl.constexpr, GEQ: tl.constexpr, PLACE_TIES: tl.constexpr, PACKED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Writes keep = |x| >= t ("geq") or |x| > t plus the first ties_kept ties ("exact")."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    key = tl.load(keys_ptr + offs, mask=in_range, other=0).to(tl.int32) & ABS_MASK
    t = tl.load(threshold_ptr).to(tl.int32) & ABS_MASK
    if GEQ:
        keep = in_range & (key >= t)
    else:
        keep = in_range & (key > t)
        if PLACE_TIES:
            is_tie = in_range & (key == t)
            # flat rank of each tie = ties in earlier blocks + ties so far in this block
            rank = tl.load(ties_before_ptr + pid) + tl.cumsum(is_tie.to(tl.int64), axis=0)
            keep = keep | (is_tie & (rank <= tl.load(ties_kept_ptr)))
    if PACKED:
        bits = tl.reshape(keep.to(tl.int32), (BLOCK // 8, 8))
        byte = tl.sum(bits << tl.arange(0, 8)[None, :], axis=1).to(tl.uint8)
        byte_offs = pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(out_ptr + byte_offs, byte, mask=byte_offs < (n + 7) // 8)
    else:
        tl.store(out_ptr + offs, keep, mask=in_range)


_MASK_BLOCK = 1024


def _keys(xs: Sequence[Tensor]) -> tuple[list[Tensor], tuple]:
    if len(xs) == 0:
        raise ValueError("x must hold at least one tensor")
    dtype = xs[0].dtype
    if dtype not in _KEY_FORMATS:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {dtype}")
    for i, x in enumerate(xs):
        if x.dtype != dtype:
            raise TypeError(f"x[{i}]: all tensors must share one dtype, got {dtype} and {x.dtype}")
    fmt = _KEY_FORMATS[dtype]
    return [x.contiguous().reshape(-1).view(fmt[0]) for x in xs], fmt


def _check_no_nan(nan_count: Tensor) -> None:
    count = int(nan_count.item())
    if count:
        raise ValueError(f"x contains {count} NaN value(s); magnitude selection is undefined for NaN")


def _grid_over(n: int):
    """Launch grid covering n entries with the (autotuned) BLOCK."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def _histogram_level(keys, fmt, state, nan_count, level: int) -> Tensor:
    _, abs_mask, inf_key, digits = fmt
    shift, bits = digits[level]
    hist = torch.zeros(1 << bits, dtype=torch.int64, device=state.device)
    for key in keys:
        if key.numel() == 0:
            continue
        _magnitude_histogram_kernel[_grid_over(key.numel())](
            key, key.numel(), hist, nan_count, state,
            ABS_MASK=abs_mask, INF_KEY=inf_key, SHIFT=shift, NBINS=1 << bits,
            FILTER=level > 0, COUNT_NAN=level == 0,
        )
    return hist


def _choose_bin(hist: Tensor, state: Tensor, shift: int) -> None:
    """Device-side: pick the bin holding the remaining-th largest entry, update the state."""
    at_or_above = hist.flip(0).cumsum(0).flip(0)  # entries with this digit or a larger one
    chosen = (at_or_above >= state[_REMAINING]).sum() - 1
    equal = hist[chosen]
    above = at_or_above[chosen] - equal
    state[_GREATER] += above
    state[_REMAINING] -= above
    state[_EQUAL] = equal
    state[_PREFIX] |= chosen << shift
    state[_PREFIX_MASK] |= (hist.numel() - 1) << shift


def magnitude_threshold(xs: Sequence[Tensor], k: int, selection: str = "exact") -> tuple[Tensor, Tensor]:
    """Triton launcher of ``mtmerge::magnitude_threshold`` (see the reference for semantics)."""
    if selection not in ("exact", "geq"):
        raise ValueError(f"selection must be 'exact' or 'geq', got {selection!r}")
    keys, fmt = _keys(xs)
    view_dtype, _, inf_key, digits = fmt
    n = sum(key.numel() for key in keys)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    device = xs[0].device
    nan_count = torch.zeros(1, dtype=torch.int64, device=device)
    rank = k if selection == "exact" else min(k + 1, n)
    state = torch.zeros(5, dtype=torch.int64, device=device)
    state[_PREFIX] = inf_key
    state[_REMAINING] = rank
    if rank == 0:  # nothing to select ("exact" with k = 0, or n = 0): t = +inf, no ties
        _histogram_level(keys, fmt, state, nan_count, 0)  # NaN is still an error
    else:
        state[_PREFIX] = 0
        for level, (shift, _) in enumerate(digits):
            _choose_bin(_histogram_level(keys, fmt, state, nan_count, level), state, shift)
            if level == 0:
                _check_no_nan(nan_count)
    threshold = state[_PREFIX].to(view_dtype).view(xs[0].dtype).clone()
    ties_kept = k - state[_GREATER] if selection == "exact" else state[_EQUAL].clone()
    _check_no_nan(nan_count)
    return threshold, ties_kept


def threshold_mask(
    xs: Sequence[Tensor], threshold: Tensor, ties_kept: Tensor, selection: str = "exact", packed: bool = False
) -> list[Tensor]:
    """Triton launcher of ``mtmerge::threshold_mask`` (see the reference for semantics)."""
    if selection not in ("exact", "geq"):
        raise ValueError(f"selection must be 'exact' or 'geq', got {selection!r}")
    keys, (view_dtype, abs_mask, _, _) = _keys(xs)
    device = xs[0].device
    t_bits = threshold.to(device=device, dtype=xs[0].dtype).reshape(1).view(view_dtype)
    ties = ties_kept.to(device=device, dtype=torch.int64).reshape(1)
    geq = selection == "geq"
    block = _MASK_BLOCK
    blocks = [triton.cdiv(key.numel(), block) for key in keys]
    # exclusive scan over every block of every tensor: ties that precede each block
    ties_before = torch.zeros(sum(blocks), dtype=torch.int64, device=device)
    if not geq:
        counts = torch.zeros_like(ties_before)
        start = 0
        for key, nb in zip(keys, blocks, strict=True):
            if nb:
                _count_equal_kernel[(nb,)](key, key.numel(), t_bits, counts[start:], ABS_MASK=abs_mask, BLOCK=block)
            start += nb
        ties_before = counts.cumsum(0) - counts

    masks = []
    start = 0
    for x, key, nb in zip(xs, keys, blocks, strict=True):
        n = key.numel()
        out = torch.empty(((n + 7) // 8,), dtype=torch.uint8, device=device) if packed else torch.empty(
            x.shape, dtype=torch.bool, device=device)
        if nb:
            _threshold_mask_kernel[(nb,)](
                key, n, t_bits, ties, ties_before[start:], out,
                ABS_MASK=abs_mask, GEQ=geq, PLACE_TIES=not geq, PACKED=packed, BLOCK=block,
            )
        masks.append(out)
        start += nb
    return masks


# =============================================================================================
# The merge pipeline: delta_threshold, tie_cutoffs, dare_abs_sums, elect_sign_total,
# merge_fused, tall_masks, consensus_mask (semantics: second half of the reference).
#
# Task vectors d_t = finetuned[t] - base are formed in fp32 inside the kernels. Magnitudes are
# compared as int32 keys bits(|d|) (sign bit cleared), as in the reference. The T finetuned
# tensors are one tuple argument; loops over tasks are unrolled (tl.static_range), so per-task
# values stay in registers and each input is read once per block. Per-task scalars reach the
# kernels as two small device tensors:
#   fparams f32 [3, T] = weights, scales, thresholds
#   iparams i64 [3, T] = tie cutoffs, DARE keep thresholds, DARE task keys (uint32 values)
# =============================================================================================

_F32_INF_KEY = tl.constexpr(ref.F32_INF_KEY)
_DARE_SALT = tl.constexpr(ref.DARE_HIGH_WORD_SALT)
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Element-wise kernels. The first config is the interpreter's; smaller blocks help large T
# (T task vectors of one block are live in registers at once).
_ELEMENT_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 512}, num_warps=4),
    triton.Config({"BLOCK": 256}, num_warps=2),
]
# per-block outputs are sized for the smallest block; rows past the launched grid stay 0
_MIN_BLOCK = min(c.kwargs["BLOCK"] for c in _ELEMENT_CONFIGS)
_TIE_BLOCK = 1024  # the tie count and tie scan kernels must agree on the block size

# Every launch doing float math turns fp contraction off: a*b+c must round twice, like torch.
_EXACT = {"enable_fp_fusion": False}


# ---- shared device helpers ------------------------------------------------------------------


@triton.jit
def _load_f32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)


@triton.jit
def _magnitude_key(d):
    """int32 bits(|d|) of fp32 d: orders like |d|, NaN above +inf."""
    return d.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _count_nonfinite(x, mask):
    return tl.sum((mask & (_magnitude_key(x) >= _F32_INF_KEY)).to(tl.int32), axis=0)


@triton.jit
def _consensus_bit(cons_ptr, offs, mask):
    """Bit (offs % 8) of byte (offs // 8) of the packed consensus mask."""
    byte = tl.load(cons_ptr + (offs >> 3), mask=mask, other=0).to(tl.int32)
    return ((byte >> (offs & 7).to(tl.int32)) & 1) != 0


@triton.jit
def _task_delta(ft_ptr, base, offs, mask, HAS_BASE: tl.constexpr):
    """fp32 finetuned - base (or finetuned)."""
    d = _load_f32(ft_ptr, offs, mask)
    if HAS_BASE:
        d = d - base
    return d


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on uint32 (multiplies wrap mod 2**32)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _dare_kept(offs, keep, task_key):
    """DARE's keep test: 24-bit hash of the int64 flat index below ``keep`` (reference dare_hash)."""
    h = _fmix32(offs.to(tl.uint32) ^ task_key.to(tl.uint32))
    h = _fmix32(h ^ (offs >> 32).to(tl.uint32) ^ _DARE_SALT)
    return (h >> 8).to(tl.int64) < keep


@triton.jit
def _sign(x):
    """-1, 0 or +1 as fp32 (0 for NaN)."""
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def _store_as(ptr, x, mask):
    """Store fp32 x in ptr's dtype, rounding to nearest even like torch. bf16 is rounded with
    integer ops (torch's formula, NaN -> 0x7FC0): the interpreter's own fp32->bf16 cast truncates."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
        r = tl.where(x == x, r, 0x7FC0)
        tl.store(ptr, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_packed(row_ptr, keep, pid, nbytes, BLOCK: tl.constexpr):
    """Pack this block's BLOCK flags into BLOCK // 8 bytes (bit i of byte j = flag 8j + i)."""
    bits = tl.reshape(keep.to(tl.int32), (BLOCK // 8, 8))
    byte = tl.sum(bits << tl.arange(0, 8)[None, :], axis=1).to(tl.uint8)
    byte_offs = pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    tl.store(row_ptr + byte_offs, byte, mask=byte_offs < nbytes)


# ---- kernels --------------------------------------------------------------------------------


@_autotune(_ELEMENT_CONFIGS, key=["HAS_BASE", "HAS_CONS"], reset_to_zero=["bad_ptr"])
@triton.jit
def _delta_kernel(
    base_ptr, ft_ptr, cons_ptr, out_ptr, bad_ptr, n,
    HAS_BASE: tl.constexpr, HAS_CONS: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = fp32 task vector (0 outside consensus); bad[0] += #NaN, bad[1] += #Inf in it."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    b = 0.0
    if HAS_BASE:
        b = _load_f32(base_ptr, offs, in_range)
    d = _task_delta(ft_ptr, b, offs, in_range, HAS_BASE)
    if HAS_CONS:
        d = tl.where(_consensus_bit(cons_ptr, offs, in_range), d, 0.0)
    tl.store(out_ptr + offs, d, mask=in_range)
    key = _magnitude_key(d)
    # integer atomics: exact and order-independent
    tl.atomic_add(bad_ptr, tl.sum((in_range & (key > _F32_INF_KEY)).to(tl.int64), axis=0))
    tl.atomic_add(bad_ptr + 1, tl.sum((in_range & (key == _F32_INF_KEY)).to(tl.int64), axis=0))


@triton.jit
def _tie_count_kernel(
    base_ptr, x_ptrs, cons_ptr, thr_ptr, counts_ptr, n,
    T: tl.constexpr, HAS_BASE: tl.constexpr, HAS_CONS: tl.constexpr, COUNT_NAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """counts[block, 0, t] = #(key_t == key(thresholds[t])), counts[block, 1, t] = #NaN keys
    (with COUNT_NAN), key_t = magnitude keys of task t (0 outside consensus)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    b = 0.0
    if HAS_BASE:
        b = _load_f32(base_ptr, offs, in_range)
    if HAS_CONS:
        cons_bit = _consensus_bit(cons_ptr, offs, in_range)
    row = counts_ptr + pid.to(tl.int64) * (2 * T)
    for t in tl.static_range(T):
        key = _magnitude_key(_task_delta(x_ptrs[t], b, offs, in_range, HAS_BASE))
        if HAS_CONS:
            key = tl.where(cons_bit, key, 0)
        tie = in_range & (key == _magnitude_key(tl.load(thr_ptr + t)))
        tl.store(row + t, tl.sum(tie.to(tl.int64), axis=0))
        if COUNT_NAN:
            tl.store(row + T + t, tl.sum((in_range & (key > _F32_INF_KEY)).to(tl.int64), axis=0))


@triton.jit
def _tie_scan_kernel(
    base_ptr, x_ptrs, cons_ptr, thr_ptr, blk_ptr, rank_ptr, need_ptr, out_ptr, n,
    T: tl.constexpr, HAS_BASE: tl.constexpr, HAS_CONS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: out[t] = flat index of the rank[t]-th tie inside block blk[t] of task t,
    for the tasks with need[t] (the others keep their value)."""
    for t in tl.static_range(T):
        offs = tl.load(blk_ptr + t) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < n
        b = 0.0
        if HAS_BASE:
            b = _load_f32(base_ptr, offs, in_range)
        key = _magnitude_key(_task_delta(x_ptrs[t], b, offs, in_range, HAS_BASE))
        if HAS_CONS:
            key = tl.where(_consensus_bit(cons_ptr, offs, in_range), key, 0)
        tie = in_range & (key == _magnitude_key(tl.load(thr_ptr + t)))
        hit = tie & (tl.cumsum(tie.to(tl.int64), axis=0) == tl.load(rank_ptr + t))
        tl.store(out_ptr + t, tl.max(tl.where(hit, offs, -1), axis=0), mask=tl.load(need_ptr + t) != 0)


@_autotune(_ELEMENT_CONFIGS, key=["T", "DARE"], reset_to_zero=["partial_ptr"])
@triton.jit
def _dare_abs_sums_kernel(
    base_ptr, ft_ptrs, iparams_ptr, partial_ptr, n, index_offset,
    T: tl.constexpr, HAS_BASE: tl.constexpr, DARE: tl.constexpr, BLOCK: tl.constexpr,
):
    """partial[block, t] = (sum |d_t|, sum of |d_t| over DARE's kept entries) in fp64."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    b = 0.0
    if HAS_BASE:
        b = _load_f32(base_ptr, offs, in_range)
    row = partial_ptr + pid.to(tl.int64) * (2 * T)
    for t in tl.static_range(T):
        a = tl.abs(_task_delta(ft_ptrs[t], b, offs, in_range, HAS_BASE)).to(tl.float64)
        a = tl.where(in_range, a, 0.0)
        kept = a
        if DARE:
            kept = tl.where(_dare_kept(offs + index_offset, tl.load(iparams_ptr + T + t),
                                       tl.load(iparams_ptr + 2 * T + t)), a, 0.0)
        tl.store(row + 2 * t, tl.sum(a, axis=0))
        tl.store(row + 2 * t + 1, tl.sum(kept, axis=0))


@_autotune(_ELEMENT_CONFIGS, key=["T", "ELECT", "MERGE", "SIGN_TOTAL"], reset_to_zero=["bad_ptr", "partial_ptr"],
           restore_value=["out_ptr"])
@triton.jit
def _merge_kernel(
    base_ptr, ft_ptrs, cons_ptr, fparams_ptr, iparams_ptr, out_ptr, bad_ptr, partial_ptr,
    n, lam, zero_fill, index_offset,
    T: tl.constexpr, HAS_BASE: tl.constexpr, ADD_BASE: tl.constexpr, HAS_CONS: tl.constexpr, DARE: tl.constexpr,
    ELECT: tl.constexpr, WEIGHTED: tl.constexpr, MERGE: tl.constexpr, DIV_WEIGHT: tl.constexpr,
    CHECK: tl.constexpr, SIGN_TOTAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of the fused merge: trim, DARE, consensus, elect, disjoint merge, output.

    ELECT: 0 none, 1 sum, 2 count. MERGE: 0 mean, 1 sum, 2 max. DIV_WEIGHT: divisor "weight".
    ADD_BASE: out = base + lam * merged (else lam * merged).
    SIGN_TOTAL: write partial[block] = sum of sign(S) (elect_sign_total) instead of out.
    CHECK: bad[block, i] = #NaN/Inf in input i (0 = base, 1 + t = finetuned[t]).
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    bad_row = bad_ptr + pid.to(tl.int64) * (T + 1)
    b = 0.0
    if HAS_BASE:
        b = _load_f32(base_ptr, offs, in_range)
        if CHECK:
            tl.store(bad_row, _count_nonfinite(b, in_range))
    cons_bit = in_range
    if HAS_CONS:
        cons_bit = _consensus_bit(cons_ptr, offs, in_range)

    # pass 1 over the tasks: tau_hat_t (kept in registers) and S = sum_t e_t, from 0, in task order
    vals = ()
    total = tl.zeros([BLOCK], dtype=tl.float32)
    merged = tl.zeros([BLOCK], dtype=tl.float32)
    for t in tl.static_range(T):
        f = _load_f32(ft_ptrs[t], offs, in_range)
        if CHECK:
            tl.store(bad_row + 1 + t, _count_nonfinite(f, in_range))
        d = f
        if HAS_BASE:
            d = f - b
        # trim: key above the threshold's, or equal to it up to the tie cutoff
        key = _magnitude_key(d)
        t_key = _magnitude_key(tl.load(fparams_ptr + 2 * T + t))
        keep = (key > t_key) | ((key == t_key) & (offs <= tl.load(iparams_ptr + t)))
        if DARE:
            dare_keep = _dare_kept(offs + index_offset, tl.load(iparams_ptr + T + t), tl.load(iparams_ptr + 2 * T + t))
            keep = keep & dare_keep
        if HAS_CONS:
            keep = keep & cons_bit
        v = tl.where(keep, d * tl.load(fparams_ptr + T + t), 0.0)
        w = tl.load(fparams_ptr + t)
        if ELECT == 0:
            merged = merged + v * w
        else:
            e = v
            if WEIGHTED:
                e = v * w
            if ELECT == 2:
                e = _sign(e)
            total = total + e
            vals = vals + (v,)  # noqa: RUF005 (a Triton tuple, unrolled)

    if SIGN_TOTAL:
        signs = tl.where(in_range, _sign(total), 0.0).to(tl.int64)
        tl.store(partial_ptr + pid, tl.sum(signs, axis=0))
    else:
        if ELECT != 0:
            # pass 2: the entries agreeing with gamma = sign(S) (zero_fill where S == 0);
            # e_t agrees when positive if gamma > 0, else when negative (also for gamma == 0)
            gamma = tl.where(total == 0, zero_fill, _sign(total))
            num = tl.zeros([BLOCK], dtype=tl.float32)
            den = tl.zeros([BLOCK], dtype=tl.float32)
            best = tl.zeros([BLOCK], dtype=tl.float32)
            for t in tl.static_range(T):
                v = vals[t]
                w = tl.load(fparams_ptr + t)
                e = v
                if WEIGHTED:
                    e = v * w
                agree = (v != 0) & tl.where(gamma > 0, e > 0, e < 0)  # same signs as "count"'s sign(e)
                wv = v * w
                if MERGE == 2:
                    best = tl.where(agree & (tl.abs(wv) > tl.abs(best)), wv, best)
                else:
                    num = num + tl.where(agree, wv, 0.0)
                    if MERGE == 0:
                        if DIV_WEIGHT:
                            den = den + tl.where(agree, w, 0.0)
                        else:
                            den = den + tl.where(agree, 1.0, 0.0)
            if MERGE == 0:
                nonzero = den != 0
                merged = tl.where(nonzero, tl.math.div_rn(num, tl.where(nonzero, den, 1.0)), num)
            elif MERGE == 1:
                merged = num
            else:
                merged = tl.where(gamma != 0, best, 0.0)
        result = merged * lam
        if ADD_BASE:
            result = b + result
        _store_as(out_ptr + offs, result, in_range)


@_autotune(_ELEMENT_CONFIGS, key=["T"])
@triton.jit
def _tall_masks_kernel(
    base_ptr, ft_ptrs, merged_ptr, lams_ptr, out_ptr, n, nbytes,
    T: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[t] = packed |d_t| > lam_t * |merged - d_t|."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    b = 0.0
    if HAS_BASE:
        b = _load_f32(base_ptr, offs, in_range)
    mtl = _load_f32(merged_ptr, offs, in_range)
    for t in tl.static_range(T):
        d = _task_delta(ft_ptrs[t], b, offs, in_range, HAS_BASE)
        keep = in_range & (tl.abs(d) > tl.load(lams_ptr + t) * tl.abs(mtl - d))
        _store_packed(out_ptr + tl.full([], t, tl.int64) * nbytes, keep, pid, nbytes, BLOCK)


@_autotune(_ELEMENT_CONFIGS, key=[])
@triton.jit
def _consensus_kernel(masks_ptr, out_ptr, T, nbytes, stride_t, stride_b, k, BLOCK: tl.constexpr):
    """Byte j of out: bit i set where at least k of the T packed masks have bit i of byte j."""
    byte_offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = byte_offs < nbytes
    shifts = tl.arange(0, 8)[None, :]
    count = tl.zeros([BLOCK, 8], dtype=tl.int32)
    row = masks_ptr + byte_offs * stride_b
    for _ in range(T):
        byte = tl.load(row, mask=in_range, other=0).to(tl.int32)
        count += (byte[:, None] >> shifts) & 1
        row += stride_t
    byte = tl.sum((count >= k).to(tl.int32) << shifts, axis=1).to(tl.uint8)
    tl.store(out_ptr + byte_offs, byte, mask=in_range)


# ---- launchers: validation ------------------------------------------------------------------


def _flat(x: Tensor, name: str) -> Tensor:
    """x flattened row-major, contiguous (a copy only when x is not contiguous)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)


def _task_inputs(
    base: Tensor | None, finetuned: Sequence[Tensor], allow_empty: bool = False
) -> tuple[Tensor | None, tuple[Tensor, ...], int, torch.device | None]:
    """Flat ``base`` (or None), the flat finetuned tensors, their common numel and device."""
    fts = tuple(_flat(f, f"finetuned[{t}]") for t, f in enumerate(finetuned))
    if not fts and not allow_empty:
        raise ValueError("finetuned must hold at least one tensor")
    b = None if base is None else _flat(base, "base")
    first = b if b is not None else (fts[0] if fts else None)
    n = 0 if first is None else first.numel()
    device = None if first is None else first.device
    for t, f in enumerate(fts):
        if f.numel() != n:
            raise ValueError(f"finetuned[{t}] has {f.numel()} elements, expected {n} (like base / finetuned[0])")
        if f.device != device:
            raise ValueError(f"finetuned[{t}] is on {f.device}, expected {device}")
    return b, fts, n, device


def _consensus_arg(consensus: Tensor | None, n: int, device) -> Tensor | None:
    """The packed consensus mask as flat contiguous uint8 of at least ceil(n / 8) bytes."""
    if consensus is None:
        return None
    cons = consensus.reshape(-1)
    if cons.dtype != torch.uint8:
        cons = cons.to(torch.uint8)
    if cons.numel() < (n + 7) // 8:
        raise ValueError(f"consensus must hold ceil(n / 8) = {(n + 7) // 8} bytes, got {cons.numel()}")
    if cons.device != device:
        raise ValueError(f"consensus is on {cons.device}, expected {device}")
    return cons.contiguous()


def _per_task(values: Sequence, T: int, name: str, kind: type) -> list:
    values = [kind(v) for v in values]
    if len(values) != T:
        raise ValueError(f"{name} must hold one value per task ({T}), got {len(values)}")
    return values


def _per_task_tensor(x: Tensor, T: int, name: str, dtype: torch.dtype, device) -> Tensor:
    x = torch.as_tensor(x).detach().reshape(-1).to(device=device, dtype=dtype)
    if x.numel() != T:
        raise ValueError(f"{name} must hold one value per task ({T}), got {x.numel()}")
    return x


def _raise_task_vector_nonfinite(t: int, nan: int, inf: int, allow_nonfinite: bool) -> None:
    """The reference's NaN / Inf policy for task vector t (messages as in the reference)."""
    if nan:
        raise ValueError(f"finetuned[{t}]: its task vector has {nan} NaN value(s); magnitude selection is "
                         "undefined for NaN")
    if inf and not allow_nonfinite:
        raise ValueError(f"finetuned[{t}]: its task vector has {inf} Inf value(s) (Inf in base or finetuned); "
                         "pass allow_nonfinite=True to merge them")


def _flags(base, cons) -> dict:
    return {"HAS_BASE": base is not None, "HAS_CONS": cons is not None}


# ---- launchers: trim ------------------------------------------------------------------------


def _materialize_delta(b: Tensor | None, f: Tensor, cons: Tensor | None, n: int, scratch: Tensor) -> tuple[int, int]:
    """scratch = the fp32 task vector (0 outside consensus); returns its (#NaN, #Inf)."""
    if n == 0:
        return 0, 0
    bad = torch.zeros(2, dtype=torch.int64, device=f.device)
    _delta_kernel[_grid_over(n)](f if b is None else b, f, f if cons is None else cons, scratch, bad, n,
                                 **_flags(b, cons))
    nan, inf = bad.tolist()
    return nan, inf


def _tie_positions(
    b: Tensor | None, xs: tuple[Tensor, ...], cons: Tensor | None, n: int, thresholds: Tensor, ties_kept: Tensor,
) -> Tensor:
    """int64 [T]: flat index of the ties_kept[t]-th entry of task t whose key equals
    key(thresholds[t]); -1 if ties_kept[t] <= 0, else INT64_MAX if ties_kept[t] >= #ties
    (the reference's ``_cutoff_for``)."""
    device = xs[0].device
    T = len(xs)
    nb = triton.cdiv(n, _TIE_BLOCK)
    if nb == 0:
        return torch.where(ties_kept > 0, ref.INT64_MAX, -1)
    dummy = xs[0]
    args = (dummy if b is None else b, xs, dummy if cons is None else cons, thresholds)
    flags = {"T": T, **_flags(b, cons), "BLOCK": _TIE_BLOCK}
    counts = torch.empty((nb, 2, T), dtype=torch.int64, device=device)
    _tie_count_kernel[(nb,)](*args, counts, n, COUNT_NAN=False, **flags)
    ties = counts[:, 0, :].T.contiguous()  # [T, nb]
    cum = ties.cumsum(1)
    total = cum[:, -1]
    out = torch.where((ties_kept > 0) & (ties_kept >= total), ref.INT64_MAX, -1)
    need = (ties_kept > 0) & (ties_kept < total)
    # the block holding the ties_kept-th tie: the first whose inclusive count reaches it
    blk = torch.searchsorted(cum, ties_kept.reshape(T, 1)).clamp_(max=nb - 1)
    rank = ties_kept - (cum.gather(1, blk) - ties.gather(1, blk)).reshape(T)
    _tie_scan_kernel[(1,)](*args, blk.reshape(T).contiguous(), rank, need.to(torch.int8), out, n, **flags)
    return out


def delta_threshold(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    ks: Sequence[int],
    selection: str = "exact",
    allow_nonfinite: bool = False,
    consensus: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton launcher of ``mtmerge::delta_threshold``: per-task trim thresholds.

    One task at a time, the task vector is materialized into an fp32 scratch (0 outside
    consensus; NaN/Inf counted on the way), the radix select of :func:`magnitude_threshold`
    finds its threshold, and for ``"exact"`` a tie-count kernel, a cumsum and a one-block scan
    find the tie cutoff.

    Parameters
    ----------
    base : Tensor or None
        The pre-trained tensor; None when ``finetuned`` already holds task vectors.
    finetuned : sequence of Tensor
        T tensors with ``base``'s number of elements (float32, bfloat16 or float16).
    ks : sequence of int
        Entries to keep per task, ``0 <= ks[t] <= n``.
    selection : {"exact", "geq"}
        Tie rule (see the reference).
    allow_nonfinite : bool
        Accept Inf in the task vectors (NaN is always an error).
    consensus : Tensor or None
        Packed uint8 mask; task-vector entries outside it count as 0.

    Returns
    -------
    thresholds : Tensor
        float32 ``[T]``.
    tie_cutoffs : Tensor
        int64 ``[T]``.

    Raises
    ------
    ValueError
        NaN (or Inf without ``allow_nonfinite``) in a task vector, naming ``finetuned[t]``;
        bad ``ks`` or ``selection``.
    """
    b, fts, n, device = _task_inputs(base, finetuned)
    cons = _consensus_arg(consensus, n, device)
    T = len(fts)
    ks = [int(k) for k in ks]
    scratch = torch.empty(n, dtype=torch.float32, device=device)
    if selection not in ("exact", "geq") or len(ks) != T or not all(0 <= k <= n for k in ks):
        # bad arguments: the reference reports NaN/Inf in any task first
        for t, f in enumerate(fts):
            _raise_task_vector_nonfinite(t, *_materialize_delta(b, f, cons, n, scratch), allow_nonfinite)
        if len(ks) != T:
            raise ValueError(f"ks must hold one value per task ({T}), got {len(ks)}")
        if selection not in ("exact", "geq"):
            raise ValueError(f"selection must be 'exact' or 'geq', got {selection!r}")
        raise ValueError(f"ks must be in [0, {n}], got {next(k for k in ks if not 0 <= k <= n)}")

    thresholds = torch.full((T,), float("inf"), dtype=torch.float32, device=device)
    cutoffs = torch.full((T,), -1, dtype=torch.int64, device=device)
    for t, (f, k) in enumerate(zip(fts, ks, strict=True)):
        _raise_task_vector_nonfinite(t, *_materialize_delta(b, f, cons, n, scratch), allow_nonfinite)
        if n == 0 or (selection == "exact" and k == 0):
            continue  # (inf, -1)
        threshold, ties_kept = magnitude_threshold([scratch], k, selection)
        thresholds[t] = threshold
        if selection == "geq":
            cutoffs[t] = ref.INT64_MAX
        else:
            cutoffs[t : t + 1] = _tie_positions(None, (scratch,), None, n, threshold.reshape(1),
                                                ties_kept.reshape(1))
    return thresholds, cutoffs


def tie_cutoffs(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    thresholds: Tensor,
    ties_kept: Tensor,
    consensus: Tensor | None = None,
) -> Tensor:
    """Triton launcher of ``mtmerge::tie_cutoffs``.

    Parameters
    ----------
    base, finetuned, consensus
        As in :func:`delta_threshold`.
    thresholds : Tensor
        ``[T]`` threshold magnitudes.
    ties_kept : Tensor
        ``[T]`` integer: how many entries equal to each threshold are kept, in flat order.

    Returns
    -------
    Tensor
        int64 ``[T]``: flat index of the last tie kept (``-1``: none, else ``INT64_MAX``: all of them).

    Raises
    ------
    ValueError
        NaN in a task vector (Inf is allowed), naming ``finetuned[t]``.
    """
    b, fts, n, device = _task_inputs(base, finetuned)
    cons = _consensus_arg(consensus, n, device)
    T = len(fts)
    thr = _per_task_tensor(thresholds, T, "thresholds", torch.float32, device)
    kept = _per_task_tensor(ties_kept, T, "ties_kept", torch.int64, device)
    nb = triton.cdiv(n, _TIE_BLOCK)
    if nb:  # the reference rejects NaN here too
        dummy = fts[0]
        counts = torch.zeros((nb, 2, T), dtype=torch.int64, device=device)
        _tie_count_kernel[(nb,)](dummy if b is None else b, fts, dummy if cons is None else cons, thr, counts, n,
                                 T=T, COUNT_NAN=True, BLOCK=_TIE_BLOCK, **_flags(b, cons))
        for t, nan in enumerate(counts[:, 1, :].sum(0).tolist()):
            _raise_task_vector_nonfinite(t, nan, 0, True)
    return _tie_positions(b, fts, cons, n, thr, kept)


# ---- launchers: DARE, elect, fused merge ----------------------------------------------------


def _dare_params(T: int, seed: int, dare_keep: Sequence[int], task_offset: int) -> tuple[list[int], list[int], bool]:
    """Per task: the keep threshold, the 32-bit stream key of task number task_offset + t
    (on the host, with the reference's function), and whether any task uses DARE."""
    keep = _per_task(dare_keep, T, "dare_keep", int)
    task_keys = [ref.dare_task_key(int(seed), int(task_offset) + t) for t in range(T)]
    return keep, task_keys, any(k < ref.DARE_KEEP_ONE for k in keep)


def dare_abs_sums(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    seed: int,
    dare_keep: Sequence[int],
    task_offset: int = 0,
    index_offset: int = 0,
) -> Tensor:
    """Triton launcher of ``mtmerge::dare_abs_sums``.

    Parameters
    ----------
    base, finetuned
        As in :func:`delta_threshold`.
    seed : int
        DARE seed.
    dare_keep : sequence of int
        Per task, from ``dare_keep_threshold(density)``.
    task_offset : int
        Task ``t`` draws DARE's stream of task number ``task_offset + t``.

    Returns
    -------
    Tensor
        float64 ``[T, 2]``: ``sum |tau_t|`` and ``sum |tau_t|`` over DARE's kept entries
        (fp64 partial sums per block, then summed in block order).
    """
    b, fts, n, device = _task_inputs(base, finetuned, allow_empty=True)
    T = len(fts)
    keep, task_keys, dare = _dare_params(T, seed, dare_keep, task_offset)
    if T == 0:
        return torch.zeros((0, 2), dtype=torch.float64, device=device)
    iparams = torch.tensor([0] * T + keep + task_keys, dtype=torch.int64).to(device)
    partial = torch.zeros((triton.cdiv(n, _MIN_BLOCK), T, 2), dtype=torch.float64, device=device)
    if n:
        _dare_abs_sums_kernel[_grid_over(n)](fts[0] if b is None else b, fts, iparams, partial, n, int(index_offset),
                                             T=T, HAS_BASE=b is not None, DARE=dare, **_EXACT)
    return partial.sum(0)


_ELECT_CODES = {"none": 0, "sum": 1, "count": 2}
_MERGE_CODES = {"mean": 0, "sum": 1, "max": 2}


def _merge_launch(
    base, finetuned, weights, scales, thresholds, tie_cutoffs, seed, dare_keep, consensus, elect, elect_weighted,
    *, zero_fill=1, merge="sum", divisor="count", lam=1.0, check=False, out=None, task_offset=0, with_base=True,
    index_offset=0,
) -> Tensor | None:
    """Validate and launch :func:`_merge_kernel`: write ``out``, or without ``out`` return the
    int64 0-d sum of sign(S) (elect_sign_total)."""
    if elect not in _ELECT_CODES:
        raise ValueError(f"elect must be one of {tuple(_ELECT_CODES)}, got {elect!r}")
    if merge not in _MERGE_CODES:
        raise ValueError(f"merge must be one of {tuple(_MERGE_CODES)}, got {merge!r}")
    if divisor not in ("count", "weight"):
        raise ValueError(f"divisor must be 'count' or 'weight', got {divisor!r}")
    b, fts, n, device = _task_inputs(base, finetuned)
    cons = _consensus_arg(consensus, n, device)
    T = len(fts)
    weights = _per_task(weights, T, "weights", float)
    scales = _per_task(scales, T, "scales", float)
    keep, task_keys, dare = _dare_params(T, seed, dare_keep, task_offset)
    thr = _per_task_tensor(thresholds, T, "thresholds", torch.float32, device)
    cut = _per_task_tensor(tie_cutoffs, T, "tie_cutoffs", torch.int64, device)
    fparams = torch.cat([torch.tensor(weights + scales, dtype=torch.float32).to(device), thr])
    iparams = torch.cat([cut, torch.tensor(keep + task_keys, dtype=torch.int64).to(device)])

    sign_total = out is None
    partial = torch.zeros(triton.cdiv(n, _MIN_BLOCK) if sign_total else 1, dtype=torch.int64, device=device)
    if out is not None:
        if out.dtype not in _INPUT_DTYPES:
            raise TypeError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
        if out.numel() != n or out.device != device:
            raise ValueError(f"out must hold {n} elements on {device}, got {out.numel()} on {out.device}")
    if n == 0:
        return partial.sum() if sign_total else None
    target = out.view(-1) if out is not None and out.is_contiguous() else torch.empty(
        n if out is not None else 1, dtype=out.dtype if out is not None else torch.float32, device=device)
    bad = torch.zeros((triton.cdiv(n, _MIN_BLOCK), T + 1) if check else (1,), dtype=torch.int32, device=device)
    _merge_kernel[_grid_over(n)](
        fts[0] if b is None else b, fts, fts[0] if cons is None else cons, fparams, iparams, target, bad,
        partial, n, float(lam), float(zero_fill), int(index_offset),
        T=T, DARE=dare, ELECT=max(_ELECT_CODES[elect], 1) if sign_total else _ELECT_CODES[elect],
        WEIGHTED=bool(elect_weighted), MERGE=_MERGE_CODES[merge], DIV_WEIGHT=divisor == "weight",
        CHECK=check, SIGN_TOTAL=sign_total, ADD_BASE=b is not None and bool(with_base), **_flags(b, cons), **_EXACT,
    )
    if check:
        names = ["base"] + [f"finetuned[{t}]" for t in range(T)]
        for name, count in zip(names, bad.sum(0).tolist(), strict=True):
            if count:
                raise ValueError(f"{name} contains NaN or Inf; pass allow_nonfinite=True to merge it anyway")
    if out is not None and target.data_ptr() != out.data_ptr():
        out.copy_(target.view(out.shape))
    return partial.sum() if sign_total else None


def elect_sign_total(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    scales: Sequence[float],
    thresholds: Tensor,
    tie_cutoffs: Tensor,
    seed: int,
    dare_keep: Sequence[int],
    elect: str = "sum",
    elect_weighted: bool = False,
    consensus: Tensor | None = None,
    index_offset: int = 0,
) -> Tensor:
    """Triton launcher of ``mtmerge::elect_sign_total``.

    Parameters
    ----------
    base, finetuned, consensus
        As in :func:`delta_threshold`.
    weights, scales : sequence of float
        Per task ``w_t`` and the rescale of the kept entries.
    thresholds, tie_cutoffs : Tensor
        ``[T]`` trims, from :func:`delta_threshold`.
    seed, dare_keep
        DARE's seed and per-task keep thresholds (``DARE_KEEP_ONE``: no DARE).
    elect : {"sum", "count", "none"}
        Elected values ("none" sums like "sum").
    elect_weighted : bool
        Elect on ``w_t tau_hat_t``.
    index_offset : int
        DARE numbers entry ``i`` as flat index ``index_offset + i`` (chunks of a tensor).

    Returns
    -------
    Tensor
        int64 0-d: ``sum_i sign(S_i)`` (per-block partial sums, summed in block order).
    """
    return _merge_launch(base, finetuned, weights, scales, thresholds, tie_cutoffs, seed, dare_keep, consensus, elect,
                         elect_weighted, index_offset=index_offset)


def merge_fused(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    weights: Sequence[float],
    scales: Sequence[float],
    thresholds: Tensor,
    tie_cutoffs: Tensor,
    seed: int,
    dare_keep: Sequence[int],
    consensus: Tensor | None,
    elect: str,
    elect_weighted: bool,
    zero_fill: int,
    merge: str,
    divisor: str,
    lam: float,
    allow_nonfinite: bool,
    out: Tensor,
    task_offset: int = 0,
    with_base: bool = True,
    index_offset: int = 0,
) -> None:
    """Triton launcher of ``mtmerge::merge_fused``: writes ``base + lam * merged`` into ``out``
    (``lam * merged`` without base or with ``with_base=False``).

    One kernel pass: each block loads base once and each finetuned tensor once, trims (key and
    tie cutoff), applies DARE and consensus, elects and merges in registers, and stores ``out``
    (float32, bfloat16 or float16; ``out`` may alias ``base``).

    Parameters
    ----------
    base, finetuned, weights, scales, thresholds, tie_cutoffs, seed, dare_keep, consensus, elect, elect_weighted
        As in :func:`elect_sign_total`.
    zero_fill : int
        gamma where the elected sum is 0 (1, -1 or 0; where gamma is 0 the negative values agree).
    merge : {"mean", "sum", "max"}
        Disjoint merge rule ("mean" gives the numerator where the divisor is 0, "max" gives 0
        where gamma is 0).
    divisor : {"count", "weight"}
        Denominator of "mean".
    lam : float
        Scale of the merged task vector.
    allow_nonfinite : bool
        Accept NaN/Inf in base and finetuned.
    out : Tensor
        Output, ``n`` elements.
    task_offset : int
        Task ``t`` draws DARE's stream of task number ``task_offset + t``.
    with_base : bool
        Add ``base`` to the output (it is still subtracted to form the task vectors).
    index_offset : int
        DARE numbers entry ``i`` as flat index ``index_offset + i`` (chunks of a tensor).

    Raises
    ------
    ValueError
        NaN/Inf in ``base`` or ``finetuned[t]`` (named) when not ``allow_nonfinite``. The check
        is fused into the kernel, so a contiguous ``out`` has been written when it raises.
    """
    _merge_launch(base, finetuned, weights, scales, thresholds, tie_cutoffs, seed, dare_keep, consensus, elect,
                  elect_weighted, zero_fill=zero_fill, merge=merge, divisor=divisor, lam=lam,
                  check=not allow_nonfinite, out=out, task_offset=task_offset, with_base=with_base,
                  index_offset=index_offset)


# ---- magnitude_histogram ---------------------------------------------------------------------


@_autotune(_ELEMENT_CONFIGS, key=["T", "PREFIX_SHIFT"], reset_to_zero=["hist_ptr"])
@triton.jit
def _delta_key_histogram_kernel(
    base_ptr, ft_ptrs, cons_ptr, prefix_ptr, hist_ptr, n, shift,
    T: tl.constexpr, NBINS: tl.constexpr, PREFIX_SHIFT: tl.constexpr, HAS_BASE: tl.constexpr,
    HAS_CONS: tl.constexpr, BLOCK: tl.constexpr,
):
    """hist[t, (key >> shift) & (NBINS - 1)] += 1 for keys with key >> PREFIX_SHIFT == prefix[t]
    (integer atomics: exact and order-free)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    b = 0.0
    if HAS_BASE:
        b = _load_f32(base_ptr, offs, in_range)
    for t in tl.static_range(T):
        key = _magnitude_key(_task_delta(ft_ptrs[t], b, offs, in_range, HAS_BASE))
        if HAS_CONS:
            key = tl.where(_consensus_bit(cons_ptr, offs, in_range), key, 0)
        match = in_range
        if PREFIX_SHIFT < 31:
            match = match & ((key >> PREFIX_SHIFT) == tl.load(prefix_ptr + t).to(tl.int32))
        digit = (key >> shift) & (NBINS - 1)
        tl.atomic_add(hist_ptr + t * NBINS + digit, tl.full([BLOCK], 1, tl.int64), mask=match)


def magnitude_histogram(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    shift: int,
    bits: int,
    prefixes: Sequence[int],
    prefix_shift: int = 31,
    consensus: Tensor | None = None,
) -> Tensor:
    """Triton launcher of ``mtmerge::magnitude_histogram`` (see the reference for the math).

    Returns
    -------
    Tensor
        int64 ``[T, 2**bits]`` digit histograms of the task vectors' magnitude keys.
    """
    if not 1 <= bits <= 16 or shift < 0 or shift + bits > 31:
        raise ValueError(f"bits must be in [1, 16] and shift + bits <= 31, got shift={shift}, bits={bits}")
    if not 0 <= prefix_shift <= 31:
        raise ValueError(f"prefix_shift must be in [0, 31], got {prefix_shift}")
    b, fts, n, device = _task_inputs(base, finetuned)
    cons = _consensus_arg(consensus, n, device)
    T = len(fts)
    prefix = torch.tensor(_per_task(prefixes, T, "prefixes", int), dtype=torch.int64).to(device)
    hist = torch.zeros((T, 1 << bits), dtype=torch.int64, device=device)
    if n:
        _delta_key_histogram_kernel[_grid_over(n)](
            fts[0] if b is None else b, fts, fts[0] if cons is None else cons, prefix, hist, n, int(shift),
            T=T, NBINS=1 << bits, PREFIX_SHIFT=int(prefix_shift), **_flags(b, cons))
    return hist


# ---- launchers: TALL masks and Consensus ----------------------------------------------------


def tall_masks(base: Tensor | None, finetuned: Sequence[Tensor], merged: Tensor, lams: Sequence[float]) -> Tensor:
    """Triton launcher of ``mtmerge::tall_masks``.

    Parameters
    ----------
    base, finetuned
        As in :func:`delta_threshold` (``finetuned`` may be empty).
    merged : Tensor
        The multi-task vector ``tau_MTL``, ``n`` elements.
    lams : sequence of float
        Per task ``lam_t``.

    Returns
    -------
    Tensor
        uint8 ``[T, ceil(n / 8)]``: packed ``|tau_t| > lam_t * |merged - tau_t|`` (fp32).
    """
    mtl = _flat(merged, "merged")
    b, fts, n, device = _task_inputs(base, finetuned, allow_empty=True)
    T = len(fts)
    lams = _per_task(lams, T, "lams", float)
    if device is not None and (n != mtl.numel() or mtl.device != device):
        raise ValueError(f"merged must hold {n} elements on {device}, got {mtl.numel()} on {mtl.device}")
    n, device = mtl.numel(), mtl.device
    nbytes = (n + 7) // 8
    out = torch.empty((T, nbytes), dtype=torch.uint8, device=device)
    if T and n:
        _tall_masks_kernel[_grid_over(n)](fts[0] if b is None else b, fts, mtl,
                                          torch.tensor(lams, dtype=torch.float32).to(device), out, n, nbytes,
                                          T=T, HAS_BASE=b is not None, **_EXACT)
    return out


def consensus_mask(masks: Tensor, k: int = 2) -> Tensor:
    """Triton launcher of ``mtmerge::consensus_mask``.

    Parameters
    ----------
    masks : Tensor
        uint8 ``[T, nbytes]``: packed per-task masks (e.g. from :func:`tall_masks`).
    k : int
        How many masks must agree.

    Returns
    -------
    Tensor
        uint8 ``[nbytes]``: bits set where at least ``k`` of the masks are set.
    """
    if not isinstance(masks, Tensor) or masks.dim() != 2:
        raise ValueError(f"masks must be a 2-D [T, nbytes] tensor, got {getattr(masks, 'shape', type(masks))}")
    if masks.dtype != torch.uint8:
        masks = masks.to(torch.uint8)
    T, nbytes = masks.shape
    out = torch.empty(nbytes, dtype=torch.uint8, device=masks.device)
    if nbytes:
        _consensus_kernel[_grid_over(nbytes)](masks, out, T, nbytes, masks.stride(0), masks.stride(1), int(k))
    return out
