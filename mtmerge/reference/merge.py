"""Plain-PyTorch reference for the merge family: the math, written to be read.

These functions define what "correct" means for the compiled kernels (``csrc/merge``) and
the Triton kernels (``kernels/merge/``). They favour clarity over speed: they sort and
concatenate freely.

Magnitude selection (``magnitude_threshold`` / ``threshold_mask``)
-------------------------------------------------------------------
A list of tensors is one vector: their row-major flattenings, concatenated in list order.
With ``a = |x|`` over that vector, ``n = len(a)`` and ``0 <= k <= n``:

* ``selection="exact"`` keeps exactly ``k`` entries: every ``a_i > t`` where ``t`` is the
  k-th largest value, plus the first ``ties_kept = k - #{a_i > t}`` entries with ``a_i == t``
  in flat order (ties broken by lowest flat index). ``k = 0`` gives ``t = +inf`` and
  ``ties_kept = 0``.
* ``selection="geq"`` (the TIES paper's rule) keeps every ``a_i >= t`` where ``t`` is the
  ``(n - k)``-th smallest value (1-based), i.e. the ``(k+1)``-th largest; ``k = n`` keeps all
  (``t`` is then the smallest value). ``ties_kept`` counts the entries equal to ``t``, all of
  which are kept.

NaN anywhere in ``x`` raises ``ValueError``; +-inf are ordinary values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtmerge._constants import (
    DARE_HIGH_WORD_SALT,
    DARE_KEEP_ONE,
    DIVISOR_COUNT,
    ELECT_COUNT,
    ELECT_NONE,
    F32_INF_KEY,
    INT64_MAX,
    MERGE_MEAN,
    MERGE_SUM,
    OUT_LAM,
    OUT_ZERO_FILL,
    RULE_CHECK_FINITE,
    RULE_DIVISOR,
    RULE_ELECT,
    RULE_ELECT_WEIGHTED,
    RULE_MERGE,
    RULE_WITH_BASE,
    SCALAR_SCALE,
    SCALAR_WEIGHT,
    TRIM_DARE_KEEP,
    TRIM_DARE_KEY,
    TRIM_THRESHOLD_KEY,
    TRIM_TIE_CUTOFF,
)
from mtmerge._rng import dare_keep_threshold, dare_task_key, fmix32  # noqa: F401  (re-exported)


def _flat_magnitudes(xs: Sequence[Tensor]) -> Tensor:
    flat = torch.cat([x.reshape(-1) for x in xs]).abs()
    if torch.isnan(flat).any():
        raise ValueError(f"x contains {int(torch.isnan(flat).sum())} NaN value(s); magnitude selection is "
                         "undefined for NaN")
    return flat


def magnitude_threshold(xs: Sequence[Tensor], k: int, selection: str = "exact") -> tuple[Tensor, Tensor]:
    """Threshold on ``|x|`` and the number of entries equal to it that are kept.

    Parameters
    ----------
    xs : sequence of Tensor
        Tensors of one float dtype, seen as one concatenated vector of ``n`` entries.
    k : int
        How many entries to keep, ``0 <= k <= n``.
    selection : {"exact", "geq"}
        Tie rule, see the module docstring.

    Returns
    -------
    threshold : Tensor
        0-d, dtype of ``xs``: the magnitude ``t``.
    ties_kept : Tensor
        0-d int64: how many entries with ``|x| == t`` are kept.
    """
    a = _flat_magnitudes(xs)
    n = a.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    inf = torch.tensor(float("inf"), dtype=xs[0].dtype, device=a.device)
    zero = torch.zeros((), dtype=torch.int64, device=a.device)
    if selection == "exact":
        if k == 0:
            return inf, zero
        t = torch.sort(a, descending=True).values[k - 1]
        return t.clone(), k - (a > t).sum()
    if selection == "geq":
        if n == 0:
            return inf, zero
        ascending = torch.sort(a).values
        t = ascending[0] if k == n else ascending[n - k - 1]  # the (n-k)-th smallest, 1-based
        return t.clone(), (a == t).sum()
    raise ValueError(f"selection must be 'exact' or 'geq', got {selection!r}")


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean mask, flattened, into uint8: bit ``i`` of byte ``j`` is entry ``8j + i``.

    Matches ``numpy.packbits(mask.ravel(), bitorder="little")``.
    """
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=mask.device)
    return (flat.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` entries."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32).unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def threshold_mask(
    xs: Sequence[Tensor],
    threshold: Tensor,
    ties_kept: Tensor,
    selection: str = "exact",
    packed: bool = False,
) -> list[Tensor]:
    """Masks of the kept entries, one per tensor, given ``magnitude_threshold``'s result.

    Returns bool masks shaped like each ``x`` or, with ``packed=True``, flat uint8 tensors of
    ``ceil(numel / 8)`` bytes (see :func:`pack_bits`).
    """
    a = torch.cat([x.reshape(-1) for x in xs]).abs()
    t = threshold.to(a.dtype).abs()
    if selection == "geq":
        keep = a >= t
    elif selection == "exact":
        is_tie = a == t
        tie_rank = torch.cumsum(is_tie.to(torch.int64), dim=0)  # 1-based rank among ties
        keep = (a > t) | (is_tie & (tie_rank <= ties_kept))
    else:
        raise ValueError(f"selection must be 'exact' or 'geq', got {selection!r}")
    masks = list(torch.split(keep, [x.numel() for x in xs]))
    if packed:
        return [pack_bits(m) for m in masks]
    # clone: an op's outputs must not be views of one another (opcheck checks aliasing)
    return [m.reshape(x.shape).clone() for m, x in zip(masks, xs, strict=True)]


# =============================================================================================
# Merge primitives: task vectors, trim, elect, disjoint merge, DARE, TALL masks, Consensus.
#
# Every function below takes the task vectors implicitly as ``finetuned[t] - base`` (or the
# tensors themselves when ``base`` is None), computed in float32, flattened row-major: the
# compiled kernels never materialize them, the reference does. See DESIGN.md, "Merge
# semantics", and ``mtmerge/ops/merge.py`` for how the public functions compose these.
#
# Magnitudes are compared as the integer bit patterns of ``|tau|`` in float32 (``key``): the
# same order as the values for finite numbers and +inf, and a total order every backend
# agrees on. A trim is given per task as ``(threshold, tie_cutoff)``: keep ``key > key(t)``,
# plus ``key == key(t)`` at flat index ``<= tie_cutoff`` (``-1``: no tie kept; ``INT64_MAX``:
# every tie kept, the "geq" rule).
# =============================================================================================

_M32 = 0xFFFFFFFF



def task_deltas(base: Tensor | None, finetuned: Sequence[Tensor]) -> list[Tensor]:
    """``finetuned[t] - base`` (or ``finetuned[t]``) as flat contiguous float32 tensors."""
    b = None if base is None else base.reshape(-1).float()
    return [f.reshape(-1).float() - b if b is not None else f.reshape(-1).float().contiguous() for f in finetuned]


def magnitude_keys(d: Tensor) -> Tensor:
    """int64 bit patterns of ``|d|`` for a flat float32 ``d`` (they order like ``|d|``)."""
    return d.contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def _threshold_key(threshold: Tensor) -> int:
    return int(threshold.detach().float().cpu().abs().view(torch.int32).item())


def _key_to_float(key: int) -> float:
    return float(torch.tensor(key, dtype=torch.int32).view(torch.float32).item())


def _consensus_bits(consensus: Tensor | None, n: int) -> Tensor | None:
    return None if consensus is None else unpack_bits(consensus.reshape(-1), n)


def _task_keys(
    base, finetuned, consensus, allow_nonfinite: bool, check: bool = True
) -> tuple[list[Tensor], list[Tensor]]:
    """Task vectors and their magnitude keys (entries outside ``consensus`` have key 0).

    Raises ValueError for NaN in a task vector, and for Inf unless ``allow_nonfinite``.
    """
    deltas = task_deltas(base, finetuned)
    n = deltas[0].numel() if deltas else 0
    cons = _consensus_bits(consensus, n)
    keys = []
    for t, d in enumerate(deltas):
        key = magnitude_keys(d)
        if cons is not None:
            key = torch.where(cons, key, torch.zeros_like(key))
        if check:
            _check_finite_keys(key, t, allow_nonfinite)
        keys.append(key)
    return deltas, keys


def _check_finite_keys(key: Tensor, t: int, allow_nonfinite: bool) -> None:
    nan = int((key > F32_INF_KEY).sum())
    if nan:
        raise ValueError(f"finetuned[{t}]: its task vector has {nan} NaN value(s); magnitude selection is "
                         "undefined for NaN")
    inf = int((key == F32_INF_KEY).sum())
    if inf and not allow_nonfinite:
        raise ValueError(f"finetuned[{t}]: its task vector has {inf} Inf value(s) (Inf in base or finetuned); "
                         "pass allow_nonfinite=True to merge them")


def _cutoff_for(key: Tensor, t_key: int, ties_kept: int) -> int:
    """Flat index of the last tie kept when the first ``ties_kept`` entries equal to t are."""
    if ties_kept <= 0:
        return -1
    tie_positions = torch.nonzero(key == t_key).reshape(-1)
    if ties_kept >= tie_positions.numel():
        return INT64_MAX
    return int(tie_positions[ties_kept - 1])


def delta_threshold(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    ks: Sequence[int],
    selection: str = "exact",
    allow_nonfinite: bool = False,
    consensus: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-task trim of each task vector to its ``ks[t]`` largest magnitudes.

    Returns
    -------
    thresholds : Tensor
        float32 ``[T]``: the threshold magnitude of each task.
    tie_cutoffs : Tensor
        int64 ``[T]``: entries equal to the threshold are kept up to this flat index.
        ``"exact"``: exactly ``ks[t]`` entries are kept, ties by lowest flat index (``k = 0``
        gives ``(inf, -1)``). ``"geq"``: every entry ``>=`` the ``(n - k)``-th smallest (the
        TIES paper's rule; ``k = n`` keeps all), cutoff ``INT64_MAX``.
    """
    _, keys = _task_keys(base, finetuned, consensus, allow_nonfinite)
    device = finetuned[0].device
    thresholds, cutoffs = [], []
    for key, k in zip(keys, ks, strict=True):
        n = key.numel()
        if not 0 <= k <= n:
            raise ValueError(f"ks must be in [0, {n}], got {k}")
        descending = torch.sort(key, descending=True).values
        if selection == "exact":
            if k == 0:
                t_key, cutoff = F32_INF_KEY, -1
            else:
                t_key = int(descending[k - 1])
                cutoff = _cutoff_for(key, t_key, k - int((key > t_key).sum()))
        elif selection == "geq":
            if n == 0:
                t_key, cutoff = F32_INF_KEY, -1
            else:
                t_key, cutoff = int(descending[min(k + 1, n) - 1]), INT64_MAX
        else:
            raise ValueError(f"selection must be 'exact' or 'geq', got {selection!r}")
        thresholds.append(_key_to_float(t_key))
        cutoffs.append(cutoff)
    return (torch.tensor(thresholds, dtype=torch.float32, device=device),
            torch.tensor(cutoffs, dtype=torch.int64, device=device))


def tie_cutoffs(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    thresholds: Tensor,
    ties_kept: Tensor,
    consensus: Tensor | None = None,
) -> Tensor:
    """int64 ``[T]``: the tie cutoff that keeps the first ``ties_kept[t]`` entries whose
    magnitude equals ``thresholds[t]`` (``-1`` if that is 0, else ``INT64_MAX`` if that is all
    of them)."""
    _, keys = _task_keys(base, finetuned, consensus, allow_nonfinite=True)
    out = [_cutoff_for(key, _threshold_key(thresholds[t]), int(ties_kept[t])) for t, key in enumerate(keys)]
    return torch.tensor(out, dtype=torch.int64, device=finetuned[0].device)


def magnitude_histogram(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    shift: int,
    bits: int,
    prefixes: Sequence[int],
    prefix_shift: int = 31,
    consensus: Tensor | None = None,
) -> Tensor:
    """int64 ``[T, 2**bits]``: per task, a histogram of the digit ``(key >> shift) & (2**bits - 1)``
    of the magnitude keys (0 outside ``consensus``) whose ``key >> prefix_shift`` equals
    ``prefixes[t]`` (``prefix_shift = 31`` counts every key: keys are below 2**31).

    Two calls find an exact top-k threshold over any stream of chunks (sum the histograms):
    the top 15 bits (``shift=16, bits=15``), then the low 16 bits of the keys in the chosen
    bin (``shift=0, bits=16, prefix_shift=16, prefixes=bin``). NaN/Inf land in the bins at
    and above ``0x7F80 >> ...`` and are the caller's to reject."""
    if not 1 <= bits <= 16 or shift < 0 or shift + bits > 31:
        raise ValueError(f"bits must be in [1, 16] and shift + bits <= 31, got shift={shift}, bits={bits}")
    if not 0 <= prefix_shift <= 31:
        raise ValueError(f"prefix_shift must be in [0, 31], got {prefix_shift}")
    _, keys = _task_keys(base, finetuned, consensus, allow_nonfinite=True, check=False)
    rows = []
    for t, key in enumerate(keys):
        digit = (key >> shift) & ((1 << bits) - 1)
        if prefix_shift < 31:
            digit = digit[(key >> prefix_shift) == prefixes[t]]
        rows.append(torch.bincount(digit, minlength=1 << bits))
    if not rows:
        return torch.zeros((0, 1 << bits), dtype=torch.int64)
    return torch.stack(rows)


# ---- DARE: a counter-based RNG keyed by (task key, flat index); keys: mtmerge._rng -----------


def _mul32(h: Tensor, c: int) -> Tensor:
    """``(h * c) mod 2**32`` for int64 tensors holding uint32 values, without int64 overflow."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer (a bijection with full avalanche) on uint32-in-int64."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dare_hash(index: Tensor, task_key: int | Tensor) -> Tensor:
    """24-bit uniform hash of int64 flat indices: ``fmix32(fmix32(lo ^ key) ^ hi ^ salt) >> 8``."""
    h = _fmix32((index & _M32) ^ task_key)
    h = _fmix32(h ^ (index >> 32) ^ DARE_HIGH_WORD_SALT)
    return h >> 8


def dare_keep_mask(n: int, seed: int, task: int, keep: int, device=None, start: int = 0) -> Tensor:
    """bool ``[n]``: DARE's keep decisions for task ``task`` at flat indices ``start ..
    start + n - 1`` (``keep`` from dare_keep_threshold)."""
    index = torch.arange(start, start + n, dtype=torch.int64, device=device)
    return dare_hash(index, dare_task_key(seed, task)) < keep


def _dare_kept(task_trim: Tensor, t: int, n: int, device, index_offset: int) -> Tensor | None:
    """DARE's keep decisions of task row ``t`` of ``task_trim`` (None: DARE keeps everything)."""
    keep = task_trim[t, TRIM_DARE_KEEP]
    if int(keep) >= DARE_KEEP_ONE:
        return None
    index = torch.arange(index_offset, index_offset + n, dtype=torch.int64, device=device)
    return dare_hash(index, task_trim[t, TRIM_DARE_KEY]) < keep


def dare_abs_sums(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    task_trim: Tensor,
    index_offset: int = 0,
) -> Tensor:
    """float64 ``[T, 2]``: ``sum |tau_t|`` and ``sum |tau_t|`` over DARE's kept entries
    (the L1 rescale factor is their ratio, mergekit's rule). DARE's key and keep threshold of
    task ``t`` are ``task_trim[t, TRIM_DARE_KEY]`` and ``task_trim[t, TRIM_DARE_KEEP]``; entry
    ``i`` is DARE's flat index ``index_offset + i`` (so a tensor processed in chunks draws the
    same mask as in one piece)."""
    rows = []
    for t, d in enumerate(task_deltas(base, finetuned)):
        a = d.double().abs()
        kept = _dare_kept(task_trim, t, d.numel(), d.device, index_offset)
        kept_sum = a.sum() if kept is None else torch.where(kept, a, torch.zeros_like(a)).sum()
        rows.append(torch.stack([a.sum(), kept_sum]))
    if not rows:
        return torch.zeros((0, 2), dtype=torch.float64)
    return torch.stack(rows)


# ---- the fused merge: trim (+ DARE, + consensus), elect, disjoint merge, output --------------


def _sign(x: Tensor) -> Tensor:
    """-1, 0 or +1 as float32 (0 for NaN, unlike torch.sign)."""
    return (x > 0).float() - (x < 0).float()


def _trimmed_task_vectors(base, finetuned, task_scalars, task_trim, consensus, index_offset=0):
    """tau_hat_t = tau_t * scale_t where kept by the trim, DARE and consensus; else 0."""
    deltas = task_deltas(base, finetuned)
    n = deltas[0].numel()
    index = torch.arange(n, dtype=torch.int64, device=deltas[0].device)
    cons = _consensus_bits(consensus, n)
    scalars = task_scalars.float()
    out = []
    for t, d in enumerate(deltas):
        key = magnitude_keys(d)
        t_key = task_trim[t, TRIM_THRESHOLD_KEY]
        keep = (key > t_key) | ((key == t_key) & (index <= task_trim[t, TRIM_TIE_CUTOFF]))
        dare = _dare_kept(task_trim, t, n, d.device, index_offset)
        if dare is not None:
            keep &= dare
        if cons is not None:
            keep &= cons
        out.append(torch.where(keep, d * scalars[t, SCALAR_SCALE], torch.zeros_like(d)))
    return out


def _election(values, weights: Tensor, elect: int, elect_weighted: bool):
    """Per task the values the election sums (weighted or not; signs for "count"), and the sum."""
    elected = []
    total = None
    for t, v in enumerate(values):
        e = v * weights[t] if elect_weighted else v
        if elect == ELECT_COUNT:
            e = _sign(e)
        elected.append(e)
        total = e if total is None else total + e
    return elected, total


def elect_sign_total(
    base: Tensor | None,
    finetuned: Sequence[Tensor],
    task_scalars: Tensor,
    task_trim: Tensor,
    consensus: Tensor | None,
    rule: Sequence[int],
    index_offset: int = 0,
) -> Tensor:
    """int64 0-d: ``sum_i sign(S_i)`` over the elected sums ``S``; its sign is the
    ``zero_sign="majority"`` fill (the TIES paper's ``resolve_zero_signs``). Arguments as
    :func:`merge_fused` (only ``rule[RULE_ELECT]``, which must not be ``ELECT_NONE``, and
    ``rule[RULE_ELECT_WEIGHTED]`` matter)."""
    if rule[RULE_ELECT] == ELECT_NONE:
        raise ValueError("elect_sign_total needs an election (rule[RULE_ELECT] must be ELECT_SUM or ELECT_COUNT)")
    values = _trimmed_task_vectors(base, finetuned, task_scalars, task_trim, consensus, index_offset)
    weights = task_scalars.float()[:, SCALAR_WEIGHT]
    _, total = _election(values, weights, rule[RULE_ELECT], bool(rule[RULE_ELECT_WEIGHTED]))
    return _sign(total).to(torch.int64).sum()


def check_finite_inputs(base: Tensor | None, finetuned: Sequence[Tensor]) -> None:
    """Raise ValueError naming the first of ``base``, ``finetuned[t]`` that holds NaN or Inf."""
    for name, x in [("base", base)] + [(f"finetuned[{t}]", f) for t, f in enumerate(finetuned)]:
        if x is not None:
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                raise ValueError(f"{name} contains {bad} NaN or Inf value(s); pass allow_nonfinite=True to merge "
                                 "anyway")


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
    """Writes ``base + lam * merged`` into ``out`` (``lam * merged`` without base or when
    ``rule[RULE_WITH_BASE]`` is 0).

    Per task ``t``: weight ``w_t`` and rescale ``s_t`` are ``task_scalars[t]`` (float32
    ``[T, 2]``); the trim keeps magnitude keys above ``task_trim[t, TRIM_THRESHOLD_KEY]`` and
    those equal to it at flat index ``<= task_trim[t, TRIM_TIE_CUTOFF]``, DARE keeps those whose
    hash under ``task_trim[t, TRIM_DARE_KEY]`` is below ``task_trim[t, TRIM_DARE_KEEP]``, and
    ``consensus`` (packed uint8) keeps its set bits. ``lam, zero_fill = merge_scalars``. With
    ``tau_hat_t`` the kept task vector times ``s_t``, ``e_t`` the elected values
    (``w_t tau_hat_t`` if ``rule[RULE_ELECT_WEIGHTED]`` else ``tau_hat_t``; their signs for
    ``ELECT_COUNT``), ``S = sum_t e_t`` (in task order) and ``gamma = sign(S)`` (``zero_fill``
    where ``S = 0``):

    * ``A_t = [tau_hat_t != 0 and sign(e_t) == gamma]`` (``ELECT_NONE``: all 1); where
      ``gamma = 0`` the negative ``e_t`` agree (the TIES paper's ``where(gamma > 0, ...)``),
    * ``num = sum_t A_t w_t tau_hat_t``, ``D = sum_t A_t`` (``DIVISOR_COUNT``) or ``sum_t A_t w_t``,
    * merged = ``num / D`` for ``MERGE_MEAN`` (``num`` where ``D = 0``, mergekit's rule: that is
      0 unless agreeing weights cancel), ``num`` for ``MERGE_SUM``, and for ``MERGE_MAX`` the
      agreeing ``w_t tau_hat_t`` of largest magnitude (lowest t on ties; 0 if none or ``gamma = 0``).

    Entry ``i`` is DARE's flat index ``index_offset + i``. With ``rule[RULE_CHECK_FINITE]``,
    raises ValueError if an input holds NaN/Inf, before ``out`` is written.
    """
    if rule[RULE_CHECK_FINITE]:
        check_finite_inputs(base, finetuned)
    values = _trimmed_task_vectors(base, finetuned, task_scalars, task_trim, consensus, index_offset)
    n = values[0].numel()
    weights = task_scalars.float()[:, SCALAR_WEIGHT]
    lam = merge_scalars.float()[OUT_LAM]
    elect = rule[RULE_ELECT]
    if elect == ELECT_NONE:
        merged = torch.zeros(n, dtype=torch.float32, device=values[0].device)
        for t, v in enumerate(values):
            merged = merged + v * weights[t]
    else:
        elected, total = _election(values, weights, elect, bool(rule[RULE_ELECT_WEIGHTED]))
        zero_fill = merge_scalars.float()[OUT_ZERO_FILL]
        gamma = torch.where(total == 0, zero_fill.expand_as(total), _sign(total))
        num = torch.zeros_like(total)
        den = torch.zeros_like(total)
        best = torch.zeros_like(total)
        for t, v in enumerate(values):
            agree = (v != 0) & torch.where(gamma > 0, elected[t] > 0, elected[t] < 0)
            wv = v * weights[t]
            num = num + torch.where(agree, wv, torch.zeros_like(wv))
            share = torch.ones_like(wv) if rule[RULE_DIVISOR] == DIVISOR_COUNT else weights[t].expand_as(wv)
            den = den + torch.where(agree, share, torch.zeros_like(wv))
            best = torch.where(agree & (wv.abs() > best.abs()), wv, best)
        if rule[RULE_MERGE] == MERGE_MEAN:
            safe_den = torch.where(den != 0, den, torch.ones_like(den))
            merged = torch.where(den != 0, num / safe_den, num)
        elif rule[RULE_MERGE] == MERGE_SUM:
            merged = num
        else:
            merged = torch.where(gamma != 0, best, torch.zeros_like(best))
    with_base = base is not None and rule[RULE_WITH_BASE]
    result = base.reshape(-1).float() + merged * lam if with_base else merged * lam
    out.copy_(result.reshape(out.shape))


def task_arithmetic(base: Tensor, finetuned: Sequence[Tensor], weights: Tensor, lam: Tensor) -> Tensor:
    """``base + lam * sum_t weights[t] * (finetuned[t] - base)``, a new tensor of ``base``'s dtype.

    Computed in float32 (float64 for float64 inputs) in task order, exactly as
    :func:`merge_fused`'s linear merge: ``acc = 0; acc = acc + (f_t - b) * w_t; b + acc * lam``.
    No finiteness check: NaN/Inf propagate. Differentiable (the op's autograd formula is in
    ``mtmerge/ops/_merge_ops.py``).
    """
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(compute)
    w = weights.to(compute).reshape(-1)
    acc = torch.zeros_like(b)
    for t, f in enumerate(finetuned):
        acc = acc + (f.to(compute) - b) * w[t]
    return (b + acc * lam.to(compute)).to(base.dtype)


# ---- TALL masks and Consensus ----------------------------------------------------------------


def tall_masks(
    base: Tensor | None, finetuned: Sequence[Tensor], merged: Tensor, lams: Sequence[float]
) -> Tensor:
    """uint8 ``[T, ceil(n/8)]``: packed ``m_t = |tau_t| > lam_t * |merged - tau_t|`` (float32)."""
    if not finetuned:
        raise ValueError("finetuned must hold at least one tensor")
    deltas = task_deltas(base, finetuned)
    mtl = merged.reshape(-1).float()
    return torch.stack([pack_bits(d.abs() > lams[t] * (mtl - d).abs()) for t, d in enumerate(deltas)])


def consensus_mask(masks: Tensor, k: int = 2) -> Tensor:
    """uint8 ``[nbytes]``: bits set where at least ``k`` of the ``T`` packed masks are set."""
    nbytes = masks.shape[-1]
    bits = [unpack_bits(m, 8 * nbytes).to(torch.int32) for m in masks]
    count = torch.stack(bits).sum(dim=0) if bits else torch.zeros(8 * nbytes, dtype=torch.int32)
    return pack_bits(count >= k)
