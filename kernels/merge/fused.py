"""The fused merge: ``merge_fused``, ``elect_sign_total`` and ``task_arithmetic``.

One kernel pass (:func:`_merge_kernel`): each block loads base once and each finetuned tensor
once, trims (threshold key and tie cutoff), applies DARE and consensus, elects and merges in
registers, and stores ``out`` (or, for ``elect_sign_total``, a per-block sum of the elected
signs). The T finetuned tensors reach the kernel as one tuple argument and its loop over tasks
is unrolled (``tl.static_range``). Per-task values are loaded inside the kernel from the device
tensors ``task_scalars`` (float32 ``[T, SCALAR_COLUMNS]``), ``task_trim`` (int64
``[T, TRIM_COLUMNS]``) and ``merge_scalars`` (float32 ``[OUT_COLUMNS]``); the host ints of
``rule`` become compile-time constants. Float math follows the reference's order exactly (fp
contraction off, IEEE division).

Host reads: one, only with ``rule[RULE_CHECK_FINITE] = 1``: a read-only pre-scan kernel counts
the NaN/Inf of each input and the counts are read back to raise ``ValueError`` before the merge
kernel writes anything (``out`` may alias ``base`` or a finetuned tensor).
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
    INPUT_DTYPES,
    MIN_BLOCK,
    OUT_LAM,
    OUT_ZERO_FILL,
    SCALAR_COLUMNS,
    SCALAR_SCALE,
    SCALAR_WEIGHT,
    TRIM_COLUMNS,
    TRIM_DARE_KEEP,
    TRIM_DARE_KEY,
    TRIM_THRESHOLD_KEY,
    TRIM_TIE_CUTOFF,
    autotune,
    check_index_offset,
    check_tensor,
    consensus_arg,
    consensus_bit,
    count_nonfinite,
    dare_kept,
    flags,
    grid_over,
    load_f32,
    magnitude_key,
    per_task_table,
    per_task_values,
    sign,
    store_as,
    task_delta,
    task_inputs,
)


@autotune(ELEMENT_CONFIGS, key=["T", "ELECT", "MERGE", "SIGN_TOTAL"], reset_to_zero=["partial_ptr"],
          restore_value=["out_ptr"])
@triton.jit
def _merge_kernel(
    base_ptr, ft_ptrs, cons_ptr, scalars_ptr, trim_ptr, merge_scalars_ptr, out_ptr, partial_ptr, n, index_offset,
    T: tl.constexpr, HAS_BASE: tl.constexpr, ADD_BASE: tl.constexpr, HAS_CONS: tl.constexpr, ELECT: tl.constexpr,
    WEIGHTED: tl.constexpr, MERGE: tl.constexpr, DIV_WEIGHT: tl.constexpr, SIGN_TOTAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One block of the fused merge: trim, DARE, consensus, elect, disjoint merge, output.

    ELECT: 0 none, 1 sum, 2 count. MERGE: 0 mean, 1 sum, 2 max. DIV_WEIGHT: divisor "weight".
    ADD_BASE: out = base + lam * merged (else lam * merged).
    SIGN_TOTAL: write partial[block] = sum of sign(S) (elect_sign_total) instead of out.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    b = 0.0
    if HAS_BASE:
        b = load_f32(base_ptr, offs, in_range)
    cons_bit = in_range
    if HAS_CONS:
        cons_bit = consensus_bit(cons_ptr, offs, in_range)

    # pass 1 over the tasks: tau_hat_t (kept in registers) and S = sum_t e_t, from 0, in task order
    vals = ()
    total = tl.zeros([BLOCK], dtype=tl.float32)
    merged = tl.zeros([BLOCK], dtype=tl.float32)
    for t in tl.static_range(T):
        d = task_delta(ft_ptrs[t], b, offs, in_range, HAS_BASE)
        # trim: key above the threshold's, or equal to it up to the tie cutoff (int64 compares)
        trim_row = trim_ptr + t * TRIM_COLUMNS
        key = magnitude_key(d).to(tl.int64)
        t_key = tl.load(trim_row + TRIM_THRESHOLD_KEY)
        keep = (key > t_key) | ((key == t_key) & (offs <= tl.load(trim_row + TRIM_TIE_CUTOFF)))
        dare_keep = tl.load(trim_row + TRIM_DARE_KEEP)
        if dare_keep < DARE_KEEP_ONE:  # uniform branch: tasks without DARE skip the hash
            keep = keep & dare_kept(offs + index_offset, dare_keep, tl.load(trim_row + TRIM_DARE_KEY))
        if HAS_CONS:
            keep = keep & cons_bit
        v = tl.where(keep, d * tl.load(scalars_ptr + t * SCALAR_COLUMNS + SCALAR_SCALE), 0.0)
        w = tl.load(scalars_ptr + t * SCALAR_COLUMNS + SCALAR_WEIGHT)
        if ELECT == 0:
            merged = merged + v * w
        else:
            e = v
            if WEIGHTED:
                e = v * w
            if ELECT == 2:
                e = sign(e)
            total = total + e
            vals = vals + (v,)  # noqa: RUF005 (a Triton tuple, unrolled)

    if SIGN_TOTAL:
        signs = tl.where(in_range, sign(total), 0.0).to(tl.int64)
        tl.store(partial_ptr + pid, tl.sum(signs, axis=0))
    else:
        if ELECT != 0:
            # pass 2: the entries agreeing with gamma = sign(S) (zero_fill where S == 0);
            # e_t agrees when positive if gamma > 0, else when negative (also for gamma == 0)
            gamma = tl.where(total == 0, tl.load(merge_scalars_ptr + OUT_ZERO_FILL), sign(total))
            num = tl.zeros([BLOCK], dtype=tl.float32)
            den = tl.zeros([BLOCK], dtype=tl.float32)
            best = tl.zeros([BLOCK], dtype=tl.float32)
            for t in tl.static_range(T):
                v = vals[t]
                w = tl.load(scalars_ptr + t * SCALAR_COLUMNS + SCALAR_WEIGHT)
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
        result = merged * tl.load(merge_scalars_ptr + OUT_LAM)
        if ADD_BASE:
            result = b + result
        store_as(out_ptr + offs, result, in_range)


@autotune(ELEMENT_CONFIGS, key=["T", "HAS_BASE"], reset_to_zero=["bad_ptr"])
@triton.jit
def _nonfinite_count_kernel(base_ptr, ft_ptrs, bad_ptr, n, T: tl.constexpr, HAS_BASE: tl.constexpr,
                            BLOCK: tl.constexpr):
    """Read-only: bad[0] += #NaN/Inf in base, bad[1 + t] += #NaN/Inf in finetuned[t]
    (integer atomics: exact and order-independent)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    if HAS_BASE:
        tl.atomic_add(bad_ptr, count_nonfinite(load_f32(base_ptr, offs, in_range), in_range).to(tl.int64))
    for t in tl.static_range(T):
        count = count_nonfinite(load_f32(ft_ptrs[t], offs, in_range), in_range)
        tl.atomic_add(bad_ptr + 1 + t, count.to(tl.int64))


@autotune(ELEMENT_CONFIGS, key=["T"])
@triton.jit
def _task_arithmetic_kernel(base_ptr, ft_ptrs, weights_ptr, lam_ptr, out_ptr, n, T: tl.constexpr,
                            BLOCK: tl.constexpr):
    """out = base + lam * sum_t w_t (f_t - base) in fp32, summed from 0 in task order: the
    operations of _merge_kernel's linear merge with every entry kept and scale 1."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    b = load_f32(base_ptr, offs, in_range)
    merged = tl.zeros([BLOCK], dtype=tl.float32)
    for t in tl.static_range(T):
        merged = merged + (load_f32(ft_ptrs[t], offs, in_range) - b) * tl.load(weights_ptr + t)
    store_as(out_ptr + offs, b + merged * tl.load(lam_ptr), in_range)


# ---- launchers --------------------------------------------------------------------------------

_ELECTS = (constants.ELECT_NONE, constants.ELECT_SUM, constants.ELECT_COUNT)
_MERGES = (constants.MERGE_MEAN, constants.MERGE_SUM, constants.MERGE_MAX)
_DIVISORS = (constants.DIVISOR_COUNT, constants.DIVISOR_WEIGHT)


def _rule_entry(rule: list, index: int, name: str, allowed: Sequence[int]) -> int:
    value = rule[index]
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"rule[{name}] must be one of {tuple(allowed)}, got {value!r}")
    return int(value)


def _election(rule: Sequence[int]) -> tuple[list, int, bool]:
    """The rule as a list (length checked), its elect code and elect_weighted flag."""
    rule = list(rule)
    if len(rule) != constants.RULE_LENGTH:
        raise ValueError(f"rule must have {constants.RULE_LENGTH} entries, got {len(rule)}")
    elect = _rule_entry(rule, constants.RULE_ELECT, "RULE_ELECT", _ELECTS)
    return rule, elect, bool(_rule_entry(rule, constants.RULE_ELECT_WEIGHTED, "RULE_ELECT_WEIGHTED", (0, 1)))


def _fused_inputs(base, finetuned, task_scalars, task_trim, consensus, index_offset):
    b, fts, n, device = task_inputs(base, finetuned)
    cons = consensus_arg(consensus, n, device)
    T = len(fts)
    scalars = per_task_table(task_scalars, "task_scalars", T, constants.SCALAR_COLUMNS, torch.float32, device)
    trim = per_task_table(task_trim, "task_trim", T, constants.TRIM_COLUMNS, torch.int64, device)
    return b, fts, n, device, cons, scalars, trim, check_index_offset(index_offset)


def _check_finite(b: Tensor | None, fts: tuple[Tensor, ...], n: int) -> None:
    """Raise ValueError naming the first input holding NaN or Inf; writes nothing."""
    if n == 0:
        return
    bad = torch.zeros(len(fts) + 1, dtype=torch.int64, device=fts[0].device)
    _nonfinite_count_kernel[grid_over(n)](fts[0] if b is None else b, fts, bad, n, T=len(fts), HAS_BASE=b is not None)
    # The one exception to "no host read" in merge_fused, on its error-check path only
    # (rule[RULE_CHECK_FINITE] = 1): the counts must reach the host to raise.
    names = ["base"] + [f"finetuned[{t}]" for t in range(len(fts))]
    for name, count in zip(names, bad.tolist(), strict=True):
        if count:
            raise ValueError(f"{name} contains {count} NaN or Inf value(s); pass allow_nonfinite=True to merge anyway")


def elect_sign_total(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    task_scalars: Tensor,
    task_trim: Tensor,
    consensus: Tensor | None,
    rule: Sequence[int],
    index_offset: int = 0,
) -> Tensor:
    """Triton launcher of ``mtmerge::elect_sign_total``.

    Parameters
    ----------
    base, finetuned, task_scalars, task_trim, consensus, index_offset
        As in :func:`merge_fused`.
    rule : sequence of int
        As in :func:`merge_fused`; only ``rule[RULE_ELECT]`` (``ELECT_SUM`` or ``ELECT_COUNT``)
        and ``rule[RULE_ELECT_WEIGHTED]`` matter.

    Returns
    -------
    Tensor
        int64 0-d: ``sum_i sign(S_i)`` (per-block partial sums, summed in block order).
    """
    b, fts, n, device, cons, scalars, trim, index_offset = _fused_inputs(base, finetuned, task_scalars, task_trim,
                                                                         consensus, index_offset)
    _, elect, weighted = _election(rule)
    if elect == constants.ELECT_NONE:
        raise ValueError("elect_sign_total needs an election: rule[RULE_ELECT] must be ELECT_SUM or ELECT_COUNT")
    partial = torch.zeros(triton.cdiv(n, MIN_BLOCK), dtype=torch.int64, device=device)
    if n:
        dummy_out = torch.empty(1, dtype=torch.float32, device=device)
        _merge_kernel[grid_over(n)](
            fts[0] if b is None else b, fts, fts[0] if cons is None else cons, scalars, trim, scalars, dummy_out,
            partial, n, index_offset,
            T=len(fts), ADD_BASE=False, ELECT=elect, WEIGHTED=weighted, MERGE=constants.MERGE_SUM, DIV_WEIGHT=False,
            SIGN_TOTAL=True, **flags(b, cons), **EXACT,
        )
    return partial.sum()


def merge_fused(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    task_scalars: Tensor,
    task_trim: Tensor,
    consensus: Tensor | None,
    rule: Sequence[int],
    merge_scalars: Tensor,
    out: Tensor,
    index_offset: int = 0,
) -> None:
    """Triton launcher of ``mtmerge::merge_fused``: writes ``base + lam * merged`` into ``out``
    (``lam * merged`` without base or with ``rule[RULE_WITH_BASE] = 0``). Semantics: the reference.

    Parameters
    ----------
    base : Tensor or None
        The pre-trained tensor; None when ``finetuned`` already holds task vectors.
    finetuned : sequence of Tensor
        T tensors of ``base``'s dtype (float32, bfloat16 or float16), shape and device.
    task_scalars : Tensor
        float32 ``[T, SCALAR_COLUMNS]``: weight and rescale per task.
    task_trim : Tensor
        int64 ``[T, TRIM_COLUMNS]``: threshold key, tie cutoff, DARE key, DARE keep threshold.
    consensus : Tensor or None
        Packed uint8 mask of exactly ``ceil(n / 8)`` bytes.
    rule : sequence of int
        ``[elect, elect_weighted, merge, divisor, with_base, check_finite]`` (``RULE_*`` indices,
        ``ELECT_*``, ``MERGE_*``, ``DIVISOR_*`` codes); ``ELECT_NONE`` needs ``MERGE_SUM``.
    merge_scalars : Tensor
        float32 ``[OUT_COLUMNS]``: ``lam`` and ``zero_fill`` (1, -1 or 0).
    out : Tensor
        float32, bfloat16 or float16 with ``n`` elements; may alias ``base``.
    index_offset : int
        DARE numbers entry ``i`` as flat index ``index_offset + i`` (chunks of a tensor).

    Raises
    ------
    ValueError
        With ``rule[RULE_CHECK_FINITE] = 1``, NaN/Inf in ``base`` or ``finetuned[t]`` (named),
        before anything is written to ``out``.
    """
    b, fts, n, device, cons, scalars, trim, index_offset = _fused_inputs(base, finetuned, task_scalars, task_trim,
                                                                         consensus, index_offset)
    rule, elect, weighted = _election(rule)
    merge = _rule_entry(rule, constants.RULE_MERGE, "RULE_MERGE", _MERGES)
    divide_by_weight = _rule_entry(rule, constants.RULE_DIVISOR, "RULE_DIVISOR", _DIVISORS) == constants.DIVISOR_WEIGHT
    with_base = bool(_rule_entry(rule, constants.RULE_WITH_BASE, "RULE_WITH_BASE", (0, 1)))
    check_finite = bool(_rule_entry(rule, constants.RULE_CHECK_FINITE, "RULE_CHECK_FINITE", (0, 1)))
    if elect == constants.ELECT_NONE and merge != constants.MERGE_SUM:
        raise ValueError("rule: ELECT_NONE (a linear merge) needs MERGE_SUM")
    merge_scalars = per_task_table(merge_scalars, "merge_scalars", constants.OUT_COLUMNS, None, torch.float32, device)
    check_tensor(out, "out")
    if out.dtype not in INPUT_DTYPES:
        raise TypeError(f"out must be one of {INPUT_DTYPES}, got {out.dtype}")
    if out.numel() != n or out.device != device:
        raise ValueError(f"out must hold {n} elements on {device}, got {out.numel()} on {out.device}")
    if check_finite:
        _check_finite(b, fts, n)
    if n == 0:
        return
    target = out.view(-1) if out.is_contiguous() else torch.empty(n, dtype=out.dtype, device=device)
    _merge_kernel[grid_over(n)](
        fts[0] if b is None else b, fts, fts[0] if cons is None else cons, scalars, trim, merge_scalars, target,
        torch.empty(1, dtype=torch.int64, device=device), n, index_offset,  # (partial: unused here)
        T=len(fts), ADD_BASE=b is not None and with_base, ELECT=elect, WEIGHTED=weighted, MERGE=merge,
        DIV_WEIGHT=divide_by_weight, SIGN_TOTAL=False,
        **flags(b, cons), **EXACT,
    )
    if not out.is_contiguous():
        out.copy_(target.view(out.shape))


def task_arithmetic(base: Tensor, finetuned: Sequence[Tensor], weights: Tensor, lam: Tensor) -> Tensor:
    """Triton launcher of ``mtmerge::task_arithmetic``: ``base + lam * sum_t weights[t] * (finetuned[t] - base)``.

    float32, bfloat16, float16: computed in float32 by :func:`_task_arithmetic_kernel`, bit for
    bit as :func:`merge_fused`'s linear merge (scale 1, every entry kept, with base). float64
    (gradcheck): computed in float64 with torch ops on the device, by the same formula in task
    order. No finiteness check. No host read.

    Parameters
    ----------
    base : Tensor
        float32, bfloat16, float16 or float64.
    finetuned : sequence of Tensor
        T tensors of ``base``'s dtype, shape and device.
    weights : Tensor
        Floating ``[T]``.
    lam : Tensor
        Floating, one element.

    Returns
    -------
    Tensor
        A new contiguous tensor of ``base``'s dtype and shape.
    """
    check_tensor(base, "base")  # (not optional here)
    b, fts, n, device = task_inputs(base, finetuned, dtypes=(*INPUT_DTYPES, torch.float64))
    T = len(fts)
    for x, name in ((weights, "weights"), (lam, "lam")):
        check_tensor(x, name)
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}, expected {device}")
    if weights.dim() != 1:
        raise ValueError(f"weights must be 1-D [T], got shape {list(weights.shape)}")
    if lam.dim() != 0:
        raise ValueError(f"lam must be a 0-d tensor, got shape {list(lam.shape)}")
    if base.dtype == torch.float64:
        w = per_task_values(weights, "weights", T, torch.float64, device)
        acc = torch.zeros_like(b)
        for t, f in enumerate(fts):
            acc = acc + (f - b) * w[t]
        return (b + acc * lam.detach().to(torch.float64)).reshape(base.shape)
    w = per_task_values(weights, "weights", T, torch.float32, device)
    lam32 = per_task_values(lam, "lam", 1, torch.float32, device)
    out = torch.empty(base.shape, dtype=base.dtype, device=device)
    if n:
        _task_arithmetic_kernel[grid_over(n)](b, fts, w, lam32, out.view(-1), n, T=T, **EXACT)
    return out
