"""DARE's L1 sums: ``dare_abs_sums`` (mergekit's ``rescale="l1"`` needs their ratio).

DARE keeps entry ``i`` of task ``t`` when the 24-bit hash of its flat index
``index_offset + i`` under the task's key is below the task's keep threshold; key and
threshold are read inside the kernel from ``task_trim`` (columns ``TRIM_DARE_KEY`` and
``TRIM_DARE_KEEP``; ``DARE_KEEP_ONE`` keeps everything and skips the hash). No host read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

import mtmerge._constants as constants

from ._common import (
    DARE_KEEP_ONE,
    ELEMENT_CONFIGS,
    EXACT,
    MIN_BLOCK,
    TRIM_COLUMNS,
    TRIM_DARE_KEEP,
    TRIM_DARE_KEY,
    autotune,
    check_index_offset,
    dare_kept,
    grid_over,
    load_f32,
    per_task_table,
    task_delta,
    task_inputs,
)


@autotune(ELEMENT_CONFIGS, key=["T"], reset_to_zero=["partial_ptr"])
@triton.jit
def _dare_abs_sums_kernel(
    base_ptr, ft_ptrs, trim_ptr, partial_ptr, n, index_offset,
    T: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr,
):
    """partial[block, t] = (sum |d_t|, sum of |d_t| over DARE's kept entries) in fp64."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    b = 0.0
    if HAS_BASE:
        b = load_f32(base_ptr, offs, in_range)
    row = partial_ptr + pid.to(tl.int64) * (2 * T)
    for t in tl.static_range(T):
        a = tl.abs(task_delta(ft_ptrs[t], b, offs, in_range, HAS_BASE)).to(tl.float64)
        a = tl.where(in_range, a, 0.0)
        kept = a
        keep = tl.load(trim_ptr + t * TRIM_COLUMNS + TRIM_DARE_KEEP)
        if keep < DARE_KEEP_ONE:  # uniform branch: tasks without DARE skip the hash
            task_key = tl.load(trim_ptr + t * TRIM_COLUMNS + TRIM_DARE_KEY)
            kept = tl.where(dare_kept(offs + index_offset, keep, task_key), a, 0.0)
        tl.store(row + 2 * t, tl.sum(a, axis=0))
        tl.store(row + 2 * t + 1, tl.sum(kept, axis=0))


def dare_abs_sums(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    task_trim: Tensor,
    index_offset: int = 0,
) -> Tensor:
    """Triton launcher of ``mtmerge::dare_abs_sums``.

    Parameters
    ----------
    base, finetuned
        As in ``delta_threshold``.
    task_trim : Tensor
        int64 ``[T, TRIM_COLUMNS]`` on the inputs' device; only ``TRIM_DARE_KEY`` and
        ``TRIM_DARE_KEEP`` are used.
    index_offset : int
        DARE numbers entry ``i`` as flat index ``index_offset + i`` (chunks of a tensor).

    Returns
    -------
    Tensor
        float64 ``[T, 2]``: ``sum |tau_t|`` and ``sum |tau_t|`` over DARE's kept entries
        (fp64 partial sums per block, then summed in block order).
    """
    b, fts, n, device = task_inputs(base, finetuned)
    T = len(fts)
    trim = per_task_table(task_trim, "task_trim", T, constants.TRIM_COLUMNS, torch.int64, device)
    index_offset = check_index_offset(index_offset)
    partial = torch.zeros((triton.cdiv(n, MIN_BLOCK), T, 2), dtype=torch.float64, device=device)
    if n:
        _dare_abs_sums_kernel[grid_over(n)](fts[0] if b is None else b, fts, trim, partial, n, index_offset,
                                            T=T, HAS_BASE=b is not None, **EXACT)
    return partial.sum(0)
