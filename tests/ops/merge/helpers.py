"""Shared helpers of the merge-family tests: inputs, op arguments, the reference composed the way
the public ops compose it, comparisons, and an independent oracle of DESIGN.md's semantics.

The op arguments (``task_trim``, ``task_scalars``, ``rule``, ``merge_scalars``) are packed here
from PLAN.md's layouts and ``mtmerge/_constants.py`` directly, not through ``MergeRecipe``, so
the tests do not trust the code they check (``test_recipe.py`` compares the two).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from mtmerge import _constants as C  # noqa: N812  (the constants, by their names)
from mtmerge import _rng
from mtmerge.ops.recipe import TiesKnobs
from mtmerge.reference import merge as ref
from tests.conftest import TOLERANCES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA = torch.cuda.is_available()
# where the Triton kernels run: compiled on a GPU, else the interpreter on CPU tensors
TRITON_DEVICE = "cuda" if CUDA else "cpu"
# devices the public API and opcheck are run on (the C++ kernels on CPU, Triton on CUDA)
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]
KNOB_VALUES = {
    "selection": ("exact", "geq"),
    "elect": ("sum", "count"),
    "elect_weighted": (False, True),
    "zero_sign": ("positive", "majority"),
    "merge": ("mean", "sum", "max"),
    "divisor": ("count", "weight"),
}
FLAVOR_NAMES = [None, "peft", "mergekit", "paper"]
SIZE_KNOBS = [  # (flavor, explicit knobs): the presets and one case that sets every knob away from them
    ("peft", {}),
    ("mergekit", {}),
    ("paper", {}),
    (None, dict(selection="geq", elect="count", elect_weighted=True, zero_sign="majority", merge="max",
                divisor="weight")),
]
INT64_MAX = C.INT64_MAX
ELECT_CODES = {"none": C.ELECT_NONE, "sum": C.ELECT_SUM, "count": C.ELECT_COUNT}
MERGE_CODES = {"mean": C.MERGE_MEAN, "sum": C.MERGE_SUM, "max": C.MERGE_MAX}
DIVISOR_CODES = {"count": C.DIVISOR_COUNT, "weight": C.DIVISOR_WEIGHT}


# ---- inputs ---------------------------------------------------------------------------------


def sample(numel, dtype=torch.float32, seed=0, kind="normal", scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(numel, generator=gen) * scale
    elif kind == "few_values":  # many exact ties, representable in every dtype
        x = torch.randint(-4, 5, (numel,), generator=gen).float() * 0.125
    else:
        raise ValueError(kind)
    return x.to(dtype)


def make_models(numel, count, dtype=torch.float32, seed=0, kind="normal", shape=None):
    """``base`` and ``count`` fine-tuned tensors (task vectors ``finetuned[t] - base``), on CPU."""
    shape = (numel,) if shape is None else shape
    base = sample(numel, dtype, seed, "normal" if kind == "normal" else "few_values").reshape(shape)
    if kind == "few_values":
        base = (base * 2).to(dtype)  # multiples of 1/4: every difference is exact in bf16/fp16
    fts = [(base.float() + sample(numel, torch.float32, seed + 1 + t, kind).reshape(shape)).to(dtype)
           for t in range(count)]
    return base, fts


def flat_task_vectors(base, fts):
    return [f.reshape(-1).float() - (0 if base is None else base.reshape(-1).float()) for f in fts]


def with_value(x, index, value):
    y = x.clone()
    y.view(-1)[index] = float(value)
    return y


def k_for(density, n, k_rule="floor"):
    """DESIGN.md: k = int(d * n); mergekit keeps at least one unless d = 0; d >= 1 keeps all."""
    if density >= 1:
        return n
    k = int(density * n)
    return max(1, k) if k_rule == "at_least_one" and n > 0 and density > 0 else k


# ---- op arguments, packed from PLAN.md's layouts ------------------------------------------------


def threshold_keys(thresholds: Tensor) -> Tensor:
    """int64: the float32 bit pattern of ``|threshold|`` (a non-negative int32), per task."""
    return thresholds.float().abs().contiguous().view(torch.int32).to(torch.int64)


def keep_all(count, device="cpu"):
    """Trim thresholds and cut-offs that keep everything: threshold 0, every tie kept."""
    return (torch.zeros(count, dtype=torch.float32, device=device),
            torch.full((count,), INT64_MAX, dtype=torch.int64, device=device))


def task_trim(thresholds, cutoffs, *, seed=0, keep=None, task_offset=0):
    """int64 [T, 4]: threshold key, tie cutoff, DARE key, DARE keep threshold (None: no DARE)."""
    count = thresholds.numel()
    if keep is None:  # no DARE: keep everything, key 0 (unused)
        keep, keys = [C.DARE_KEEP_ONE] * count, [0] * count
    else:
        keep, keys = list(keep), [_rng.dare_task_key(seed, task_offset + t) for t in range(count)]
    trim = torch.empty((count, C.TRIM_COLUMNS), dtype=torch.int64)
    trim[:, C.TRIM_THRESHOLD_KEY] = threshold_keys(thresholds.cpu())
    trim[:, C.TRIM_TIE_CUTOFF] = cutoffs.cpu().to(torch.int64)
    trim[:, C.TRIM_DARE_KEY] = torch.tensor(keys, dtype=torch.int64)
    trim[:, C.TRIM_DARE_KEEP] = torch.tensor(keep, dtype=torch.int64)
    return trim.to(thresholds.device)


def task_scalars(weights, scales=None, device="cpu"):
    """float32 [T, 2]: weights and rescales (default 1)."""
    scales = [1.0] * len(weights) if scales is None else scales
    packed = torch.empty((len(weights), C.SCALAR_COLUMNS), dtype=torch.float32)
    packed[:, C.SCALAR_WEIGHT] = torch.tensor([float(w) for w in weights], dtype=torch.float32)
    packed[:, C.SCALAR_SCALE] = torch.as_tensor(scales, dtype=torch.float32).cpu()
    return packed.to(device)


def rule(elect="sum", elect_weighted=False, merge="mean", divisor="count", *, with_base=True, check_finite=False):
    """int[6] from knob names (elect "none" is a linear merge)."""
    packed = [0] * C.RULE_LENGTH
    packed[C.RULE_ELECT] = ELECT_CODES[elect]
    packed[C.RULE_ELECT_WEIGHTED] = int(bool(elect_weighted))
    packed[C.RULE_MERGE] = MERGE_CODES[merge]
    packed[C.RULE_DIVISOR] = DIVISOR_CODES[divisor]
    packed[C.RULE_WITH_BASE] = int(bool(with_base))
    packed[C.RULE_CHECK_FINITE] = int(bool(check_finite))
    return packed


def merge_scalars(lam=1.0, zero_fill=1.0, device="cpu"):
    """float32 [2]: lam and the zero fill."""
    packed = torch.empty(C.OUT_COLUMNS, dtype=torch.float32)
    packed[C.OUT_LAM] = lam
    packed[C.OUT_ZERO_FILL] = zero_fill
    return packed.to(device)


def knob_rule(knobs: TiesKnobs | None, *, with_base=True, check_finite=False):
    if knobs is None:
        return rule("none", False, "sum", "count", with_base=with_base, check_finite=check_finite)
    return rule(knobs.elect, knobs.elect_weighted, knobs.merge, knobs.divisor, with_base=with_base,
                check_finite=check_finite)


# ---- the reference, composed the way DESIGN.md describes the pipeline --------------------------


def ref_fused(base, fts, weights, scales, thresholds, cutoffs, knobs, lam, *, seed=0, keep=None, consensus=None,
              check_finite=False, out_dtype=None, task_offset=0, index_offset=0, with_base=True):
    """``ref.merge_fused`` into a new tensor, with the "majority" zero sign from
    ``ref.elect_sign_total`` (the paper's rule: the sign of the sign total, 0 if it is 0)."""
    like = base if base is not None else fts[0]
    trim = task_trim(thresholds, cutoffs, seed=seed, keep=keep, task_offset=task_offset)
    scalars = task_scalars(weights, scales)
    packed_rule = knob_rule(knobs, with_base=with_base, check_finite=check_finite)
    zero_fill = 1.0
    if knobs is not None and knobs.zero_sign == "majority":
        total = int(ref.elect_sign_total(base, fts, scalars, trim, consensus, packed_rule, index_offset))
        zero_fill = float((total > 0) - (total < 0))
    out = torch.empty(like.shape, dtype=out_dtype or like.dtype)
    ref.merge_fused(base, fts, scalars, trim, consensus, packed_rule, merge_scalars(lam, zero_fill), out,
                    index_offset)
    return out


def ref_ties_merge(base, fts, densities, weights, lam, knobs, *, consensus=None, allow_nonfinite=False,
                   out_dtype=None):
    n = fts[0].numel()
    ks = [k_for(d, n, knobs.k_rule) for d in densities]
    thr, cut = ref.delta_threshold(base, fts, ks, knobs.selection, allow_nonfinite, consensus)
    return ref_fused(base, fts, weights, None, thr, cut, knobs, lam, consensus=consensus, out_dtype=out_dtype)


def ref_dare_scales(base, fts, densities, seed, rescale, task_offset=0):
    """(keep thresholds, rescales) of DARE: 1/d ("inverse"), the L1 ratio ("l1") or 1 ("none")."""
    keep = [_rng.dare_keep_threshold(d) for d in densities]
    if rescale == "inverse":
        return keep, [1.0 / d if d > 0 else 0.0 for d in densities]
    if rescale == "none":
        return keep, [1.0] * len(densities)
    thr, cut = keep_all(len(fts))
    sums = ref.dare_abs_sums(base, fts, task_trim(thr, cut, seed=seed, keep=keep, task_offset=task_offset))
    return keep, [b / a if b >= 1e-7 and a >= 1e-7 else 1.0 for b, a in sums.tolist()]


def ref_dare_merge(base, fts, densities, weights, lam, knobs, seed, rescale):
    keep, scales = ref_dare_scales(base, fts, densities, seed, rescale)
    thr, cut = keep_all(len(fts))
    return ref_fused(base, fts, weights, scales, thr, cut, knobs, lam, seed=seed, keep=keep)


# ---- comparisons ----------------------------------------------------------------------------


def assert_close(got, want, dtype=None):
    """Within the dtype's tolerance: only for peers, formulas and the oracle, never the reference."""
    tol = TOLERANCES[dtype or want.dtype]
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), equal_nan=True, **tol)


def assert_same(got, want):
    """Same dtype, shape and bits (NaN compared as NaN): a fixed sequence of float32 operations."""
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), (got.dtype, want.dtype, got.shape,
                                                                               want.shape)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, equal_nan=True)


def assert_same_pair(got, want):
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)


# ---- which backend runs ------------------------------------------------------------------------


def assert_cpp_backend(names: Sequence[str]) -> None:
    """The C++ kernels are what CPU tensors dispatch to (not the reference fall-back)."""
    from mtmerge import _library

    assert _library._C is not None, f"mtmerge._C failed to load: {_library.EXTENSION_ERROR}"
    missing = [name for name in names if not _library.cpu_kernel_registered(name)]
    assert not missing, f"no C++ CPU kernel registered for {missing}: the tests would compare the reference with itself"


def assert_triton_backend() -> None:
    """Triton kernels run compiled on a GPU, or under the interpreter on CPU (never silently skipped)."""
    import triton  # noqa: F401

    if CUDA:
        assert os.environ.get("TRITON_INTERPRET", "0") != "1", "a GPU is present: the Triton tests must compile"
    else:
        assert os.environ.get("TRITON_INTERPRET") == "1", "no GPU: the Triton tests need TRITON_INTERPRET=1"


def merge_op_names() -> list[str]:
    """The merge family's ops (every op defined in mtmerge/ops/_merge_ops.py)."""
    from mtmerge.ops import _merge_ops

    return [spec.name for spec in _merge_ops.MERGE_OPS]


# ---- an independent oracle of DESIGN.md's semantics (float32, tasks summed in order) -----------


def oracle_ties(taus, ks, weights, knobs):
    """TIES on flat float32 task vectors from DESIGN.md's text, without the reference."""
    n = taus[0].numel()
    kept = []
    for tau, k in zip(taus, ks, strict=True):
        a = tau.abs()
        if knobs.selection == "exact":  # the k largest, ties by lowest flat index
            order = torch.sort(a, descending=True, stable=True).indices
            mask = torch.zeros(n, dtype=torch.bool)
            mask[order[:k]] = True
        elif k >= n:
            mask = torch.ones(n, dtype=torch.bool)
        else:  # geq: |tau| >= the (n - k)-th smallest (1-based)
            mask = a >= torch.sort(a).values[n - k - 1]
        kept.append(torch.where(mask, tau, torch.zeros_like(tau)))
    elected = []
    for t, v in enumerate(kept):
        e = v * weights[t] if knobs.elect_weighted else v
        elected.append(torch.sign(e) if knobs.elect == "count" else e)
    total = elected[0].clone()
    for e in elected[1:]:
        total = total + e
    if knobs.zero_sign == "positive":
        fill = 1.0
    else:
        fill = float(torch.sign(torch.sign(total).sum()))  # 0 if the signs cancel
    gamma = torch.where(total == 0, torch.full_like(total, fill), torch.sign(total))
    num = torch.zeros(n)
    den = torch.zeros(n)
    best = torch.zeros(n)
    best_mag = torch.full((n,), -1.0)
    for t, v in enumerate(kept):
        # gamma = 0 (cancelling signs): the paper's where(gamma > 0, e > 0, e < 0) keeps negatives
        agree = (v != 0) & (torch.sign(elected[t]) == torch.where(gamma == 0, -1.0, gamma))
        wv = v * weights[t]
        num = num + torch.where(agree, wv, torch.zeros(n))
        den = den + torch.where(agree, torch.full((n,), 1.0 if knobs.divisor == "count" else weights[t]),
                                torch.zeros(n))
        better = agree & (wv.abs() > best_mag)
        best = torch.where(better, wv, best)
        best_mag = torch.where(better, wv.abs(), best_mag)
    if knobs.merge == "sum":
        return num
    if knobs.merge == "max":
        return torch.where(gamma != 0, best, torch.zeros(n))  # the paper: |max| * gamma
    # mergekit: a zero divisor becomes 1 (num is 0 there unless agreeing weights cancel)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones(n)), num)
