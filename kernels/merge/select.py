"""Magnitude selection: ``magnitude_threshold`` and ``threshold_mask``.

The same radix selection as the C++ kernel (``csrc/merge/select.cpp``): the bit pattern of
``|x|`` (sign bit cleared) orders like ``|x|``, so the k-th largest magnitude is found one digit
at a time. Each level is one histogram kernel over the data (integer atomics: exact and
order-independent) and one single-program kernel that picks the bin and updates the search
state, a small int64 tensor on the device: no level waits on the host.

Host reads: one, in :func:`magnitude_threshold`, after all levels are queued: the NaN count,
to raise ``ValueError`` (magnitude selection is undefined for NaN). It is the op's error check
and the only device-to-host read of this file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import BLOCK_CONFIGS, autotune, grid_over

# dtype -> (int view dtype, |x| mask, bit pattern of +inf, digits (shift, bits) top first)
KEY_FORMATS = {
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000, ((20, 11), (9, 11), (0, 9))),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80, ((7, 8), (0, 7))),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00, ((7, 8), (0, 7))),
}

# the search state, int64 [5] on the device
PREFIX, PREFIX_MASK, REMAINING, GREATER, EQUAL = range(5)
_PREFIX = tl.constexpr(PREFIX)
_PREFIX_MASK = tl.constexpr(PREFIX_MASK)
_REMAINING = tl.constexpr(REMAINING)
_GREATER = tl.constexpr(GREATER)
_EQUAL = tl.constexpr(EQUAL)

_MASK_BLOCK = 1024


@autotune(BLOCK_CONFIGS, key=["NBINS", "FILTER"], reset_to_zero=["hist_ptr", "nan_ptr"])
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
        prefix = tl.load(state_ptr + _PREFIX).to(tl.int32)
        prefix_mask = tl.load(state_ptr + _PREFIX_MASK).to(tl.int32)
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
def _choose_bin_kernel(hist_ptr, state_ptr, SHIFT: tl.constexpr, NBINS: tl.constexpr):
    """One program: pick the bin holding the remaining-th largest entry and update the state
    (the digit joins the prefix; the entries in higher bins are counted as greater)."""
    bins = tl.arange(0, NBINS)
    hist = tl.load(hist_ptr + bins)
    remaining = tl.load(state_ptr + _REMAINING)
    # entries with this digit or a larger one
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    chosen = tl.sum((at_or_above >= remaining).to(tl.int64), axis=0) - 1
    is_chosen = bins == chosen
    equal = tl.sum(tl.where(is_chosen, hist, 0), axis=0)
    above = tl.sum(tl.where(is_chosen, at_or_above, 0), axis=0) - equal
    tl.store(state_ptr + _GREATER, tl.load(state_ptr + _GREATER) + above)
    tl.store(state_ptr + _REMAINING, remaining - above)
    tl.store(state_ptr + _EQUAL, equal)
    tl.store(state_ptr + _PREFIX, tl.load(state_ptr + _PREFIX) | (chosen << SHIFT))
    tl.store(state_ptr + _PREFIX_MASK, tl.load(state_ptr + _PREFIX_MASK) | ((NBINS - 1) << SHIFT))


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


# ---- the radix selection, on the device ------------------------------------------------------


def key_views(xs: Sequence[Tensor]) -> tuple[list[Tensor], tuple]:
    """Flat int views of ``xs`` (one float dtype) and their key format."""
    if len(xs) == 0:
        raise ValueError("xs must hold at least one tensor")
    dtype = xs[0].dtype
    if dtype not in KEY_FORMATS:
        raise TypeError(f"xs must be float32, bfloat16 or float16, got {dtype}")
    for i, x in enumerate(xs):
        if x.dtype != dtype:
            raise TypeError(f"xs[{i}] has dtype {x.dtype} but xs[0] has {dtype}")
        if x.device != xs[0].device:
            raise ValueError(f"xs[{i}] is on {x.device} but xs[0] is on {xs[0].device}")
    fmt = KEY_FORMATS[dtype]
    return [x.contiguous().reshape(-1).view(fmt[0]) for x in xs], fmt


def _histogram_level(keys: list[Tensor], fmt: tuple, state: Tensor, nan_count: Tensor | None, level: int) -> Tensor:
    """int64 histogram of this level's digit over the keys matching the state's prefix; at
    level 0, NaN keys are counted into ``nan_count`` (when given)."""
    _, abs_mask, inf_key, digits = fmt
    shift, bits = digits[level]
    hist = torch.zeros(1 << bits, dtype=torch.int64, device=state.device)
    count_nan = level == 0 and nan_count is not None
    for key in keys:
        if key.numel() == 0:
            continue
        _magnitude_histogram_kernel[grid_over(key.numel())](
            key, key.numel(), hist, nan_count if count_nan else hist, state,
            ABS_MASK=abs_mask, INF_KEY=inf_key, SHIFT=shift, NBINS=1 << bits, FILTER=level > 0, COUNT_NAN=count_nan,
        )
    return hist


def radix_select(keys: list[Tensor], fmt: tuple, rank: int, nan_count: Tensor | None = None) -> Tensor:
    """The search state (int64 [5] on the device) after finding the ``rank``-th largest key
    (``1 <= rank <= n``): ``state[PREFIX]`` is that key, ``state[GREATER]`` counts the larger
    keys and ``state[EQUAL]`` the equal ones. Queues kernels only; reads nothing back."""
    state = torch.zeros(5, dtype=torch.int64, device=keys[0].device)
    state[REMAINING] = rank
    for level, (shift, bits) in enumerate(fmt[3]):
        hist = _histogram_level(keys, fmt, state, nan_count, level)
        _choose_bin_kernel[(1,)](hist, state, SHIFT=shift, NBINS=1 << bits)
    return state


def _check_no_nan(nan_count: Tensor) -> None:
    # The one host read of magnitude_threshold: its NaN error check.
    count = int(nan_count.item())
    if count:
        raise ValueError(f"x contains {count} NaN value(s); magnitude selection is undefined for NaN")


def magnitude_threshold(xs: Sequence[Tensor], k: int, selection: str = "exact") -> tuple[Tensor, Tensor]:
    """Triton launcher of ``mtmerge::magnitude_threshold`` (semantics: the reference).

    Returns
    -------
    threshold : Tensor
        0-d, dtype of ``xs``.
    ties_kept : Tensor
        0-d int64.

    Raises
    ------
    ValueError
        NaN in ``xs`` (after one host read of the NaN count), bad ``k`` or ``selection``.
    """
    if selection not in ("exact", "geq"):
        raise ValueError(f"selection must be 'exact' or 'geq', got {selection!r}")
    keys, fmt = key_views(xs)
    view_dtype, _, inf_key, _ = fmt
    n = sum(key.numel() for key in keys)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    nan_count = torch.zeros(1, dtype=torch.int64, device=keys[0].device)
    rank = k if selection == "exact" else min(k + 1, n)
    if rank == 0:  # nothing to select ("exact" with k = 0, or n = 0): t = +inf, no ties
        state = torch.zeros(5, dtype=torch.int64, device=keys[0].device)
        state[PREFIX] = inf_key
        _histogram_level(keys, fmt, state, nan_count, 0)  # NaN is still an error
    else:
        state = radix_select(keys, fmt, rank, nan_count)
    threshold = state[PREFIX].to(view_dtype).view(xs[0].dtype).clone()
    ties_kept = k - state[GREATER] if selection == "exact" else state[EQUAL].clone()
    _check_no_nan(nan_count)
    return threshold, ties_kept


def threshold_mask(
    xs: Sequence[Tensor], threshold: Tensor, ties_kept: Tensor, selection: str = "exact", packed: bool = False
) -> list[Tensor]:
    """Triton launcher of ``mtmerge::threshold_mask`` (semantics: the reference).

    ``"exact"`` ranks the ties in flat order with a per-block tie count and an exclusive scan
    over the blocks of every tensor (device-side), then one masking pass.
    """
    if selection not in ("exact", "geq"):
        raise ValueError(f"selection must be 'exact' or 'geq', got {selection!r}")
    keys, (view_dtype, abs_mask, _, _) = key_views(xs)
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
        if packed:
            out = torch.empty(((n + 7) // 8,), dtype=torch.uint8, device=device)
        else:
            out = torch.empty(x.shape, dtype=torch.bool, device=device)
        if nb:
            _threshold_mask_kernel[(nb,)](
                key, n, t_bits, ties, ties_before[start:], out,
                ABS_MASK=abs_mask, GEQ=geq, PLACE_TIES=not geq, PACKED=packed, BLOCK=block,
            )
        masks.append(out)
        start += nb
    return masks
