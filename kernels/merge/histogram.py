"""``magnitude_histogram``: digit histograms of the task vectors' magnitude keys.

The building block of an exact top-k over a stream of chunks (the checkpoint pipeline sums the
histograms of its chunks). Integer atomics: exact and order-free. No host read: ``prefixes``
(host ints) reach the device through pinned memory and a non-blocking copy, and only when a
prefix filter is on (``prefix_shift < 31``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    ELEMENT_CONFIGS,
    autotune,
    consensus_arg,
    consensus_bit,
    device_values,
    flags,
    grid_over,
    host_list,
    load_f32,
    magnitude_key,
    task_delta,
    task_inputs,
)


@autotune(ELEMENT_CONFIGS, key=["T", "PREFIX_SHIFT"], reset_to_zero=["hist_ptr"])
@triton.jit
def _delta_key_histogram_kernel(
    base_ptr, ft_ptrs, cons_ptr, prefix_ptr, hist_ptr, n, shift,
    T: tl.constexpr, NBINS: tl.constexpr, PREFIX_SHIFT: tl.constexpr, HAS_BASE: tl.constexpr,
    HAS_CONS: tl.constexpr, BLOCK: tl.constexpr,
):
    """hist[t, (key >> shift) & (NBINS - 1)] += 1 for keys with key >> PREFIX_SHIFT == prefix[t]
    (PREFIX_SHIFT = 31: every key)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    b = 0.0
    if HAS_BASE:
        b = load_f32(base_ptr, offs, in_range)
    for t in tl.static_range(T):
        key = magnitude_key(task_delta(ft_ptrs[t], b, offs, in_range, HAS_BASE))
        if HAS_CONS:
            key = tl.where(consensus_bit(cons_ptr, offs, in_range), key, 0)
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
    """Triton launcher of ``mtmerge::magnitude_histogram`` (semantics: the reference).

    Returns
    -------
    Tensor
        int64 ``[T, 2**bits]`` digit histograms of the task vectors' magnitude keys.
    """
    if not 1 <= bits <= 16 or shift < 0 or shift + bits > 31:
        raise ValueError(f"bits must be in [1, 16] and shift + bits <= 31, got shift={shift}, bits={bits}")
    if not 0 <= prefix_shift <= 31:
        raise ValueError(f"prefix_shift must be in [0, 31], got {prefix_shift}")
    b, fts, n, device = task_inputs(base, finetuned)
    cons = consensus_arg(consensus, n, device)
    T = len(fts)
    prefixes = host_list(prefixes, "prefixes", T)
    hist = torch.zeros((T, 1 << bits), dtype=torch.int64, device=device)
    if n:
        # the prefixes are only read with a prefix filter (else hist stands in for them)
        prefix = device_values(prefixes, torch.int64, device) if prefix_shift < 31 else hist
        _delta_key_histogram_kernel[grid_over(n)](
            fts[0] if b is None else b, fts, fts[0] if cons is None else cons, prefix, hist, n, int(shift),
            T=T, NBINS=1 << bits, PREFIX_SHIFT=int(prefix_shift), **flags(b, cons))
    return hist

