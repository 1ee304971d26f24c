"""Typed public wrappers of the merge family's ops: validation, then ``torch.ops.mtmerge``.

Walk: ``mtmerge.topk_mask`` -> here -> schema in ``mtmerge/_library.py`` ->
``csrc/merge/select.cpp`` (CPU), ``kernels/merge.py`` (GPU), ``mtmerge/reference/merge.py``
(truth) -> ``tests/ops/test_select.py`` -> ``benchmarks/bench_select.py``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

import mtmerge._library  # noqa: F401  (registers the ops)
from mtmerge.reference import merge as ref_merge

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


# =============================================================================================
# Merging: task arithmetic, TIES, DARE, TALL masks, Consensus.
#
# Every function is a thin layer over four ops (schemas in mtmerge/_library.py, math in
# mtmerge/reference/merge.py): ``delta_threshold`` (the trim's selection pass, per task),
# ``merge_fused`` (one pass that forms each task vector, trims it, elects the sign and writes
# the output), ``elect_sign_total`` (the "majority" zero-sign pre-pass) and ``dare_abs_sums``
# (DARE's L1 rescale). Task vectors ``finetuned[t] - base`` are never materialized.
# =============================================================================================

ELECTS = ("sum", "count")
ZERO_SIGNS = ("positive", "majority")
MERGE_RULES = ("mean", "sum", "max")
DIVISORS = ("count", "weight")
SCOPES = ("tensor", "global")
SPARSIFIERS = ("magnitude", "dare", "none")
RESCALES = ("inverse", "l1", "none")
K_RULES = ("floor", "at_least_one")

_INT64_MAX = 2**63 - 1
_DARE_KEEP_ONE = 1 << 24


class TiesKnobs(NamedTuple):
    """Every knob of a TIES merge (see DESIGN.md, "Merge semantics")."""

    selection: str = "exact"
    elect: str = "sum"
    elect_weighted: bool = False
    zero_sign: str = "positive"
    merge: str = "mean"
    divisor: str = "count"
    k_rule: str = "floor"  # k = int(d * n); "at_least_one": max(1, int(d * n))


#: ``flavor=`` presets: each reproduces its peer's output on the same inputs.
FLAVORS: dict[str, TiesKnobs] = {
    # peft.utils.merge_utils.ties
    "peft": TiesKnobs(),
    # mergekit's "ties" merge method (GeneralizedTaskArithmeticMerge with sign consensus "sum")
    "mergekit": TiesKnobs(elect_weighted=True, divisor="weight", k_rule="at_least_one"),
    # the TIES paper's released code (ties_merging_utils.py): >= the kth value, majority zero sign
    "paper": TiesKnobs(selection="geq", zero_sign="majority"),
}


def resolve_knobs(flavor: str | None = None, **overrides) -> TiesKnobs:
    """The knobs of ``flavor`` (default: ``"peft"``'s), with explicit (non-None) overrides.

    Raises ValueError naming the knob for an unknown flavor or value.
    """
    if flavor is not None and flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {tuple(FLAVORS)} or None, got {flavor!r}")
    knobs = FLAVORS[flavor or "peft"]._asdict()
    allowed = {"selection": SELECTIONS, "elect": ELECTS, "zero_sign": ZERO_SIGNS, "merge": MERGE_RULES,
               "divisor": DIVISORS, "k_rule": K_RULES, "elect_weighted": (True, False)}
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in allowed:
            raise TypeError(f"unknown TIES knob {name!r}")
        if value not in allowed[name] or (name == "elect_weighted" and not isinstance(value, bool)):
            raise ValueError(f"{name} must be one of {allowed[name]}, got {value!r}")
        knobs[name] = value
    return TiesKnobs(**knobs)


def _as_tasks(x, name: str) -> list[Tensor]:
    """A non-empty sequence of tensors, or a tensor whose first dimension indexes tasks."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError(f"{name} must be a sequence of tensors or a tensor [T, ...], got a 0-d tensor")
        xs = list(x.unbind(0))
    elif isinstance(x, Sequence) and not isinstance(x, str | bytes):
        xs = list(x)
    else:
        raise TypeError(f"{name} must be a sequence of tensors, got {type(x).__name__}")
    if not xs:
        raise ValueError(f"{name} must hold at least one tensor, got an empty sequence")
    for i, t in enumerate(xs):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return xs


def _check_like(t: Tensor, label: str, ref: Tensor, ref_label: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{label} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.shape != ref.shape:
        raise ValueError(f"{label} has shape {tuple(t.shape)} but {ref_label} has {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{label} has dtype {t.dtype} but {ref_label} has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{label} is on {t.device} but {ref_label} is on {ref.device}")


def _check_task_inputs(base: Tensor | None, finetuned, name: str = "finetuned") -> list[Tensor]:
    xs = _as_tasks(finetuned, name)
    ref, ref_label = (base, "base") if base is not None else (xs[0], f"{name}[0]")
    if base is not None and not isinstance(base, Tensor):
        raise TypeError(f"base must be a tensor, got {type(base).__name__}")
    _check_like(ref, ref_label, ref, ref_label)
    for i, t in enumerate(xs):
        _check_like(t, f"{name}[{i}]", ref, ref_label)
    return xs


def _per_task_floats(value, count: int, name: str, default: float | None = None) -> list[float]:
    if value is None:
        if default is None:
            raise ValueError(f"{name} is required")
        return [default] * count
    if isinstance(value, Tensor):
        value = value.tolist() if value.dim() else value.item()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [float(value)] * count
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a float or a sequence of {count} floats, got {type(value).__name__}")
    if len(value) != count:
        raise ValueError(f"{name} must have one entry per task ({count}), got {len(value)}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"{name} must hold floats, got {type(v).__name__}")
        out.append(float(v))
    return out


def _check_densities(density, count: int) -> list[float]:
    densities = _per_task_floats(density, count, "density")
    for d in densities:
        if not 0.0 <= d <= 1.0:  # also rejects NaN
            raise ValueError(f"density must be in [0, 1], got {d}")
    return densities


def _check_weights(weights, count: int) -> list[float]:
    out = _per_task_floats(weights, count, "weights", default=1.0)
    if not all(math.isfinite(w) for w in out):
        raise ValueError(f"weights must be finite, got {out}")
    return out


def _check_lam(lam, name: str = "lam") -> float:
    if isinstance(lam, bool) or not isinstance(lam, int | float):
        raise TypeError(f"{name} must be a float, got {type(lam).__name__}")
    if not math.isfinite(lam):
        raise ValueError(f"{name} must be finite, got {lam}")
    return float(lam)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def _check_out(out: Tensor | None, like: Tensor) -> Tensor:
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a tensor, got {type(out).__name__}")
    if out.dtype not in FLOAT_DTYPES:
        raise ValueError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
    if out.shape != like.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but the inputs have {tuple(like.shape)}")
    if out.device != like.device:
        raise ValueError(f"out is on {out.device} but the inputs are on {like.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out


def _k_for(density: float, n: int, k_rule: str) -> int:
    """Entries the trim keeps: ``int(d * n)`` (peft, the paper); mergekit keeps at least 1
    when ``d > 0``."""
    if density >= 1.0:
        return n
    k = int(density * n)
    if k_rule == "at_least_one" and n > 0 and density > 0:  # mergekit: density 0 keeps nothing
        k = max(1, k)
    return min(k, n)


def _check_consensus(consensus: Tensor | None, n: int, device) -> Tensor | None:
    if consensus is None:
        return None
    if not isinstance(consensus, Tensor) or consensus.dtype != torch.uint8:
        raise TypeError("consensus must be a packed uint8 mask (see consensus_mask)")
    if consensus.numel() != (n + 7) // 8:
        raise ValueError(f"consensus must hold ceil(n/8) = {(n + 7) // 8} bytes, got {consensus.numel()}")
    if consensus.device != device:
        raise ValueError(f"consensus is on {consensus.device} but the inputs are on {device}")
    return consensus.reshape(-1).contiguous()


def _keep_everything(count: int, device) -> tuple[Tensor, Tensor]:
    """Trim that keeps every entry: threshold 0 with every tie kept."""
    return (torch.zeros(count, dtype=torch.float32, device=device),
            torch.full((count,), _INT64_MAX, dtype=torch.int64, device=device))


def _thresholds_from(thresholds, base: Tensor | None, xs: list[Tensor], consensus) -> tuple[Tensor, Tensor]:
    """``thresholds=``: T floats (keep ``|tau| >= t``), or T ``(threshold, ties_kept)`` pairs
    such as :class:`MagnitudeThreshold` (keep ``> t`` plus the first ``ties_kept`` ties)."""
    count, device = len(xs), xs[0].device
    if isinstance(thresholds, MagnitudeThreshold):  # one pair of [T] (or 0-d, T = 1) tensors
        thresholds = list(zip(thresholds.threshold.reshape(-1), thresholds.ties_kept.reshape(-1), strict=True))
    if isinstance(thresholds, Tensor):
        values = thresholds.detach().reshape(-1)
        pairs = None
    elif isinstance(thresholds, Sequence) and thresholds and isinstance(thresholds[0], tuple):
        values = torch.stack([torch.as_tensor(p[0]).reshape(()).float().to(device) for p in thresholds])
        pairs = torch.stack([torch.as_tensor(p[1]).reshape(()).to(torch.int64).to(device) for p in thresholds])
    elif isinstance(thresholds, Sequence):
        values = torch.tensor([float(v) for v in thresholds], dtype=torch.float32)
        pairs = None
    else:
        raise TypeError(f"thresholds must be a tensor or a sequence, got {type(thresholds).__name__}")
    if values.numel() != count:
        raise ValueError(f"thresholds must have one entry per task ({count}), got {values.numel()}")
    values = values.float().abs().to(device)
    if bool(torch.isnan(values).any()):
        raise ValueError("thresholds must not be NaN")
    if pairs is None:
        return values, torch.full((count,), _INT64_MAX, dtype=torch.int64, device=device)
    return values, torch.ops.mtmerge.tie_cutoffs(base, xs, values, pairs, consensus)


def _run_merge(*args, name: str = "finetuned", **kwargs) -> Tensor:
    """:func:`_merge_passes`, with errors naming the caller's argument (the ops say "finetuned")."""
    try:
        return _merge_passes(*args, **kwargs)
    except ValueError as exc:
        if name == "finetuned":
            raise
        message = str(exc).replace("finetuned[0]", name) if "[" in name else str(exc).replace("finetuned", name)
        raise ValueError(message) from None


def _merge_passes(
    base: Tensor | None,
    xs: list[Tensor],
    *,
    out: Tensor,
    weights: list[float],
    densities: list[float] | None,
    lam: float,
    knobs: TiesKnobs | None,
    sparsify: str = "magnitude",
    thresholds=None,
    seed: int | None = None,
    rescale: str = "inverse",
    consensus: Tensor | None = None,
    allow_nonfinite: bool = False,
    task_offset: int = 0,
    ks: list[int] | None = None,
) -> Tensor:
    """Selection pass(es), then one ``merge_fused`` pass into ``out``. ``knobs=None``: a
    linear merge (``sum_t w_t tau_hat_t``, no election). ``ks``: explicit trim sizes, and a
    linear merge with ``knobs.selection`` (magnitude_prune)."""
    count, n, device = len(xs), xs[0].numel(), xs[0].device
    linear = knobs is None or ks is not None
    if sparsify not in SPARSIFIERS:
        raise ValueError(f"sparsify must be one of {SPARSIFIERS}, got {sparsify!r}")
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    consensus = _check_consensus(consensus, n, device)
    dare_keep = [_DARE_KEEP_ONE] * count
    scales = [1.0] * count
    if sparsify == "magnitude" and thresholds is not None:
        thr, cut = _thresholds_from(thresholds, base, xs, consensus)
    elif sparsify == "magnitude":
        if ks is None:
            ks = [_k_for(d, n, knobs.k_rule if knobs else "floor") for d in densities]
        thr, cut = torch.ops.mtmerge.delta_threshold(base, xs, ks, knobs.selection if knobs else "exact",
                                                     bool(allow_nonfinite), consensus)
    else:
        thr, cut = _keep_everything(count, device)
    if sparsify == "dare":
        seed = _check_seed(seed)
        dare_keep = [ref_merge.dare_keep_threshold(d) for d in densities]
        if rescale == "inverse":
            scales = [1.0 / d if d > 0 else 0.0 for d in densities]
        elif rescale == "l1":  # mergekit's RescaleNorm.l1: restore the L1 norm of each task vector
            sums = torch.ops.mtmerge.dare_abs_sums(base, xs, seed, dare_keep, task_offset).tolist()
            scales = [before / after if before >= 1e-7 and after >= 1e-7 else 1.0 for before, after in sums]
    seed = 0 if seed is None else seed
    if linear:
        elect, elect_weighted, zero_fill, merge, divisor = "none", False, 1, "sum", "count"
    else:
        elect, elect_weighted, merge, divisor = knobs.elect, knobs.elect_weighted, knobs.merge, knobs.divisor
        zero_fill = 1
        if knobs.zero_sign == "majority":
            total = int(torch.ops.mtmerge.elect_sign_total(base, xs, weights, scales, thr, cut, seed, dare_keep,
                                                           elect, elect_weighted, consensus))
            # The paper's resolve_zero_signs: the sign of the sum of elected signs (0 if that
            # is 0 too: the merge then keeps negatives for "mean" and gives 0 for "max").
            zero_fill = (total > 0) - (total < 0)
    torch.ops.mtmerge.merge_fused(base, xs, weights, scales, thr, cut, seed, dare_keep, consensus, elect,
                                  elect_weighted, zero_fill, merge, divisor, lam, bool(allow_nonfinite), out,
                                  task_offset)
    return out


def task_arithmetic(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float] | float | None = None,
    lam: float = 1.0,
    out: Tensor | None = None,
    *,
    allow_nonfinite: bool = False,
) -> Tensor:
    """Task arithmetic: ``base + lam * sum_t w_t (finetuned[t] - base)``, in one fused pass.

    Parameters
    ----------
    base : Tensor
        The pre-trained weights, any shape ``S``, float32/bfloat16/float16.
    finetuned : sequence of T Tensor
        Fine-tuned weights, each of shape ``S`` and ``base``'s dtype and device.
    weights : float or sequence of T floats, optional
        ``w_t`` (default 1).
    lam : float
        Scaling of the summed task vectors.
    out : Tensor, optional
        Contiguous output of shape ``S`` (any float dtype); default: a new tensor like ``base``.
    allow_nonfinite : bool
        Let NaN/Inf inputs through (else ValueError).

    Returns
    -------
    Tensor
        ``out``, shape ``S``. Computed in float32.
    """
    xs = _check_task_inputs(base, finetuned)
    out = _check_out(out, base)
    return _run_merge(base, xs, out=out, weights=_check_weights(weights, len(xs)), densities=None,
                      lam=_check_lam(lam), knobs=None, sparsify="none", allow_nonfinite=allow_nonfinite)


def ties_merge(
    base: Tensor,
    finetuned: Sequence[Tensor],
    density: float | Sequence[float] = 0.2,
    weights: Sequence[float] | float | None = None,
    lam: float = 1.0,
    *,
    flavor: str | None = None,
    selection: str | None = None,
    elect: str | None = None,
    elect_weighted: bool | None = None,
    zero_sign: str | None = None,
    merge: str | None = None,
    divisor: str | None = None,
    scope: str = "tensor",
    thresholds=None,
    sparsify: str = "magnitude",
    seed: int | None = None,
    rescale: str = "inverse",
    consensus: Tensor | None = None,
    out: Tensor | None = None,
    allow_nonfinite: bool = False,
) -> Tensor:
    """TIES merge, fused: ``base + lam * ties(finetuned - base)`` without forming task vectors.

    One selection pass per task finds its trim threshold (radix selection on the float bits
    of ``|finetuned[t] - base|``, computed on the fly); then one pass forms every task vector,
    trims it, elects the sign and writes ``out``. Extra memory: O(T) scalars plus the
    selection's small candidate buffer; never a ``T x n`` stack.

    Parameters
    ----------
    base : Tensor
        Pre-trained weights, shape ``S``, float32/bfloat16/float16.
    finetuned : sequence of T Tensor
        Fine-tuned weights of shape ``S``, ``base``'s dtype and device.
    density : float or sequence of T floats
        Fraction kept by the trim, in [0, 1] (also DARE's keep probability).
    weights : float or sequence of T floats, optional
        ``w_t`` (default 1).
    lam : float
        Scaling of the merged task vector.
    flavor : {"peft", "mergekit", "paper"}, optional
        Knob preset reproducing that peer (default knobs are ``"peft"``'s); explicit knobs
        override it. See DESIGN.md, "Merge semantics".
    selection, elect, elect_weighted, zero_sign, merge, divisor : optional
        The TIES knobs: ``"exact"|"geq"``, ``"sum"|"count"``, bool, ``"positive"|"majority"``,
        ``"mean"|"sum"|"max"``, ``"count"|"weight"``.
    scope : {"tensor", "global"}
        Trim scope. For one tensor both are the same; whole-model ("global") thresholds come
        from the checkpoint pipeline through ``thresholds=``.
    thresholds : optional
        Per-task trim thresholds computed elsewhere: T floats (keep ``|tau| >= t``) or T
        ``(threshold, ties_kept)`` pairs such as :class:`MagnitudeThreshold` (keep ``|tau| > t``
        and the first ``ties_kept`` entries equal to ``t`` in flat order).
    sparsify : {"magnitude", "dare", "none"}
        The trim: top-k magnitude (TIES), DARE's random drop (DARE-TIES), or none.
    seed : int, optional
        DARE's seed (required with ``sparsify="dare"``).
    rescale : {"inverse", "l1", "none"}
        DARE's rescale: ``1/density``, back to the task vector's L1 norm (mergekit's
        ``rescale: true``), or none (mergekit's ``rescale: false``).
    consensus : Tensor, optional
        Packed uint8 mask (:func:`consensus_mask`): entries outside it are dropped from every
        task vector before the trim.
    out : Tensor, optional
        Contiguous output of shape ``S`` (any float dtype); default a new tensor like ``base``.
    allow_nonfinite : bool
        Allow Inf (NaN cannot be ranked by magnitude and is always an error when trimming).

    Returns
    -------
    Tensor
        ``out``: ``base + lam * merged``, shape ``S``.
    """
    xs = _check_task_inputs(base, finetuned)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    knobs = resolve_knobs(flavor, selection=selection, elect=elect, elect_weighted=elect_weighted,
                          zero_sign=zero_sign, merge=merge, divisor=divisor)
    out = _check_out(out, base)
    return _run_merge(base, xs, out=out, weights=_check_weights(weights, len(xs)),
                      densities=_check_densities(density, len(xs)), lam=_check_lam(lam), knobs=knobs,
                      sparsify=sparsify, thresholds=thresholds, seed=seed, rescale=rescale, consensus=consensus,
                      allow_nonfinite=allow_nonfinite)


def ties(
    task_vectors: Sequence[Tensor] | Tensor,
    density: float | Sequence[float] = 0.2,
    weights: Sequence[float] | float | None = None,
    *,
    flavor: str | None = None,
    selection: str | None = None,
    elect: str | None = None,
    elect_weighted: bool | None = None,
    zero_sign: str | None = None,
    merge: str | None = None,
    divisor: str | None = None,
    scope: str = "tensor",
    out: Tensor | None = None,
    allow_nonfinite: bool = False,
) -> Tensor:
    """TIES on task vectors: trim each to its top ``density`` magnitudes, elect signs, merge.

    Parameters
    ----------
    task_vectors : sequence of T Tensor, or Tensor ``[T, *S]``
        ``tau_t``, one shape ``S``, dtype and device.
    density, weights, flavor, selection, elect, elect_weighted, zero_sign, merge, divisor, scope
        As in :func:`ties_merge`. With ``flavor="peft"`` this is
        ``peft.utils.merge_utils.ties(torch.stack(task_vectors), weights, density)``.
    out : Tensor, optional
        Output of shape ``S``; default a new tensor of the task vectors' dtype.

    Returns
    -------
    Tensor
        The merged task vector, shape ``S``.
    """
    xs = _check_task_inputs(None, task_vectors, "task_vectors")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    knobs = resolve_knobs(flavor, selection=selection, elect=elect, elect_weighted=elect_weighted,
                          zero_sign=zero_sign, merge=merge, divisor=divisor)
    out = _check_out(out, xs[0])
    return _run_merge(None, xs, out=out, weights=_check_weights(weights, len(xs)),
                      densities=_check_densities(density, len(xs)), lam=1.0, knobs=knobs,
                      allow_nonfinite=allow_nonfinite, name="task_vectors")


def magnitude_prune(
    task_vector: Tensor,
    density: float,
    selection: str = "exact",
    *,
    k_rule: str = "floor",
    out: Tensor | None = None,
    allow_nonfinite: bool = False,
) -> Tensor:
    """Keep the ``k = int(density * n)`` largest-magnitude entries of ``task_vector``, zero the rest.

    ``selection`` is the tie rule of :func:`magnitude_threshold`; ``k_rule="at_least_one"``
    is mergekit's ``max(1, k)``. Returns a tensor like ``task_vector`` (or ``out``).
    """
    if not isinstance(task_vector, Tensor):
        raise TypeError(f"task_vector must be a tensor, got {type(task_vector).__name__}")
    xs = _check_task_inputs(None, [task_vector], "task_vector")
    _check_selection(selection)
    if k_rule not in K_RULES:
        raise ValueError(f"k_rule must be one of {K_RULES}, got {k_rule!r}")
    knobs = TiesKnobs(selection=selection, k_rule=k_rule)
    out = _check_out(out, task_vector)
    ks = [_k_for(_check_densities(density, 1)[0], task_vector.numel(), k_rule)]
    return _run_merge(None, xs, out=out, weights=[1.0], densities=None, lam=1.0, knobs=knobs, ks=ks,
                      allow_nonfinite=allow_nonfinite, name="task_vector")


def dare(
    task_vectors: Sequence[Tensor] | Tensor,
    density: float | Sequence[float],
    *,
    seed: int,
    rescale: str = "inverse",
    allow_nonfinite: bool = False,
) -> list[Tensor]:
    """DARE: drop each entry of each task vector with probability ``1 - density``, rescale the rest.

    The keep decision of entry ``i`` of task ``t`` is a hash of ``(seed, t, i)`` (a
    counter-based RNG, see ``mtmerge.reference.merge.dare_hash``), so every backend, thread
    count and tiling draws the same mask; the keep probability is ``density`` rounded to a
    multiple of ``2**-24``.

    Parameters
    ----------
    task_vectors : sequence of T Tensor, or Tensor ``[T, *S]``
    density : float or sequence of T floats, in [0, 1]
    seed : int, in [0, 2**63)
    rescale : {"inverse", "l1", "none"}
        Multiply kept entries by ``1/density`` (the DARE paper), by
        ``sum|tau| / sum|kept tau|`` (mergekit's L1 rule), or leave them (``"none"``).

    Returns
    -------
    list of T Tensor
        The sparsified task vectors, shape ``S``, the input dtype.
    """
    xs = _check_task_inputs(None, task_vectors, "task_vectors")
    densities = _check_densities(density, len(xs))
    seed = _check_seed(seed)
    result = []
    for t, x in enumerate(xs):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        _run_merge(None, [x], out=out, weights=[1.0], densities=[densities[t]], lam=1.0, knobs=None,
                   sparsify="dare", seed=seed, rescale=rescale, allow_nonfinite=allow_nonfinite, task_offset=t,
                   name=f"task_vectors[{t}]")
        result.append(out)
    return result


def dare_linear(
    task_vectors: Sequence[Tensor] | Tensor,
    density: float | Sequence[float],
    weights: Sequence[float] | float | None = None,
    *,
    seed: int,
    rescale: str = "inverse",
    normalize: bool = False,
    out: Tensor | None = None,
    allow_nonfinite: bool = False,
) -> Tensor:
    """DARE then task arithmetic: ``sum_t w_t dare(tau_t)`` (divided by ``sum_t w_t`` if
    ``normalize``, mergekit's ``dare_linear``), in one fused pass. Shapes as :func:`dare`."""
    xs = _check_task_inputs(None, task_vectors, "task_vectors")
    w = _check_weights(weights, len(xs))
    if normalize:
        total = sum(w)
        w = [v / total for v in w] if abs(total) >= 1e-8 else w
    out = _check_out(out, xs[0])
    return _run_merge(None, xs, out=out, weights=w, densities=_check_densities(density, len(xs)), lam=1.0,
                      knobs=None, sparsify="dare", seed=seed, rescale=rescale, allow_nonfinite=allow_nonfinite,
                      name="task_vectors")


def dare_ties(
    task_vectors: Sequence[Tensor] | Tensor,
    density: float | Sequence[float],
    weights: Sequence[float] | float | None = None,
    *,
    seed: int,
    rescale: str = "inverse",
    flavor: str | None = None,
    elect: str | None = None,
    elect_weighted: bool | None = None,
    zero_sign: str | None = None,
    merge: str | None = None,
    divisor: str | None = None,
    out: Tensor | None = None,
    allow_nonfinite: bool = False,
) -> Tensor:
    """DARE instead of TIES' magnitude trim, then TIES' sign election and disjoint merge.

    mergekit's ``dare_ties`` (which does not normalize by default) is ``flavor="mergekit",
    merge="sum", rescale="l1"`` up to the random mask. Knobs as :func:`ties`."""
    xs = _check_task_inputs(None, task_vectors, "task_vectors")
    knobs = resolve_knobs(flavor, elect=elect, elect_weighted=elect_weighted, zero_sign=zero_sign, merge=merge,
                          divisor=divisor)
    out = _check_out(out, xs[0])
    return _run_merge(None, xs, out=out, weights=_check_weights(weights, len(xs)),
                      densities=_check_densities(density, len(xs)), lam=1.0, knobs=knobs, sparsify="dare",
                      seed=seed, rescale=rescale, allow_nonfinite=allow_nonfinite, name="task_vectors")


def tall_masks(
    task_vectors: Sequence[Tensor] | Tensor,
    merged_task_vector: Tensor,
    lam: float | Sequence[float],
    *,
    base: Tensor | None = None,
) -> Tensor:
    """TALL masks: ``m_t = |tau_t| > lam_t * |tau_MTL - tau_t|``, bit-packed.

    Parameters
    ----------
    task_vectors : sequence of T Tensor, or Tensor ``[T, *S]``
        ``tau_t``; with ``base=`` given, the fine-tuned weights instead (``tau_t`` is formed
        on the fly as ``task_vectors[t] - base``).
    merged_task_vector : Tensor
        ``tau_MTL``, shape ``S`` (any float dtype), e.g. the task-arithmetic sum.
    lam : float or sequence of T floats
        ``lam_t`` (the TALL paper tunes it per task in [0.2, 0.6]).

    Returns
    -------
    Tensor
        uint8 ``[T, ceil(n/8)]``: bit ``i`` of byte ``j`` of row ``t`` is ``m_t`` at flat
        index ``8j + i`` (``numpy.packbits(bitorder="little")``).
    """
    xs = _check_task_inputs(base, task_vectors, "task_vectors")
    if not isinstance(merged_task_vector, Tensor):
        raise TypeError(f"merged_task_vector must be a tensor, got {type(merged_task_vector).__name__}")
    if merged_task_vector.shape != xs[0].shape:
        raise ValueError(f"merged_task_vector has shape {tuple(merged_task_vector.shape)} but the task vectors "
                         f"have {tuple(xs[0].shape)}")
    if merged_task_vector.device != xs[0].device or merged_task_vector.dtype not in FLOAT_DTYPES:
        raise ValueError("merged_task_vector must be a float tensor on the task vectors' device")
    lams = _per_task_floats(lam, len(xs), "lam")
    if not all(math.isfinite(v) for v in lams):
        raise ValueError(f"lam must be finite, got {lams}")
    return torch.ops.mtmerge.tall_masks(base, xs, merged_task_vector, lams)


def consensus_mask(masks: Tensor, k: int = 2) -> Tensor:
    """Consensus: entries where at least ``k`` of the T packed task masks are set.

    Parameters
    ----------
    masks : Tensor
        uint8 ``[T, nbytes]`` packed masks (:func:`tall_masks`).
    k : int
        Minimum number of agreeing tasks, ``>= 1`` (the paper's default is 2).

    Returns
    -------
    Tensor
        uint8 ``[nbytes]``, packed the same way.
    """
    if not isinstance(masks, Tensor) or masks.dtype != torch.uint8 or masks.dim() != 2:
        raise ValueError("masks must be a uint8 tensor [T, nbytes] of packed masks")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return torch.ops.mtmerge.consensus_mask(masks.contiguous(), k)


def consensus_merge(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float] | float | None = None,
    lam: float = 1.0,
    *,
    method: str = "ties",
    k: int = 2,
    tall_lam: float | Sequence[float] = 0.4,
    density: float | Sequence[float] = 0.2,
    flavor: str | None = None,
    out: Tensor | None = None,
    allow_nonfinite: bool = False,
    **ties_knobs,
) -> Tensor:
    """Consensus merging (TALL-masks paper): TIES or task arithmetic on the task vectors
    restricted to the entries at least ``k`` tasks' TALL masks keep.

    Steps: ``tau_MTL = sum_t w_t tau_t`` (task arithmetic); ``m_t = tall_masks(tau, tau_MTL,
    tall_lam)``; ``c = consensus_mask(m, k)``; then ``method`` ("ties" or
    "task_arithmetic") on ``tau_t * c`` and ``base + lam * merged``. Four passes over the
    inputs, no ``T x n`` temporary (one n-sized float32 ``tau_MTL``).

    Parameters are as in :func:`ties_merge` and :func:`tall_masks`; ``ties_knobs`` are the
    TIES knobs (``selection``, ``elect``, ...). Returns ``out``, shape of ``base``.
    """
    if method not in ("ties", "task_arithmetic"):
        raise ValueError(f"method must be 'ties' or 'task_arithmetic', got {method!r}")
    xs = _check_task_inputs(base, finetuned)
    w = _check_weights(weights, len(xs))
    lam = _check_lam(lam)
    out = _check_out(out, base)
    mtl = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    torch.ops.mtmerge.merge_fused(base, xs, w, [1.0] * len(xs), *_keep_everything(len(xs), base.device), 0,
                                  [_DARE_KEEP_ONE] * len(xs), None, "none", False, 1, "sum", "count", 1.0,
                                  bool(allow_nonfinite), mtl, 0, False)
    cons = consensus_mask(tall_masks(xs, mtl, tall_lam, base=base), k)
    del mtl
    if method == "task_arithmetic":
        return _run_merge(base, xs, out=out, weights=w, densities=None, lam=lam, knobs=None, sparsify="none",
                          consensus=cons, allow_nonfinite=allow_nonfinite)
    knobs = resolve_knobs(flavor, **ties_knobs)
    return _run_merge(base, xs, out=out, weights=w, densities=_check_densities(density, len(xs)), lam=lam,
                      knobs=knobs, consensus=cons, allow_nonfinite=allow_nonfinite)
