"""Triton kernels for the merge family (installed as ``mtmerge.kernels.merge``).

Magnitude selection is the same radix selection as the C++ kernel
(``csrc/merge/select.cpp``): the bit pattern of ``|x|`` (sign bit cleared) orders like
``|x|``, so the k-th largest magnitude is found one digit at a time. Each level is one
histogram kernel over the data (integer atomics: exact and order-independent) followed by a
few device-side torch ops that pick the bin; the search state lives in a small device
tensor, so no level waits on the host. Only the NaN check reads a value back.

Semantics: ``mtmerge/reference/merge.py``. Tested on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

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


def _autotune(configs: list[triton.Config], key: list[str], reset_to_zero: list[str] | None = None):
    """``triton.autotune`` on a GPU; under the CPU interpreter, just the first config
    (benchmarking configs there is meaningless and slow)."""
    if _interpreting():
        return triton.heuristics({name: (lambda _args, v=v: v) for name, v in configs[0].kwargs.items()})
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero)


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
