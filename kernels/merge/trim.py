"""Per-task trims of the task vectors: ``delta_threshold`` and ``tie_cutoffs``.

Task vectors ``d_t = finetuned[t] - base`` are formed in fp32 inside the kernels; magnitudes
are compared as int32 keys ``bits(|d|)`` (sign bit cleared), 0 outside the consensus mask, as
in the reference. A trim is ``(threshold, tie_cutoff)``: keep ``key > key(threshold)``, plus
``key == key(threshold)`` at flat index ``<= tie_cutoff``.

Everything stays on the device (the radix selection of :mod:`.select`, the tie ranks by
cumsum/searchsorted) except one host read per call, the error check: ``delta_threshold`` reads
the per-task NaN/Inf counts once, after all tasks are queued, and ``tie_cutoffs`` the per-task
NaN counts once, to raise ``ValueError`` naming ``finetuned[t]`` (NaN is always an error; Inf
unless ``allow_nonfinite``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from mtmerge._constants import INT64_MAX

from ._common import (
    ELEMENT_CONFIGS,
    F32_INF_KEY,
    autotune,
    consensus_arg,
    consensus_bit,
    flags,
    grid_over,
    load_f32,
    magnitude_key,
    per_task_values,
    task_delta,
    task_inputs,
)
from .select import GREATER, KEY_FORMATS, PREFIX, radix_select

_TIE_BLOCK = 1024  # the tie count and tie scan kernels must agree on the block size


@autotune(ELEMENT_CONFIGS, key=["HAS_BASE", "HAS_CONS"], reset_to_zero=["bad_ptr"])
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
        b = load_f32(base_ptr, offs, in_range)
    d = task_delta(ft_ptr, b, offs, in_range, HAS_BASE)
    if HAS_CONS:
        d = tl.where(consensus_bit(cons_ptr, offs, in_range), d, 0.0)
    tl.store(out_ptr + offs, d, mask=in_range)
    key = magnitude_key(d)
    # integer atomics: exact and order-independent
    tl.atomic_add(bad_ptr, tl.sum((in_range & (key > F32_INF_KEY)).to(tl.int64), axis=0))
    tl.atomic_add(bad_ptr + 1, tl.sum((in_range & (key == F32_INF_KEY)).to(tl.int64), axis=0))


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
        b = load_f32(base_ptr, offs, in_range)
    if HAS_CONS:
        cons_bit = consensus_bit(cons_ptr, offs, in_range)
    row = counts_ptr + pid.to(tl.int64) * (2 * T)
    for t in tl.static_range(T):
        key = magnitude_key(task_delta(x_ptrs[t], b, offs, in_range, HAS_BASE))
        if HAS_CONS:
            key = tl.where(cons_bit, key, 0)
        tie = in_range & (key == magnitude_key(tl.load(thr_ptr + t)))
        tl.store(row + t, tl.sum(tie.to(tl.int64), axis=0))
        if COUNT_NAN:
            tl.store(row + T + t, tl.sum((in_range & (key > F32_INF_KEY)).to(tl.int64), axis=0))


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
            b = load_f32(base_ptr, offs, in_range)
        key = magnitude_key(task_delta(x_ptrs[t], b, offs, in_range, HAS_BASE))
        if HAS_CONS:
            key = tl.where(consensus_bit(cons_ptr, offs, in_range), key, 0)
        tie = in_range & (key == magnitude_key(tl.load(thr_ptr + t)))
        hit = tie & (tl.cumsum(tie.to(tl.int64), axis=0) == tl.load(rank_ptr + t))
        tl.store(out_ptr + t, tl.max(tl.where(hit, offs, -1), axis=0), mask=tl.load(need_ptr + t) != 0)


# ---- tie cutoffs, on the device ---------------------------------------------------------------


def _tie_counts(b: Tensor | None, xs: tuple[Tensor, ...], cons: Tensor | None, n: int, thresholds: Tensor,
                count_nan: bool) -> Tensor:
    """int64 [blocks, 2, T]: per block of _TIE_BLOCK entries, the ties of each task with its
    threshold and (with ``count_nan``) its NaN keys."""
    nb = triton.cdiv(n, _TIE_BLOCK)
    counts = torch.zeros((nb, 2, len(xs)), dtype=torch.int64, device=xs[0].device)
    if nb:
        dummy = xs[0]
        _tie_count_kernel[(nb,)](dummy if b is None else b, xs, dummy if cons is None else cons, thresholds, counts,
                                 n, T=len(xs), COUNT_NAN=count_nan, BLOCK=_TIE_BLOCK, **flags(b, cons))
    return counts


def _tie_positions(
    b: Tensor | None, xs: tuple[Tensor, ...], cons: Tensor | None, n: int, thresholds: Tensor, ties_kept: Tensor,
    counts: Tensor | None = None,
) -> Tensor:
    """int64 [T]: flat index of the ties_kept[t]-th entry of task t whose key equals
    key(thresholds[t]); -1 if ties_kept[t] <= 0, else INT64_MAX if ties_kept[t] >= #ties
    (the reference's ``_cutoff_for``). ``counts``: :func:`_tie_counts`' result, if at hand."""
    T = len(xs)
    nb = triton.cdiv(n, _TIE_BLOCK)
    if nb == 0:
        return torch.where(ties_kept > 0, INT64_MAX, -1)
    if counts is None:
        counts = _tie_counts(b, xs, cons, n, thresholds, count_nan=False)
    ties = counts[:, 0, :].T.contiguous()  # [T, nb]
    cum = ties.cumsum(1)
    total = cum[:, -1]
    out = torch.where((ties_kept > 0) & (ties_kept >= total), INT64_MAX, -1)
    need = (ties_kept > 0) & (ties_kept < total)
    # the block holding the ties_kept-th tie: the first whose inclusive count reaches it
    blk = torch.searchsorted(cum, ties_kept.reshape(T, 1)).clamp_(max=nb - 1)
    rank = ties_kept - (cum.gather(1, blk) - ties.gather(1, blk)).reshape(T)
    dummy = xs[0]
    _tie_scan_kernel[(1,)](dummy if b is None else b, xs, dummy if cons is None else cons, thresholds,
                           blk.reshape(T).contiguous(), rank, need.to(torch.int8), out, n,
                           T=T, BLOCK=_TIE_BLOCK, **flags(b, cons))
    return out


def _raise_task_vector_nonfinite(bad: list[list[int]], allow_nonfinite: bool) -> None:
    """The reference's NaN / Inf policy, task by task (``bad[t] = [#NaN, #Inf]``)."""
    for t, (nan, inf) in enumerate(bad):
        if nan:
            raise ValueError(f"finetuned[{t}]: its task vector has {nan} NaN value(s); magnitude selection is "
                             "undefined for NaN")
        if inf and not allow_nonfinite:
            raise ValueError(f"finetuned[{t}]: its task vector has {inf} Inf value(s) (Inf in base or finetuned); "
                             "pass allow_nonfinite=True to merge them")


# ---- launchers --------------------------------------------------------------------------------


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
    consensus; NaN/Inf counted on the way), the radix selection of :mod:`.select` finds its
    threshold, and for ``"exact"`` a tie-count kernel, a cumsum and a one-block scan find the
    tie cutoff. Nothing is read back until the NaN/Inf counts of all tasks, once at the end.

    Parameters
    ----------
    base : Tensor or None
        The pre-trained tensor; None when ``finetuned`` already holds task vectors.
    finetuned : sequence of Tensor
        T tensors of ``base``'s dtype (float32, bfloat16 or float16), shape and device.
    ks : sequence of int
        Entries to keep per task, ``0 <= ks[t] <= n``.
    selection : {"exact", "geq"}
        Tie rule (see the reference).
    allow_nonfinite : bool
        Accept Inf in the task vectors (NaN is always an error).
    consensus : Tensor or None
        Packed uint8 mask of exactly ``ceil(n / 8)`` bytes; task-vector entries outside it count as 0.

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
    b, fts, n, device = task_inputs(base, finetuned)
    cons = consensus_arg(consensus, n, device)
    T = len(fts)
    if selection not in ("exact", "geq"):
        raise ValueError(f"selection must be 'exact' or 'geq', got {selection!r}")
    ks = [int(k) for k in ks]
    if len(ks) != T:
        raise ValueError(f"ks must hold one value per task ({T}), got {len(ks)}")
    for k in ks:
        if not 0 <= k <= n:
            raise ValueError(f"ks must be in [0, {n}], got {k}")

    fmt = KEY_FORMATS[torch.float32]
    thresholds = torch.full((T,), float("inf"), dtype=torch.float32, device=device)
    cutoffs = torch.full((T,), -1, dtype=torch.int64, device=device)
    bad = torch.zeros((T, 2), dtype=torch.int64, device=device)  # per task: #NaN, #Inf
    scratch = torch.empty(n, dtype=torch.float32, device=device)
    keys = [scratch.view(torch.int32)]
    for t, (f, k) in enumerate(zip(fts, ks, strict=True)):
        if n == 0:
            continue  # (inf, -1)
        _delta_kernel[grid_over(n)](f if b is None else b, f, f if cons is None else cons, scratch, bad[t], n,
                                    **flags(b, cons))
        if selection == "exact" and k == 0:
            continue  # (inf, -1)
        state = radix_select(keys, fmt, k if selection == "exact" else min(k + 1, n))
        threshold = state[PREFIX].to(torch.int32).view(torch.float32)
        thresholds[t] = threshold
        if selection == "geq":
            cutoffs[t] = INT64_MAX
        else:
            ties_kept = k - state[GREATER]
            cutoffs[t : t + 1] = _tie_positions(None, (scratch,), None, n, threshold.reshape(1),
                                                ties_kept.reshape(1))
    if n:
        # The one host read of this op: its NaN/Inf error check (T x 2 counts).
        _raise_task_vector_nonfinite(bad.tolist(), allow_nonfinite)
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
    b, fts, n, device = task_inputs(base, finetuned)
    cons = consensus_arg(consensus, n, device)
    T = len(fts)
    thr = per_task_values(thresholds, "thresholds", T, torch.float32, device)
    kept = per_task_values(ties_kept, "ties_kept", T, torch.int64, device)
    counts = _tie_counts(b, fts, cons, n, thr, count_nan=True)
    if n:
        # The one host read of this op: its NaN error check (T counts), as in the reference.
        _raise_task_vector_nonfinite([[nan, 0] for nan in counts[:, 1, :].sum(0).tolist()], True)
    return _tie_positions(b, fts, cons, n, thr, kept, counts)

