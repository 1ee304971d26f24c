"""One merge recipe: turns knobs, densities, weights and a seed into the merge ops' arguments.

Both the public merge functions (``mtmerge/ops/merge.py``) and the checkpoint pipeline
(``mtmerge/merging/engine.py``) describe a merge by a :class:`MergeRecipe` and let it build the
per-task tensors of ``merge_fused`` / ``elect_sign_total`` / ``dare_abs_sums`` (layouts in
``mtmerge/_constants.py``), so the pass sequence lives here once:

1. the trim: per-task ``(threshold, tie cutoff)`` from ``delta_threshold`` (or given, or "keep
   everything"), packed with DARE's per-task key and keep threshold into ``task_trim``;
2. DARE's rescale: ``1/d``, or the L1 ratio from ``dare_abs_sums`` (a device tensor);
3. the "majority" zero sign: the sign of ``elect_sign_total``, kept on the device;
4. one ``merge_fused`` pass.

Nothing here reads a tensor back to the host, so on CUDA the sequence runs without a sync
(except ``merge_fused``'s own NaN/Inf error check, see ``rule(check_finite=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from mtmerge._constants import (
    DARE_KEEP_ONE,
    DIVISOR_COUNT,
    DIVISOR_WEIGHT,
    ELECT_COUNT,
    ELECT_NONE,
    ELECT_SUM,
    INT64_MAX,
    MERGE_MAX,
    MERGE_MEAN,
    MERGE_SUM,
    RULE_LENGTH,
)
from mtmerge._rng import dare_keep_threshold, dare_task_key
from mtmerge.ops._validation import raise_if_nonfinite

SELECTIONS = ("exact", "geq")
ELECTS = ("sum", "count")
ZERO_SIGNS = ("positive", "majority")
MERGE_RULES = ("mean", "sum", "max")
DIVISORS = ("count", "weight")
K_RULES = ("floor", "at_least_one")
SPARSIFIERS = ("magnitude", "dare", "none")
RESCALES = ("inverse", "l1", "none")

_ELECT_CODES = {"sum": ELECT_SUM, "count": ELECT_COUNT}
_MERGE_CODES = {"mean": MERGE_MEAN, "sum": MERGE_SUM, "max": MERGE_MAX}
_DIVISOR_CODES = {"count": DIVISOR_COUNT, "weight": DIVISOR_WEIGHT}


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

_KNOB_VALUES = {"selection": SELECTIONS, "elect": ELECTS, "zero_sign": ZERO_SIGNS, "merge": MERGE_RULES,
                "divisor": DIVISORS, "k_rule": K_RULES, "elect_weighted": (True, False)}


def resolve_knobs(flavor: str | None = None, **overrides) -> TiesKnobs:
    """The knobs of ``flavor`` (default: ``"peft"``'s), with explicit (non-None) overrides.

    Raises ValueError naming the knob for an unknown flavor or value, TypeError for an
    unknown knob.
    """
    if flavor is not None and flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {tuple(FLAVORS)} or None, got {flavor!r}")
    knobs = FLAVORS[flavor or "peft"]._asdict()
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in _KNOB_VALUES:
            raise TypeError(f"unknown TIES knob {name!r}")
        if value not in _KNOB_VALUES[name] or (name == "elect_weighted" and not isinstance(value, bool)):
            raise ValueError(f"{name} must be one of {_KNOB_VALUES[name]}, got {value!r}")
        knobs[name] = value
    return TiesKnobs(**knobs)


def k_for(density: float, n: int, k_rule: str = "floor") -> int:
    """Entries a trim of ``density`` keeps out of ``n``: ``int(d * n)`` (peft, the paper);
    mergekit's ``"at_least_one"`` keeps at least 1 when ``d > 0``; ``d >= 1`` keeps all."""
    if density >= 1.0:
        return n
    k = int(density * n)
    if k_rule == "at_least_one" and n > 0 and density > 0:  # mergekit: density 0 keeps nothing
        k = max(1, k)
    return min(k, n)


def _input_labels(names: tuple[str, str | list[str]], count: int) -> list[str]:
    """The caller's labels of base and of each finetuned tensor."""
    labels = names[1] if isinstance(names[1], list) else [f"{names[1]}[{t}]" for t in range(count)]
    return [names[0], *labels]


def _raise_if_nonfinite(base: Tensor | None, finetuned: list[Tensor], names, cause) -> None:
    """On the error path of a pass that refused NaN/Inf: find the first input holding them and
    raise ValueError with the caller's name for it (the ops only know their own argument names)."""
    labels = _input_labels(names, len(finetuned))
    raise_if_nonfinite(list(zip(labels, [base, *finetuned], strict=True)), cause=cause)
    if base is not None:  # finite inputs whose difference overflows to Inf
        for t, f in enumerate(finetuned):
            if not bool(torch.isfinite(f.float() - base.float()).all()):
                raise ValueError(f"{labels[t + 1]} - {labels[0]} overflows to Inf in float32; pass "
                                 "allow_nonfinite=True to merge anyway") from cause


def normalized(weights: Sequence[float]) -> list[float]:
    """``weights`` divided by their sum (mergekit's ``normalize``), unchanged when the sum is
    below 1e-8 in magnitude."""
    total = sum(weights)
    return [w / total for w in weights] if abs(total) >= 1e-8 else list(weights)


def threshold_keys(thresholds: Tensor) -> Tensor:
    """int64 magnitude keys (float32 bit patterns of ``|t|``) of float thresholds, on their device."""
    return thresholds.detach().float().abs().contiguous().view(torch.int32).to(torch.int64)


@dataclass(frozen=True)
class MergeRecipe:
    """A merge, described once: what each pass needs, as op arguments.

    Attributes
    ----------
    weights : tuple of float
        ``w_t`` (normalized by the caller if wanted).
    lam : float
        Output ``base + lam * merged``.
    knobs : TiesKnobs or None
        The TIES election and merge; None for a linear merge ``sum_t w_t tau_hat_t``.
    sparsify : {"magnitude", "dare", "none"}
        The trim: top-k magnitude, DARE's random drop, or none.
    densities : tuple of float, optional
        Per task, in [0, 1] (the trim's fraction kept; DARE's keep probability).
    rescale : {"inverse", "l1", "none"}
        DARE's rescale of the kept entries.
    seed, task_offset : int
        DARE's seed and the stream number of task 0 (task ``t`` draws stream ``task_offset + t``).
    allow_nonfinite : bool
        Let NaN/Inf inputs through the merge pass instead of raising.
    """

    weights: tuple[float, ...]
    lam: float = 1.0
    knobs: TiesKnobs | None = None
    sparsify: str = "magnitude"
    densities: tuple[float, ...] | None = None
    rescale: str = "inverse"
    seed: int = 0
    task_offset: int = 0
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        if self.sparsify not in SPARSIFIERS:
            raise ValueError(f"sparsify must be one of {SPARSIFIERS}, got {self.sparsify!r}")
        if self.rescale not in RESCALES:
            raise ValueError(f"rescale must be one of {RESCALES}, got {self.rescale!r}")
        if self.sparsify != "none" and (self.densities is None or len(self.densities) != len(self.weights)):
            raise ValueError(f"density must have one entry per task ({len(self.weights)}) with sparsify="
                             f"{self.sparsify!r}")

    @property
    def num_tasks(self) -> int:
        return len(self.weights)

    @property
    def linear(self) -> bool:
        """No election: the merged task vector is ``sum_t w_t tau_hat_t``."""
        return self.knobs is None

    @property
    def needs_sign_total(self) -> bool:
        """The "majority" zero sign needs the ``elect_sign_total`` pre-pass."""
        return self.knobs is not None and self.knobs.zero_sign == "majority"

    def selection(self) -> str:
        return self.knobs.selection if self.knobs is not None else "exact"

    def ks(self, n: int) -> list[int]:
        """Per-task trim sizes for a scope of ``n`` entries."""
        k_rule = self.knobs.k_rule if self.knobs is not None else "floor"
        return [k_for(d, n, k_rule) for d in self.densities]

    def keep_all(self, device) -> tuple[Tensor, Tensor]:
        """A trim that keeps every entry: threshold 0 with every tie kept."""
        return (torch.zeros(self.num_tasks, dtype=torch.float32, device=device),
                torch.full((self.num_tasks,), INT64_MAX, dtype=torch.int64, device=device))

    def _dare_columns(self) -> tuple[list[int], list[int]]:
        if self.sparsify != "dare":
            return [0] * self.num_tasks, [DARE_KEEP_ONE] * self.num_tasks
        keys = [dare_task_key(self.seed, self.task_offset + t) for t in range(self.num_tasks)]
        return keys, [dare_keep_threshold(d) for d in self.densities]

    def task_trim(self, thresholds: Tensor, tie_cutoffs: Tensor) -> Tensor:
        """int64 ``[T, 4]`` on the thresholds' device: threshold key, tie cutoff, DARE key, DARE keep."""
        keys, keep = self._dare_columns()
        dare = torch.tensor([keys, keep], dtype=torch.int64).t().to(thresholds.device)
        return torch.cat([threshold_keys(thresholds).reshape(-1, 1), tie_cutoffs.reshape(-1, 1).to(torch.int64),
                          dare], dim=1).contiguous()

    def static_scales(self) -> list[float]:
        """The rescale known without a pass: ``1/d`` for DARE's "inverse", else 1."""
        if self.sparsify == "dare" and self.rescale == "inverse":
            return [1.0 / d if d > 0 else 0.0 for d in self.densities]
        return [1.0] * self.num_tasks

    @property
    def needs_abs_sums(self) -> bool:
        """DARE's "l1" rescale needs the ``dare_abs_sums`` pre-pass."""
        return self.sparsify == "dare" and self.rescale == "l1"

    @staticmethod
    def l1_scales(abs_sums: Tensor) -> Tensor:
        """float32 ``[T]``: mergekit's L1 rescale ``before / after`` from ``dare_abs_sums``
        (summed over chunks), 1 where either is below 1e-7; on ``abs_sums``' device."""
        before, after = abs_sums[:, 0], abs_sums[:, 1]
        ok = (before >= 1e-7) & (after >= 1e-7)
        ratio = before / torch.where(ok, after, torch.ones_like(after))
        return torch.where(ok, ratio, torch.ones_like(ratio)).float()

    def task_scalars(self, device, scales: Tensor | None = None) -> Tensor:
        """float32 ``[T, 2]``: weights and rescales (``scales`` or :meth:`static_scales`)."""
        weights = torch.tensor(self.weights, dtype=torch.float32)
        if scales is None:
            scales = torch.tensor(self.static_scales(), dtype=torch.float32)
        return torch.stack([weights.to(device), scales.to(device=device, dtype=torch.float32)], dim=1).contiguous()

    def rule(self, *, with_base: bool = True, check_finite: bool) -> list[int]:
        """The ``rule`` list: election, weighting, merge, divisor, base, NaN/Inf check."""
        rule = [0] * RULE_LENGTH
        if self.knobs is None:
            rule[:4] = [ELECT_NONE, 0, MERGE_SUM, DIVISOR_COUNT]
        else:
            k = self.knobs
            rule[:4] = [_ELECT_CODES[k.elect], int(k.elect_weighted), _MERGE_CODES[k.merge], _DIVISOR_CODES[k.divisor]]
        rule[4:] = [int(with_base), int(check_finite and not self.allow_nonfinite)]
        return rule

    def merge_scalars(self, device, sign_total: Tensor | None = None) -> Tensor:
        """float32 ``[2]``: lam, and the zero fill (the sign of ``sign_total`` — the TIES paper's
        ``resolve_zero_signs``, 0 when that is 0 too — else +1)."""
        lam = torch.tensor([self.lam], dtype=torch.float32, device=device)
        if sign_total is None:
            fill = torch.ones(1, dtype=torch.float32, device=device)
        else:
            fill = torch.sign(sign_total.to(device=device, dtype=torch.float32)).reshape(1)
        return torch.cat([lam, fill])

    def select(self, base: Tensor | None, finetuned: list[Tensor], consensus: Tensor | None = None, *,
               ks: list[int] | None = None, selection: str | None = None) -> tuple[Tensor, Tensor]:
        """The magnitude trim of one piece: ``delta_threshold``'s per-task ``(thresholds,
        tie_cutoffs)`` for ``ks`` (default :meth:`ks` of the piece's size) and ``selection``
        (default :meth:`selection`). Raises ValueError for NaN (and Inf unless
        ``allow_nonfinite``) in a task vector."""
        return torch.ops.mtmerge.delta_threshold(base=base, finetuned=finetuned,
                                                 ks=ks or self.ks(finetuned[0].numel()),
                                                 selection=selection or self.selection(),
                                                 allow_nonfinite=self.allow_nonfinite, consensus=consensus)

    def merge(
        self,
        base: Tensor | None,
        finetuned: list[Tensor],
        out: Tensor,
        *,
        trim: tuple[Tensor, Tensor] | None = None,
        consensus: Tensor | None = None,
        with_base: bool = True,
        ks: list[int] | None = None,
        selection: str | None = None,
        names: tuple[str, str | list[str]] = ("base", "finetuned"),
    ) -> Tensor:
        """Every pass of this recipe over one tensor, into ``out``.

        ``trim``: per-task ``(thresholds, tie_cutoffs)`` computed elsewhere; by default the
        magnitude trim runs ``delta_threshold`` here (which also rejects NaN/Inf task vectors
        unless ``allow_nonfinite``) with ``ks`` (default :meth:`ks`) and ``selection`` (default
        :meth:`selection`); other sparsifiers keep everything. ``names``: the caller's names of
        ``base`` and ``finetuned`` (a name, or a list of one label per tensor), for the NaN/Inf error.
        """
        try:
            return self._passes(base, finetuned, out, trim, consensus, with_base, ks, selection)
        except ValueError as exc:  # a NaN/Inf check in a pass: name the caller's input
            _raise_if_nonfinite(base, finetuned, names, cause=exc)
            raise

    def _passes(self, base, finetuned, out, trim, consensus, with_base, ks, selection) -> Tensor:
        device = finetuned[0].device
        ops = torch.ops.mtmerge
        checked = False  # did a pass before the merge check every input entry for NaN/Inf?
        if trim is None and self.sparsify == "magnitude":
            trim = self.select(base, finetuned, consensus, ks=ks, selection=selection)
            checked = consensus is None  # entries outside the consensus are not looked at
        elif trim is None:
            trim = self.keep_all(device)
        task_trim = self.task_trim(*trim)
        scales = None
        if self.needs_abs_sums:
            scales = self.l1_scales(ops.dare_abs_sums(base=base, finetuned=finetuned, task_trim=task_trim))
        task_scalars = self.task_scalars(device, scales)
        rule = self.rule(with_base=with_base, check_finite=not checked)
        sign_total = None
        if self.needs_sign_total:
            sign_total = ops.elect_sign_total(base=base, finetuned=finetuned, task_scalars=task_scalars,
                                              task_trim=task_trim, consensus=consensus, rule=rule)
        ops.merge_fused(base=base, finetuned=finetuned, task_scalars=task_scalars, task_trim=task_trim,
                        consensus=consensus, rule=rule, merge_scalars=self.merge_scalars(device, sign_total), out=out)
        return out
