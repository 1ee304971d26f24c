"""Typed public API of the merge family: validation once, then the ops through a recipe.

Walk: ``mtmerge.ties_merge`` -> here -> :class:`mtmerge.ops.recipe.MergeRecipe` (the pass
sequence) -> specs in ``mtmerge/ops/_merge_ops.py`` -> ``csrc/merge/`` (CPU), ``kernels/merge/``
(GPU), ``mtmerge/reference/merge.py`` (truth) -> ``tests/ops/merge/`` -> ``benchmarks/bench_merge.py``.

Every function validates its arguments here, naming them, before any kernel runs; a function
that raises leaves ``out`` (which may alias an input) untouched: the checks that need the data
(NaN/Inf) run in a pass that writes nothing. Task vectors ``finetuned[t] - base`` are never
materialized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtmerge._constants import INT64_MAX
from mtmerge.ops import _validation as check
from mtmerge.ops._validation import FLOAT_DTYPES, as_tensor_list
from mtmerge.ops.merge_select import MagnitudeThreshold, magnitude_threshold, topk_mask
from mtmerge.ops.recipe import (
    FLAVORS,
    K_RULES,
    SELECTIONS,
    MergeRecipe,
    TiesKnobs,
    k_for,
    normalized,
    resolve_knobs,
)

__all__ = [
    "FLAVORS",
    "MagnitudeThreshold",
    "TiesKnobs",
    "as_tensor_list",
    "consensus_mask",
    "consensus_merge",
    "dare",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "magnitude_threshold",
    "resolve_knobs",
    "tall_masks",
    "task_arithmetic",
    "ties",
    "ties_merge",
    "topk_mask",
]

SCOPES = ("tensor", "global")


# ---- merging ------------------------------------------------------------------------------------


def _given_trim(thresholds, base: Tensor | None, xs: list[Tensor], consensus) -> tuple[Tensor, Tensor]:
    """``thresholds=``: T floats (keep ``|tau| >= t``), or T ``(threshold, ties_kept)`` pairs
    such as :class:`MagnitudeThreshold` (keep ``> t`` plus the first ``ties_kept`` ties)."""
    count, device = len(xs), xs[0].device
    if isinstance(thresholds, MagnitudeThreshold):  # one pair of [T] (or 0-d, T = 1) tensors
        thresholds = list(zip(thresholds.threshold.reshape(-1), thresholds.ties_kept.reshape(-1), strict=True))
    if isinstance(thresholds, Tensor):
        values, pairs = thresholds.detach().reshape(-1), None
    elif isinstance(thresholds, Sequence) and thresholds and isinstance(thresholds[0], tuple):
        values = torch.stack([torch.as_tensor(p[0]).reshape(()).float().to(device) for p in thresholds])
        pairs = torch.stack([torch.as_tensor(p[1]).reshape(()).to(torch.int64).to(device) for p in thresholds])
    elif isinstance(thresholds, Sequence) and not isinstance(thresholds, str | bytes):
        values = torch.tensor(check.per_task_floats(list(thresholds), count, "thresholds"), dtype=torch.float32)
        pairs = None
    else:
        raise TypeError(f"thresholds must be a tensor or a sequence, got {type(thresholds).__name__}")
    if values.numel() != count:
        raise ValueError(f"thresholds must have one entry per task ({count}), got {values.numel()}")
    values = values.float().abs().to(device)
    if bool(torch.isnan(values).any()):
        raise ValueError("thresholds must not be NaN")
    if pairs is None:
        return values, torch.full((count,), INT64_MAX, dtype=torch.int64, device=device)
    cutoffs = torch.ops.mtmerge.tie_cutoffs(base=base, finetuned=xs, thresholds=values, ties_kept=pairs,
                                            consensus=consensus)
    return values, cutoffs


def _wants_autograd(*values) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(v, Tensor) and v.requires_grad for v in values)


def task_arithmetic(
    base: Tensor,
    finetuned: Sequence[Tensor],
    weights: Sequence[float] | float | Tensor | None = None,
    lam: float | Tensor = 1.0,
    out: Tensor | None = None,
    *,
    allow_nonfinite: bool = False,
) -> Tensor:
    """Task arithmetic: ``base + lam * sum_t w_t (finetuned[t] - base)``, in one fused pass.

    Parameters
    ----------
    base : Tensor
        The pre-trained weights, any shape ``S``, float32/bfloat16/float16 (float64 on the
        differentiable path).
    finetuned : sequence of T Tensor
        Fine-tuned weights, each of shape ``S`` and ``base``'s dtype and device.
    weights : float, sequence of T floats or Tensor ``[T]``, optional
        ``w_t`` (default 1).
    lam : float or 0-d Tensor
        Scaling of the summed task vectors.
    out : Tensor, optional
        Contiguous output of shape ``S`` (any float dtype); default: a new tensor like ``base``.
    allow_nonfinite : bool
        Let NaN/Inf inputs through (else ValueError, raised before ``out`` is written).

    Returns
    -------
    Tensor
        ``out``, shape ``S``. Computed in float32.

    Notes
    -----
    Differentiable (AdaMerging learns ``weights`` and ``lam``): when ``weights`` or ``lam`` is a
    tensor, an input requires grad, or the inputs are float64, this runs the op
    ``torch.ops.mtmerge.task_arithmetic``, which has an autograd formula for ``base``,
    ``finetuned``, ``weights`` and ``lam`` and returns a new tensor (``out=`` is then refused).
    Its float32/bf16/fp16 results are bit-identical to the fused ``out=`` path.
    """
    xs = check.task_inputs(base, finetuned, dtypes=(*FLOAT_DTYPES, torch.float64))
    differentiable = (_wants_autograd(base, *xs, weights, lam) or base.dtype == torch.float64
                      or isinstance(weights, Tensor) or isinstance(lam, Tensor))
    if differentiable:
        return _task_arithmetic_autograd(base, xs, weights, lam, out, allow_nonfinite)
    recipe = MergeRecipe(weights=tuple(check.weights(weights, len(xs))), lam=check.finite_float(lam, "lam"),
                         sparsify="none", allow_nonfinite=bool(allow_nonfinite))
    return recipe.merge(base, xs, check.out_buffer(out, base))


def _task_arithmetic_autograd(base, xs, weights, lam, out, allow_nonfinite) -> Tensor:
    """The differentiable op ``torch.ops.mtmerge.task_arithmetic`` (weights and lam as tensors)."""
    if out is not None:
        raise ValueError("out= cannot be used with tensor weights or lam, float64 inputs or inputs that require "
                         "grad: the differentiable path returns a new tensor")
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    if isinstance(weights, Tensor):
        if weights.dim() > 1 or weights.numel() not in (1, len(xs)) or not weights.is_floating_point():
            raise ValueError(f"weights must be a float tensor with one entry per task ({len(xs)}), got shape "
                             f"{tuple(weights.shape)} and dtype {weights.dtype}")
        weights_t = weights.reshape(-1).to(base.device).expand(len(xs))
    else:
        weights_t = torch.tensor(check.weights(weights, len(xs)), dtype=compute, device=base.device)
    if isinstance(lam, Tensor):
        if lam.numel() != 1 or not lam.is_floating_point():
            raise ValueError(f"lam must be one float, got a tensor of shape {tuple(lam.shape)} and dtype {lam.dtype}")
        lam_t = lam.reshape(()).to(base.device)
    else:
        lam_t = torch.tensor(check.finite_float(lam, "lam"), dtype=compute, device=base.device)
    if not allow_nonfinite:
        check.raise_if_nonfinite([("base", base)] + [(f"finetuned[{t}]", f) for t, f in enumerate(xs)])
    return torch.ops.mtmerge.task_arithmetic(base=base, finetuned=xs, weights=weights_t.contiguous(), lam=lam_t)


def _check_scope(scope: str, thresholds) -> None:
    check.choice(scope, SCOPES, "scope")
    if scope == "global" and thresholds is None:
        raise ValueError("scope='global' trims each task over the whole model, which one tensor cannot see: pass "
                         "thresholds= computed over the model (e.g. magnitude_threshold over all its task-vector "
                         "tensors), or merge checkpoints with mtmerge.merge_checkpoints and `scope: global`")


def _run(recipe: MergeRecipe, base, xs, out, *, thresholds=None, consensus=None, **kwargs) -> Tensor:
    """Validate the consensus and any given thresholds, then every pass of ``recipe`` into ``out``."""
    consensus = check.consensus_bits(consensus, xs[0].numel(), xs[0].device)
    trim = None
    if thresholds is not None and recipe.sparsify == "magnitude":
        trim = _given_trim(thresholds, base, xs, consensus)
    return recipe.merge(base, xs, out, trim=trim, consensus=consensus, **kwargs)


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
        Trim scope. ``"tensor"`` ranks the entries of this tensor. ``"global"`` ranks each task
        over the whole model, which one tensor cannot see: it needs ``thresholds=`` computed
        over the model (the checkpoint pipeline's ``scope: global`` does that) and raises
        ValueError without them.
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
    xs = check.task_inputs(base, finetuned)
    _check_scope(scope, thresholds)
    knobs = resolve_knobs(flavor, selection=selection, elect=elect, elect_weighted=elect_weighted,
                       zero_sign=zero_sign, merge=merge, divisor=divisor)
    check.choice(sparsify, ("magnitude", "dare", "none"), "sparsify")
    recipe = MergeRecipe(weights=tuple(check.weights(weights, len(xs))), lam=check.finite_float(lam, "lam"),
                         knobs=knobs, sparsify=sparsify, densities=tuple(check.densities(density, len(xs))),
                         rescale=check.choice(rescale, ("inverse", "l1", "none"), "rescale"),
                         seed=check.seed(seed) if sparsify == "dare" else 0, allow_nonfinite=bool(allow_nonfinite))
    return _run(recipe, base, xs, check.out_buffer(out, base), thresholds=thresholds, consensus=consensus)


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
    xs = check.task_inputs(None, task_vectors, "task_vectors")
    _check_scope(scope, None)
    knobs = resolve_knobs(flavor, selection=selection, elect=elect, elect_weighted=elect_weighted,
                       zero_sign=zero_sign, merge=merge, divisor=divisor)
    recipe = MergeRecipe(weights=tuple(check.weights(weights, len(xs))), knobs=knobs,
                         densities=tuple(check.densities(density, len(xs))), allow_nonfinite=bool(allow_nonfinite))
    return _run(recipe, None, xs, check.out_buffer(out, xs[0]), names=("base", "task_vectors"))


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
    xs = check.task_inputs(None, [task_vector], "task_vector")
    selection = check.choice(selection, SELECTIONS, "selection")
    k_rule = check.choice(k_rule, K_RULES, "k_rule")
    d = check.densities(density, 1)
    recipe = MergeRecipe(weights=(1.0,), densities=tuple(d), allow_nonfinite=bool(allow_nonfinite))
    return _run(recipe, None, xs, check.out_buffer(out, task_vector), ks=[k_for(d[0], task_vector.numel(), k_rule)],
                selection=selection, names=("base", ["task_vector"]))


def _dare_recipe(xs, density, weights, seed, rescale, allow_nonfinite, knobs=None, task_offset=0) -> MergeRecipe:
    return MergeRecipe(weights=tuple(weights), knobs=knobs, sparsify="dare",
                       densities=tuple(check.densities(density, len(xs))),
                       rescale=check.choice(rescale, ("inverse", "l1", "none"), "rescale"), seed=check.seed(seed),
                       task_offset=task_offset, allow_nonfinite=bool(allow_nonfinite))


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
    xs = check.task_inputs(None, task_vectors, "task_vectors")
    densities = check.densities(density, len(xs))
    recipes = [_dare_recipe([x], densities[t], [1.0], seed, rescale, allow_nonfinite, task_offset=t)
               for t, x in enumerate(xs)]
    return [r.merge(None, [x], torch.empty_like(x, memory_format=torch.contiguous_format),
                    names=("base", [f"task_vectors[{t}]"]))
            for t, (r, x) in enumerate(zip(recipes, xs, strict=True))]


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
    xs = check.task_inputs(None, task_vectors, "task_vectors")
    w = check.weights(weights, len(xs))
    if normalize:
        w = normalized(w)
    recipe = _dare_recipe(xs, density, w, seed, rescale, allow_nonfinite)
    return recipe.merge(None, xs, check.out_buffer(out, xs[0]), names=("base", "task_vectors"))


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
    xs = check.task_inputs(None, task_vectors, "task_vectors")
    knobs = resolve_knobs(flavor, elect=elect, elect_weighted=elect_weighted, zero_sign=zero_sign, merge=merge,
                       divisor=divisor)
    recipe = _dare_recipe(xs, density, check.weights(weights, len(xs)), seed, rescale, allow_nonfinite, knobs)
    return recipe.merge(None, xs, check.out_buffer(out, xs[0]), names=("base", "task_vectors"))


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
    xs = check.task_inputs(base, task_vectors, "task_vectors")
    if not isinstance(merged_task_vector, Tensor):
        raise TypeError(f"merged_task_vector must be a tensor, got {type(merged_task_vector).__name__}")
    if merged_task_vector.dtype not in FLOAT_DTYPES:
        raise TypeError(f"merged_task_vector must be float32, bfloat16 or float16, got {merged_task_vector.dtype}")
    if merged_task_vector.shape != xs[0].shape:
        raise ValueError(f"merged_task_vector has shape {tuple(merged_task_vector.shape)} but the task vectors "
                         f"have {tuple(xs[0].shape)}")
    if merged_task_vector.device != xs[0].device:
        raise ValueError(f"merged_task_vector is on {merged_task_vector.device} but the task vectors are on "
                         f"{xs[0].device}")
    lams = check.weights(lam, len(xs), "lam")
    return torch.ops.mtmerge.tall_masks(base=base, finetuned=xs, merged=merged_task_vector, lams=lams)


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
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a tensor, got {type(masks).__name__}")
    if masks.dtype != torch.uint8:
        raise TypeError(f"masks must be uint8 packed masks [T, nbytes], got {masks.dtype}")
    if masks.dim() != 2:
        raise ValueError(f"masks must be uint8 packed masks [T, nbytes], got shape {tuple(masks.shape)}")
    k = check.int_in_range(k, 1, 2**62, "k")
    return torch.ops.mtmerge.consensus_mask(masks=masks.contiguous(), k=k)


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
    check.choice(method, ("ties", "task_arithmetic"), "method")
    xs = check.task_inputs(base, finetuned)
    w = tuple(check.weights(weights, len(xs)))
    lam = check.finite_float(lam, "lam")
    k = check.int_in_range(k, 1, 2**62, "k")
    out = check.out_buffer(out, base)
    knobs = resolve_knobs(flavor, **ties_knobs) if method == "ties" else None
    densities = tuple(check.densities(density, len(xs))) if method == "ties" else None
    # tau_MTL = sum_t w_t tau_t in float32, without the base (the merge pass checks NaN/Inf first)
    mtl = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    MergeRecipe(weights=w, sparsify="none", allow_nonfinite=bool(allow_nonfinite)).merge(base, xs, mtl,
                                                                                         with_base=False)
    cons = consensus_mask(tall_masks(xs, mtl, tall_lam, base=base), k)
    del mtl
    recipe = MergeRecipe(weights=w, lam=lam, knobs=knobs, sparsify="magnitude" if knobs else "none",
                         densities=densities, allow_nonfinite=bool(allow_nonfinite))
    return _run(recipe, base, xs, out, consensus=cons)
