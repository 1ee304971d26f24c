"""Typed public wrappers of the merge family's ops: validation, then ``torch.ops.mtmerge``.

Walk: ``mtmerge.topk_mask`` -> here -> schema in ``mtmerge/_library.py`` ->
``csrc/merge/select.cpp`` (CPU), ``kernels/merge.py`` (GPU), ``mtmerge/reference/merge.py``
(truth) -> ``tests/ops/test_select.py`` -> ``benchmarks/bench_select.py``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

import mtmerge._library  # noqa: F401  (registers the ops)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SELECTIONS = ("exact", "geq")

TensorOrTensors = Tensor | Sequence[Tensor]


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


def as_tensor_list(x: TensorOrTensors, name: str = "x") -> list[Tensor]:
    """Validate a tensor or a non-empty sequence of float tensors of one dtype and device."""
    if isinstance(x, Tensor):
        xs = [x]
    elif isinstance(x, Sequence) and not isinstance(x, str | bytes):
        xs = list(x)
        if not xs:
            raise ValueError(f"{name} must be a tensor or a non-empty sequence of tensors, got an empty sequence")
    else:
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(x).__name__}")
    for i, t in enumerate(xs):
        label = name if isinstance(x, Tensor) else f"{name}[{i}]"
        if not isinstance(t, Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{label} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.dtype != xs[0].dtype:
            raise TypeError(f"{label} has dtype {t.dtype} but {name}[0] has {xs[0].dtype}: one dtype for all")
        if t.device != xs[0].device:
            raise ValueError(f"{label} is on {t.device} but {name}[0] is on {xs[0].device}: one device for all")
    return xs


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool):
        raise TypeError("k must be an int, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an int, got {type(k).__name__}") from None
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n] with n = {n} entries in x, got k = {k}")
    return k


def _check_selection(selection: str) -> str:
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return selection


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
    k = _check_k(k, sum(t.numel() for t in xs))
    threshold, ties_kept = torch.ops.mtmerge.magnitude_threshold(xs, k, _check_selection(selection))
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
    selection = _check_selection(selection)
    threshold, ties_kept = magnitude_threshold(xs, k, selection=selection)
    masks = torch.ops.mtmerge.threshold_mask(xs, threshold, ties_kept, selection, bool(packed))
    return masks[0] if isinstance(x, Tensor) else list(masks)
