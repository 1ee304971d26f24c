"""Typed public API of magnitude selection, the merge family's building block: the threshold
that keeps the ``k`` largest ``|x|`` (exact or the TIES paper's ``>=`` rule) and its mask.

Walk: ``mtmerge.topk_mask`` -> here -> specs ``magnitude_threshold`` / ``threshold_mask`` in
``mtmerge/ops/_merge_ops.py`` -> ``csrc/merge/select.cpp`` (CPU), ``kernels/merge/select.py``
(GPU), ``mtmerge/reference/merge.py`` (truth) -> ``tests/ops/merge/test_select.py`` ->
``benchmarks/bench_select.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mtmerge.ops import _validation as check
from mtmerge.ops._validation import TensorOrTensors, as_tensor_list
from mtmerge.ops.recipe import SELECTIONS

__all__ = ["MagnitudeThreshold", "magnitude_threshold", "topk_mask"]


class MagnitudeThreshold(NamedTuple):
    """Result of :func:`magnitude_threshold`.

    Attributes
    ----------
    threshold : Tensor
        0-d tensor of the input dtype: the magnitude ``t`` at which the selection cuts.
    ties_kept : Tensor
        0-d int64 tensor: how many entries with ``|x| == t`` are kept.
    """

    threshold: Tensor
    ties_kept: Tensor


def magnitude_threshold(x: TensorOrTensors, k: int, *, selection: str = "exact") -> MagnitudeThreshold:
    """Find the magnitude threshold that keeps the ``k`` largest ``|x|``.

    Radix selection on the float bit patterns (a few passes over the data, no sort).

    Parameters
    ----------
    x : Tensor or sequence of Tensor
        Any shapes, float32/bfloat16/float16, one dtype and device. A sequence is treated
        as one vector: the row-major flattenings concatenated in order (never materialized).
    k : int
        Entries to keep, ``0 <= k <= n`` where ``n`` is the total number of entries.
    selection : {"exact", "geq"}
        ``"exact"`` keeps exactly ``k`` entries: all ``|x| > threshold`` plus the first
        ``ties_kept`` entries with ``|x| == threshold`` in flat order. ``"geq"`` (the TIES
        paper's rule) keeps every ``|x| >= threshold`` where threshold is the ``(n-k)``-th
        smallest ``|x|`` (1-based; ``k = n`` keeps all); ``ties_kept`` is then the count of
        entries equal to it.

    Returns
    -------
    MagnitudeThreshold
        ``(threshold, ties_kept)``: 0-d tensors (dtype of ``x``, int64) on ``x``'s device.
        ``k = 0`` with ``"exact"`` gives ``(+inf, 0)``.

    Raises
    ------
    ValueError
        If ``x`` contains NaN (``+-inf`` are ordinary values), or ``k`` or ``selection`` is
        out of range.
    TypeError
        If ``x`` is not float tensors of one dtype, or ``k`` is not an int.
    """
    xs = as_tensor_list(x)
    n = sum(t.numel() for t in xs)
    k = check.int_in_range(k, 0, n, "k", f" with n = {n} entries in x")
    selection = check.choice(selection, SELECTIONS, "selection")
    threshold, ties_kept = torch.ops.mtmerge.magnitude_threshold(xs=xs, k=k, selection=selection)
    return MagnitudeThreshold(threshold, ties_kept)


def topk_mask(
    x: TensorOrTensors, k: int, *, selection: str = "exact", packed: bool = False
) -> Tensor | list[Tensor]:
    """Mask of the ``k`` largest-magnitude entries of ``x`` (ties as :func:`magnitude_threshold`).

    Parameters
    ----------
    x : Tensor or sequence of Tensor
        As in :func:`magnitude_threshold`; top-k runs over all entries of the sequence.
    k : int
        Entries to keep, ``0 <= k <= n``.
    selection : {"exact", "geq"}
        Tie rule (see :func:`magnitude_threshold`).
    packed : bool
        Return bit-packed masks: flat uint8 of ``ceil(numel / 8)`` bytes per tensor, bit
        ``i`` of byte ``j`` is flat index ``8j + i`` (``numpy.packbits(bitorder="little")``).

    Returns
    -------
    Tensor or list of Tensor
        For a tensor ``x``: a bool mask of ``x.shape`` (or the packed bytes). For a
        sequence: one mask per tensor, in order.
    """
    xs = as_tensor_list(x)
    threshold, ties_kept = magnitude_threshold(xs, k, selection=selection)
    masks = torch.ops.mtmerge.threshold_mask(xs=xs, threshold=threshold, ties_kept=ties_kept, selection=selection,
                                             packed=bool(packed))
    return masks[0] if isinstance(x, Tensor) else list(masks)
