"""The merge family (task arithmetic, TIES, DARE, TALL masks, Consensus): the public API and the
CPU ops against the reference, and the reference against its peers and first principles.

Ground truth, never the code under test:

* peft's ``merge_utils`` (loaded from the installed file; importing ``peft`` needs transformers),
* mergekit's ``ties`` (the installed package when its import chain is there, else a faithful
  local copy of its math, checked against the package whenever both are available),
* the TIES paper's released code (a local copy of its rules),
* hand-computed cases with the expected numbers written out,
* a small float32 oracle of DESIGN.md's "Merge semantics" written independently of the reference,
* the functions of ``mtmerge.reference.merge`` called directly: the public functions and
  ``torch.ops.mtmerge.*`` on CPU tensors (the C++ kernels when registered) must agree with them.
"""

from __future__ import annotations

import importlib.util
import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mtmerge
from mtmerge.ops.merge import FLAVORS, TiesKnobs, resolve_knobs
from mtmerge.reference import merge as ref
from tests.conftest import TOLERANCES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KNOB_VALUES = {
    "selection": ("exact", "geq"),
    "elect": ("sum", "count"),
    "elect_weighted": (False, True),
    "zero_sign": ("positive", "majority"),
    "merge": ("mean", "sum", "max"),
    "divisor": ("count", "weight"),
}
FLAVOR_NAMES = [None, "peft", "mergekit", "paper"]
INT64_MAX = 2**63 - 1


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
    """``base`` and ``count`` fine-tuned tensors (task vectors ``finetuned[t] - base``)."""
    shape = (numel,) if shape is None else shape
    base = sample(numel, dtype, seed, "normal" if kind == "normal" else "few_values").reshape(shape)
    if kind == "few_values":
        base = (base * 2).to(dtype)  # multiples of 1/4: every difference is exact in bf16/fp16
    fts = [(base.float() + sample(numel, torch.float32, seed + 1 + t, kind).reshape(shape)).to(dtype)
           for t in range(count)]
    return base, fts


def flat_task_vectors(base, fts):
    return [f.reshape(-1).float() - (0 if base is None else base.reshape(-1).float()) for f in fts]


# ---- the reference, composed the way DESIGN.md describes the pipeline --------------------------


def k_for(density, n, k_rule="floor"):
    """DESIGN.md: k = int(d * n); mergekit keeps at least one unless d = 0; d >= 1 keeps all."""
    if density >= 1:
        return n
    k = int(density * n)
    return max(1, k) if k_rule == "at_least_one" and n > 0 and density > 0 else k


def ref_fused(base, fts, weights, scales, thr, cut, seed, dare_keep, knobs, lam, *, consensus=None,
              allow_nonfinite=False, out_dtype=None, task_offset=0):
    """``ref.merge_fused`` into a new tensor, with the "majority" zero sign from
    ``ref.elect_sign_total`` (the paper's rule: the sign of the sign total, 0 if it is 0)."""
    like = base if base is not None else fts[0]
    if knobs is None:
        elect, elect_weighted, zero_fill, merge, divisor = "none", False, 1, "sum", "count"
    else:
        elect, elect_weighted, merge, divisor = knobs.elect, knobs.elect_weighted, knobs.merge, knobs.divisor
        zero_fill = 1
        if knobs.zero_sign == "majority":
            total = int(ref.elect_sign_total(base, fts, weights, scales, thr, cut, seed, dare_keep, elect,
                                             elect_weighted, consensus))
            zero_fill = (total > 0) - (total < 0)
    out = torch.empty(like.shape, dtype=out_dtype or like.dtype)
    ref.merge_fused(base, fts, weights, scales, thr, cut, seed, dare_keep, consensus, elect, elect_weighted,
                    zero_fill, merge, divisor, lam, allow_nonfinite, out, task_offset)
    return out


def ref_ties_merge(base, fts, densities, weights, lam, knobs, *, consensus=None, allow_nonfinite=False,
                   out_dtype=None):
    count, n = len(fts), fts[0].numel()
    ks = [k_for(d, n, knobs.k_rule) for d in densities]
    thr, cut = ref.delta_threshold(base, fts, ks, knobs.selection, allow_nonfinite, consensus)
    return ref_fused(base, fts, weights, [1.0] * count, thr, cut, 0, [ref.DARE_KEEP_ONE] * count, knobs, lam,
                     consensus=consensus, allow_nonfinite=allow_nonfinite, out_dtype=out_dtype)


def ref_dare_scales(base, fts, densities, seed, rescale, task_offset=0):
    keep = [ref.dare_keep_threshold(d) for d in densities]
    if rescale == "inverse":
        return keep, [1.0 / d if d > 0 else 0.0 for d in densities]
    sums = ref.dare_abs_sums(base, fts, seed, keep, task_offset).tolist()
    return keep, [b / a if b >= 1e-7 and a >= 1e-7 else 1.0 for b, a in sums]


def ref_dare_merge(base, fts, densities, weights, lam, knobs, seed, rescale):
    count = len(fts)
    keep, scales = ref_dare_scales(base, fts, densities, seed, rescale)
    thr = torch.zeros(count, dtype=torch.float32)
    cut = torch.full((count,), INT64_MAX, dtype=torch.int64)
    return ref_fused(base, fts, weights, scales, thr, cut, seed, keep, knobs, lam)


def assert_close(got, want, dtype=None):
    tol = TOLERANCES[dtype or want.dtype]
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got.float(), want.float(), equal_nan=True, **tol)


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


# ---- peers: peft (installed file), mergekit, the TIES paper ------------------------------------


def _load_peft_merge_utils():
    spec = importlib.util.find_spec("peft")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "utils" / "merge_utils.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


PEFT = _load_peft_merge_utils()
needs_peft = pytest.mark.skipif(PEFT is None, reason="peft/utils/merge_utils.py not found: "
                                "pip install --no-deps peft")

try:  # mergekit 0.1.5's import chain needs pydantic (no transformers) for this module
    from mergekit.merge_methods.api import merge_tensors as mergekit_merge_tensors
except ImportError as exc:  # pragma: no cover - depends on the environment
    mergekit_merge_tensors = None
    MERGEKIT_IMPORT_ERROR = str(exc)
else:
    MERGEKIT_IMPORT_ERROR = ""


def mergekit_ties_local(base, fts, weights, densities, lam, normalize=True, sparsified=None):
    """mergekit 0.1.5's ``ties`` on one tensor: ``GeneralizedTaskArithmeticMerge.merge_group``
    with consensus "sum" and ``get_mask`` (mergekit/merge_methods/generalized_task_arithmetic.py)
    and ``sparsify.magnitude`` (mergekit/sparsify.py: d >= 1 keeps all, d <= 0 keeps none, else
    k = max(1, int(d * n)) by argsort). ``sparsified`` replaces the trim (for dare_ties)."""

    def magnitude(tensor, density):
        if density >= 1:
            return tensor
        if density <= 0 or tensor.numel() == 0:
            return torch.zeros_like(tensor)
        k = max(1, int(density * tensor.numel()))
        mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
        topk = torch.argsort(tensor.abs().reshape(-1).float(), descending=True)[:k]
        mask[topk] = 1
        return tensor * mask.reshape_as(tensor)

    if sparsified is None:
        sparsified = [magnitude(f - base, d) for f, d in zip(fts, densities, strict=True)]
    deltas = torch.stack(sparsified)
    w = torch.tensor(weights, dtype=deltas.dtype)
    while deltas.dim() > w.dim():
        w = w.unsqueeze(-1)
    deltas = deltas * w
    sign = deltas.sign()
    majority_sign = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    mask = sign == majority_sign
    mixed = (deltas * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(base.dtype)


def run_mergekit(impl, base, fts, weights, densities, lam):
    if impl == "local":
        return mergekit_ties_local(base, fts, weights, densities, lam)
    return mergekit_merge_tensors([base, *fts], "ties", base_index=0,
                                  parameters={"weight": list(weights), "density": list(densities), "lambda": lam})


MERGEKIT_IMPLS = [
    "local",
    pytest.param("mergekit", marks=pytest.mark.skipif(
        mergekit_merge_tensors is None,
        reason=f"mergekit.merge_methods not importable ({MERGEKIT_IMPORT_ERROR}): "
               "pip install --no-deps mergekit pydantic pydantic-core annotated-types typing-inspection")),
]


def paper_ties(taus, density, merge_func):
    """The TIES paper's code on a [T, n] stack (prateeky2806/ties-merging, src/utils/merge_utils.py:
    topk_values_mask, resolve_sign with "mass" and resolve_zero_signs "majority", disjoint_merge)."""
    m = torch.stack(taus)
    d = m.shape[1]
    k = d - int(d * density)  # keep the top-K fraction: kthvalue of the (d - int(d*K))-th smallest
    if k == 0:  # kthvalue(0) is an error; K >= 1 keeps all (the tall_masks repo's copy guards it)
        updated = m
    else:
        kth_values, _ = m.abs().kthvalue(k, dim=1, keepdim=True)
        updated = m * (m.abs() >= kth_values)
    sign_to_mult = torch.sign(updated.sum(dim=0))
    majority_sign = torch.sign(sign_to_mult.sum())
    sign_to_mult[sign_to_mult == 0] = majority_sign
    rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, updated > 0, updated < 0)
    selected = updated * rows_to_keep
    if merge_func == "mean":
        counts = (selected != 0).sum(dim=0).float()
        return selected.sum(dim=0) / torch.clamp(counts, min=1)
    if merge_func == "sum":
        return selected.sum(dim=0)
    return selected.abs().max(dim=0)[0] * sign_to_mult


# =============================================================================================
# 1. peft parity
# =============================================================================================

PEER_CASES = [  # (shape, densities to try, weights)
    ((1,), (0.0, 0.5, 1.0), [1.0, 2.0]),
    ((7,), (0.0, 0.29, 0.5, 0.57, 1.0), [1.0, 0.5, -0.7]),
    ((100,), (0.1, 0.2, 0.29, 0.9), [0.3, 1.0, 0.0, 2.0]),
    ((31, 33), (0.05, 0.2, 0.5, 1.0), [1.0, 1.0, 1.0]),
    ((4099,), (0.01, 0.2, 0.7), [0.5, -0.25, 1.5, 1.0, 0.75]),
]


@needs_peft
@pytest.mark.parametrize(("shape", "densities", "weights"), PEER_CASES)
def test_ties_matches_peft(shape, densities, weights):
    numel = int(np.prod(shape))
    tvs = [sample(numel, seed=100 + t, scale=1 + t).reshape(shape) for t in range(len(weights))]
    for density in densities:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns that density >= 1 does not prune
            want = PEFT.ties(torch.stack(tvs), torch.tensor(weights), density)
        got = mtmerge.ties(tvs, density, weights, flavor="peft")
        assert got.shape == want.shape and got.dtype == torch.float32
        assert_close(got, want)
        # the default knobs are peft's, and a stacked [T, *S] tensor is a list of tasks
        assert_close(mtmerge.ties(torch.stack(tvs), density, weights), want)


@needs_peft
@pytest.mark.parametrize(("shape", "densities", "weights"), PEER_CASES)
def test_magnitude_prune_matches_peft(shape, densities, weights):
    numel = int(np.prod(shape))
    for t in range(len(weights)):
        tv = sample(numel, seed=200 + t).reshape(shape)
        for density in (*densities, 0.33):
            want = PEFT.magnitude_based_pruning(tv, density)
            got = mtmerge.magnitude_prune(tv, density)
            assert got.shape == tv.shape
            assert torch.equal(got, want), density  # a pure selection: bit for bit


# =============================================================================================
# 2. mergekit parity
# =============================================================================================


@pytest.mark.parametrize("impl", MERGEKIT_IMPLS)
@pytest.mark.parametrize(("shape", "densities", "weights"), PEER_CASES)
@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_ties_merge_matches_mergekit(impl, shape, densities, weights, lam):
    """Densities in (0, 1] (k = max(1, int(d n))), weights with no agreeing subset summing to 0."""
    numel = int(np.prod(shape))
    base, fts = make_models(numel, len(weights), seed=300, shape=shape)
    for density in densities:
        if density <= 0:
            continue  # see test_mergekit_flavor_density_zero_keeps_nothing
        per_task = [min(1.0, density * (1 + 0.5 * t)) for t in range(len(weights))]
        want = run_mergekit(impl, base, fts, weights, per_task, lam)
        got = mtmerge.ties_merge(base, fts, density=per_task, weights=weights, lam=lam, flavor="mergekit")
        assert_close(got, want)


@pytest.mark.skipif(mergekit_merge_tensors is None, reason="mergekit.merge_methods not importable")
def test_local_mergekit_copy_matches_the_package():
    base, fts = make_models(1000, 3, seed=301)
    for densities, weights, lam in [([0.2, 0.5, 1.0], [1.0, 0.5, 2.0], 0.8), ([0.0, 0.3, 0.001], [1.0, -1.0, 1.0], 1)]:
        want = run_mergekit("mergekit", base, fts, weights, densities, lam)
        assert torch.equal(mergekit_ties_local(base, fts, weights, densities, lam), want)


@pytest.mark.parametrize("impl", MERGEKIT_IMPLS)
def test_mergekit_flavor_density_zero_keeps_nothing(impl):
    """mergekit's sparsify.magnitude returns zeros for density <= 0, so the merge is the base."""
    base, fts = make_models(50, 2, seed=302)
    want = run_mergekit(impl, base, fts, [1.0, 1.0], [0.0, 0.0], 1.0)
    assert torch.equal(want, base)
    assert_close(mtmerge.ties_merge(base, fts, density=0.0, weights=[1.0, 1.0], flavor="mergekit"), want)


@pytest.mark.parametrize("impl", MERGEKIT_IMPLS)
def test_mergekit_flavor_with_cancelling_weights(impl):
    """Agreeing weights summing to 0 (task negation): mergekit divides by 1, not by 0."""
    base = torch.zeros(4)
    fts = [torch.tensor([1.0, 2.0, -1.0, 0.5]), torch.tensor([-3.0, -1.0, 2.0, 0.25])]
    want = run_mergekit(impl, base, fts, [1.0, -1.0], [1.0, 1.0], 1.0)
    assert want.tolist() == [4.0, 3.0, -3.0, 0.5]
    assert_close(mtmerge.ties_merge(base, fts, density=1.0, weights=[1.0, -1.0], flavor="mergekit"), want)


# =============================================================================================
# 3. the TIES paper flavor, and hand-computed cases
# =============================================================================================


@pytest.mark.parametrize("merge", ["mean", "sum", "max"])
@pytest.mark.parametrize("numel", [7, 100, 1023])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.2, 0.5, 1.0])
def test_paper_flavor_matches_the_paper_code(merge, numel, density):
    tvs = [sample(numel, seed=400 + t, scale=1 + t) for t in range(4)]
    want = paper_ties(tvs, density, merge)
    got = mtmerge.ties(tvs, density, flavor="paper", merge=merge)
    assert_close(got, want)
    base, fts = make_models(numel, 4, seed=401)
    want = base + 0.3 * paper_ties(flat_task_vectors(base, fts), density, merge)
    assert_close(mtmerge.ties_merge(base, fts, density, lam=0.3, flavor="paper", merge=merge), want)


@pytest.mark.parametrize("merge", ["mean", "sum", "max"])
def test_paper_flavor_when_the_sign_total_is_zero(merge):
    """S = [0, 2, -4]: the signs sum to 0, so the paper's majority sign is 0 and sign_to_mult
    stays 0 at entry 0: disjoint_merge then selects the negative entries there (mean, sum), and
    "max" multiplies by sign_to_mult = 0."""
    tvs = [torch.tensor([1.0, 3.0, -1.0]), torch.tensor([-1.0, -1.0, -3.0])]
    want = paper_ties(tvs, 0.67, merge)  # int(3 * 0.67) = 2: kthvalue(1), every entry kept
    assert want.tolist() == {"mean": [-1.0, 3.0, -2.0], "sum": [-1.0, 3.0, -4.0], "max": [0.0, 3.0, -3.0]}[merge]
    assert_close(mtmerge.ties(tvs, 0.67, flavor="paper", merge=merge), want)


TRIM_TVS = [
    torch.tensor([1.0, -2.0, 2.0, 3.0, -2.0, 0.5]),
    torch.tensor([2.0, 2.0, -1.0, 1.0, 1.0, -1.0]),
    torch.tensor([-0.5, 0.5, 0.5, -0.5, 0.5, 0.5]),
]


def test_hand_trim_ties_at_the_threshold():
    # k = int(0.5 * 6) = 3. exact: |.| > t plus the first ties in flat order; geq: >= the 3rd smallest.
    expected = {
        "exact": [[0, -2, 2, 3, 0, 0], [2, 2, -1, 0, 0, 0], [-0.5, 0.5, 0.5, 0, 0, 0]],
        "geq": [[0, -2, 2, 3, -2, 0], [2, 2, -1, 1, 1, -1], [-0.5, 0.5, 0.5, -0.5, 0.5, 0.5]],
    }
    for selection, rows in expected.items():
        for tv, row in zip(TRIM_TVS, rows, strict=True):
            assert mtmerge.magnitude_prune(tv, 0.5, selection).tolist() == row
    # one task: the trim is the result
    assert mtmerge.ties([TRIM_TVS[1]], 0.5).tolist() == [2, 2, -1, 0, 0, 0]
    # three tasks, peft's knobs with each tie rule; the paper flavor is geq + majority
    assert mtmerge.ties(TRIM_TVS, 0.5).tolist() == [2, 1.25, 1.25, 3, 0, 0]
    assert mtmerge.ties(TRIM_TVS, 0.5, selection="geq").tolist() == [2, 1.25, 1.25, 2, -2, -1]
    assert mtmerge.ties(TRIM_TVS, 0.5, flavor="paper").tolist() == [2, 1.25, 1.25, 2, -2, -1]
    # k_rule: int(0.1 * 6) = 0 keeps nothing, mergekit's rule keeps the largest
    assert mtmerge.magnitude_prune(TRIM_TVS[0], 0.1).tolist() == [0] * 6
    assert mtmerge.magnitude_prune(TRIM_TVS[0], 0.1, k_rule="at_least_one").tolist() == [0, 0, 0, 3, 0, 0]


ELECT_TVS = [  # columns: S = [1, 3, -2, 2, 0, 0]; sign counts = [-1, -1, 1, 1, -1, 1]
    torch.tensor([3.0, -1.0, 1.0, 0.0, 2.0, -2.0]),
    torch.tensor([-1.0, -1.0, 1.0, 0.0, -1.0, 1.0]),
    torch.tensor([-1.0, 5.0, -4.0, 2.0, -1.0, 1.0]),
]


def test_hand_elect_sum_vs_count():
    assert mtmerge.ties(ELECT_TVS, 1.0, elect="sum").tolist() == [3, 5, -4, 2, 2, 1]
    assert mtmerge.ties(ELECT_TVS, 1.0, elect="count").tolist() == [-1, -1, 1, 2, -1, 1]


ZERO_TVS = [  # S = [0, -3, -1, 0, 1, 0]: sign total -1
    torch.tensor([1.0, -1.0, -1.0, 2.0, 1.0, 0.0]),
    torch.tensor([-1.0, -2.0, 0.0, 0.0, 0.0, 0.0]),
    torch.tensor([0.0, 0.0, 0.0, -2.0, 0.0, 0.0]),
]


def test_hand_zero_sign_positive_vs_majority():
    assert mtmerge.ties(ZERO_TVS, 1.0, zero_sign="positive").tolist() == [1, -1.5, -1, 2, 1, 0]
    assert mtmerge.ties(ZERO_TVS, 1.0, zero_sign="majority").tolist() == [-1, -1.5, -1, -2, 1, 0]
    # a positive sign total fills with +1: negate every task
    neg = [-tv for tv in ZERO_TVS]
    assert mtmerge.ties(neg, 1.0, zero_sign="majority").tolist() == [1, 1.5, 1, 2, -1, 0]


WEIGHT_TVS = [
    torch.tensor([2.0, -1.0, 1.0, 0.5, 3.0, -1.0]),
    torch.tensor([-1.5, 2.0, -3.0, 1.0, -1.5, 1.0]),
    torch.tensor([1.0, 0.0, 1.0, -1.0, 0.0, 0.0]),
]
WEIGHTS = [1.0, 3.0, 2.0]
# unweighted S = [1.5, 1, -1, 0.5, 1.5, 0]; weighted S = [-0.5, 5, -6, 1.5, -1.5, 2]


def test_hand_weighted_vs_unweighted_election_merge_and_divisor():
    def run(**knobs):
        return mtmerge.ties(WEIGHT_TVS, 1.0, WEIGHTS, **knobs).tolist()

    assert run() == [2, 6, -9, 1.75, 3, 3]
    assert run(elect_weighted=True) == [-4.5, 6, -9, 1.75, -4.5, 3]
    assert run(merge="sum") == [4, 6, -9, 3.5, 3, 3]
    assert run(merge="max") == [2, 6, -9, 3, 3, 3]
    assert run(merge="max", elect_weighted=True) == [-4.5, 6, -9, 3, -4.5, 3]
    got = run(divisor="weight")
    assert got == pytest.approx([4 / 3, 2, -3, 0.875, 3, 1], rel=1e-6)
    assert run(flavor="peft") == [2, 6, -9, 1.75, 3, 3]
    assert run(flavor="mergekit") == pytest.approx([-1.5, 2, -3, 0.875, -1.5, 1], rel=1e-6)
    # ties_merge: base + lam * merged
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    got = mtmerge.ties_merge(base, [base + tv for tv in WEIGHT_TVS], 1.0, WEIGHTS, lam=0.5)
    assert got.tolist() == [2, 5, -1.5, 4.875, 6.5, 7.5]


def test_hand_task_arithmetic_and_dare_linear_without_drop():
    base = torch.tensor([1.0, -1.0, 0.5])
    fts = [torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, 1.0, 1.5])]
    assert mtmerge.task_arithmetic(base, fts, [1.0, 0.5], lam=2.0).tolist() == [3, 1, 0.5]
    tvs = flat_task_vectors(base, fts)
    assert mtmerge.dare_linear(tvs, 1.0, [1.0, 0.5], seed=0).tolist() == [1, 1, 0]
    assert mtmerge.dare_linear(tvs, 1.0, [1.0, 3.0], seed=0, normalize=True).tolist() == [0.25, 1.5, 0.625]


def test_flavors_and_resolve_knobs():
    assert set(FLAVORS) == {"peft", "mergekit", "paper"}
    assert resolve_knobs() == FLAVORS["peft"] == TiesKnobs()
    assert FLAVORS["mergekit"] == TiesKnobs(elect_weighted=True, divisor="weight", k_rule="at_least_one")
    assert FLAVORS["paper"] == TiesKnobs(selection="geq", zero_sign="majority")
    assert resolve_knobs("paper", merge="max", selection=None) == TiesKnobs(selection="geq", zero_sign="majority",
                                                                           merge="max")
    assert resolve_knobs("mergekit", divisor="count").divisor == "count"
    with pytest.raises(ValueError, match="flavor"):
        resolve_knobs("ties")
    with pytest.raises(TypeError, match="unknown TIES knob 'density'"):
        resolve_knobs(density=0.5)
    with pytest.raises(ValueError, match="elect_weighted"):
        resolve_knobs(elect_weighted=1)


# =============================================================================================
# 4. every knob combination, dtypes, sizes, layouts, out=
# =============================================================================================


@pytest.fixture(scope="module")
def knob_models():
    base, fts = make_models(301, 4, seed=500, kind="few_values")  # many ties and zero sums
    return base, fts, [0.2, 0.5, 0.003, 1.0], [1.0, 0.0, -0.5, 2.0]


@pytest.mark.parametrize("flavor", FLAVOR_NAMES)
@pytest.mark.parametrize("selection", KNOB_VALUES["selection"])
@pytest.mark.parametrize("elect", KNOB_VALUES["elect"])
@pytest.mark.parametrize("elect_weighted", KNOB_VALUES["elect_weighted"])
@pytest.mark.parametrize("zero_sign", KNOB_VALUES["zero_sign"])
@pytest.mark.parametrize("merge", KNOB_VALUES["merge"])
@pytest.mark.parametrize("divisor", KNOB_VALUES["divisor"])
def test_every_knob_combination(knob_models, flavor, selection, elect, elect_weighted, zero_sign, merge, divisor):
    base, fts, densities, weights = knob_models
    knobs = dict(selection=selection, elect=elect, elect_weighted=elect_weighted, zero_sign=zero_sign, merge=merge,
                 divisor=divisor)
    resolved = TiesKnobs(**knobs, k_rule=FLAVORS[flavor or "peft"].k_rule)
    got = mtmerge.ties_merge(base, fts, densities, weights, lam=0.7, flavor=flavor, **knobs)
    want = ref_ties_merge(base, fts, densities, weights, 0.7, resolved)
    assert_close(got, want)
    # the reference against the oracle (k: 0.003 * 301 rounds down to 0; mergekit keeps 1)
    ks = [k_for(d, 301, resolved.k_rule) for d in densities]
    oracle = base + 0.7 * oracle_ties(flat_task_vectors(base, fts), ks, weights, resolved)
    assert_close(want, oracle)


SIZE_KNOBS = [
    ("peft", {}),
    ("mergekit", {}),
    ("paper", {}),
    (None, dict(selection="geq", elect="count", elect_weighted=True, zero_sign="majority", merge="max",
                divisor="weight")),
]


def check_ties_merge(base, fts, flavor, knobs, with_task_vectors=True):
    dtype, numel = base.dtype, base.numel()
    densities, weights = [0.2, 0.5, 0.9], [1.0, 0.5, 2.0]
    resolved = resolve_knobs(flavor, **knobs)
    # the trim's selection pass is exact: thresholds and tie cut-offs bit for bit
    ks = [k_for(d, numel, resolved.k_rule) for d in densities]
    got_thr, got_cut = torch.ops.mtmerge.delta_threshold(base, fts, ks, resolved.selection, False, None)
    want_thr, want_cut = ref.delta_threshold(base, fts, ks, resolved.selection, False, None)
    assert torch.equal(got_thr, want_thr) and torch.equal(got_cut, want_cut)
    got = mtmerge.ties_merge(base, fts, densities, weights, lam=0.8, flavor=flavor, **knobs)
    assert got.dtype == dtype and got.shape == base.shape and got.is_contiguous()
    assert_close(got, ref_ties_merge(base, fts, densities, weights, 0.8, resolved))
    if with_task_vectors:
        tvs = [(f.float() - base.float()).to(dtype) for f in fts]
        got = mtmerge.ties(tvs, densities, weights, flavor=flavor, **knobs)
        assert_close(got, ref_ties_merge(None, tvs, densities, weights, 1.0, resolved))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 7, 1023])
@pytest.mark.parametrize(("flavor", "knobs"), SIZE_KNOBS)
def test_ties_merge_dtypes_and_sizes(dtype, numel, flavor, knobs):
    base, fts = make_models(numel, 3, dtype, seed=numel)
    check_ties_merge(base, fts, flavor, knobs)


@pytest.mark.parametrize(("dtype", "flavor", "knobs"), [(torch.float32, *SIZE_KNOBS[3]),
                                                        (torch.bfloat16, *SIZE_KNOBS[1]),
                                                        (torch.float16, *SIZE_KNOBS[2])])
def test_ties_merge_large(dtype, flavor, knobs):
    base, fts = make_models(70001, 3, dtype, seed=70001)
    check_ties_merge(base, fts, flavor, knobs, with_task_vectors=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flavor", ["peft", "mergekit", "paper"])
def test_many_ties_in_low_precision(dtype, flavor):
    base, fts = make_models(5001, 3, dtype, seed=501, kind="few_values")
    for densities in ([0.1, 0.37, 0.8], [0.0, 1.0, 0.5]):
        resolved = FLAVORS[flavor]
        ks = [k_for(d, 5001, resolved.k_rule) for d in densities]
        got_thr, got_cut = torch.ops.mtmerge.delta_threshold(base, fts, ks, resolved.selection, False, None)
        want_thr, want_cut = ref.delta_threshold(base, fts, ks, resolved.selection, False, None)
        assert torch.equal(got_thr, want_thr) and torch.equal(got_cut, want_cut)
        got = mtmerge.ties_merge(base, fts, densities, [1.0, 0.0, 2.0], lam=1.5, flavor=flavor)
        assert_close(got, ref_ties_merge(base, fts, densities, [1.0, 0.0, 2.0], 1.5, resolved))
        got = mtmerge.ties_merge(base, fts, densities, [1.0, 0.0, 2.0], lam=1.5, flavor=flavor, merge="max")
        want = ref_ties_merge(base, fts, densities, [1.0, 0.0, 2.0], 1.5, resolved._replace(merge="max"))
        assert torch.equal(got, want)  # max picks one input value: exact


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    base2d, fts2d = make_models(40 * 33, 3, dtype, seed=502, shape=(40, 33))
    views = [
        (base2d.t(), [f.t() for f in fts2d]),  # transposed
        (base2d[::2, 1::3], [f[::2, 1::3] for f in fts2d]),  # strided
    ]
    for base, fts in views:
        assert not base.is_contiguous()
        cbase, cfts = base.contiguous(), [f.contiguous() for f in fts]
        for flavor in ("peft", "paper"):
            got = mtmerge.ties_merge(base, fts, [0.3, 0.5, 0.1], [1.0, 2.0, 0.5], lam=0.9, flavor=flavor)
            assert got.shape == base.shape and got.is_contiguous()
            assert_close(got, ref_ties_merge(cbase, cfts, [0.3, 0.5, 0.1], [1.0, 2.0, 0.5], 0.9, FLAVORS[flavor]))
        got = mtmerge.task_arithmetic(base, fts, [1.0, 2.0, 0.5], lam=0.9)
        want = cbase.float() + 0.9 * sum(w * (f.float() - cbase.float()) for w, f in zip([1.0, 2.0, 0.5], cfts,
                                                                                      strict=True))
        assert_close(got, want.to(dtype))
        got = mtmerge.dare_ties([f.float() - base.float() for f in fts], 0.5, seed=3)
        want = mtmerge.dare_ties([f.float() - cbase.float() for f in cfts], 0.5, seed=3)
        assert torch.equal(got, want)


@pytest.mark.parametrize(("dtype", "out_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                                  (torch.float16, torch.bfloat16)])
def test_out_in_another_dtype(dtype, out_dtype):
    base, fts = make_models(1025, 3, dtype, seed=503)
    out = torch.empty(base.shape, dtype=out_dtype)
    got = mtmerge.ties_merge(base, fts, 0.3, [1.0, 0.5, 2.0], lam=0.5, out=out)
    assert got is out
    want = ref_ties_merge(base, fts, [0.3] * 3, [1.0, 0.5, 2.0], 0.5, FLAVORS["peft"], out_dtype=out_dtype)
    assert_close(got, want)
    out = torch.empty(base.shape, dtype=out_dtype)
    assert mtmerge.task_arithmetic(base, fts, [1.0, 0.5, 2.0], 0.5, out=out) is out
    want = base.float() + 0.5 * sum(w * (f.float() - base.float()) for w, f in zip([1.0, 0.5, 2.0], fts, strict=True))
    assert_close(out, want.to(out_dtype))


@pytest.mark.parametrize("flavor", ["peft", "paper"])
def test_density_zero_and_one(flavor):
    base, fts = make_models(257, 3, seed=504)
    tvs = flat_task_vectors(base, fts)
    weights = [1.0, 0.0, 2.0]
    zero = mtmerge.ties_merge(base, fts, 0.0, weights, flavor=flavor)
    assert_close(zero, ref_ties_merge(base, fts, [0.0] * 3, weights, 1.0, FLAVORS[flavor]))
    if flavor == "peft":  # k = 0 keeps nothing: the base comes back
        assert torch.equal(zero, base)
    else:  # the paper's >= kthvalue(n) keeps each task's largest entry (the paper has no weights)
        assert_close(mtmerge.ties_merge(base, fts, 0.0, flavor=flavor), base + paper_ties(tvs, 0.0, "mean"))
    one = mtmerge.ties_merge(base, fts, 1.0, weights, flavor=flavor)
    knobs = FLAVORS[flavor]
    assert_close(one, base + oracle_ties(tvs, [257] * 3, weights, knobs))
    assert_close(one, ref_ties_merge(base, fts, [1.0] * 3, weights, 1.0, knobs))


def test_task_arithmetic_matches_the_formula():
    for dtype in DTYPES:
        base, fts = make_models(3001, 4, dtype, seed=505)
        weights = [1.0, 0.0, -0.5, 2.0]
        got = mtmerge.task_arithmetic(base, fts, weights, lam=0.4)
        want = base.float() + 0.4 * sum(w * (f.float() - base.float()) for w, f in zip(weights, fts, strict=True))
        assert_close(got, want.to(dtype))
        assert_close(got, ref_fused(base, fts, weights, [1.0] * 4, torch.zeros(4), torch.full((4,), INT64_MAX), 0,
                                    [ref.DARE_KEEP_ONE] * 4, None, 0.4))


# =============================================================================================
# 5. DARE
# =============================================================================================


def _py_fmix32(x):
    """MurmurHash3's fmix32 on Python ints."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_dare_hash_is_the_documented_formula():
    assert _py_fmix32(1) == 0x514E28B7 and _py_fmix32(0) == 0  # MurmurHash3's known values
    index = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3])
    for seed, task in [(0, 0), (1234, 3), (2**62 + 5, 1)]:
        key = _py_fmix32(_py_fmix32(_py_fmix32(task + 0x9E3779B9) ^ (seed >> 32)) ^ (seed & 0xFFFFFFFF))
        assert ref.dare_task_key(seed, task) == key
        want = [_py_fmix32(_py_fmix32((i & 0xFFFFFFFF) ^ key) ^ (i >> 32) ^ 0x68E31DA4) >> 8 for i in index.tolist()]
        assert ref.dare_hash(index, key).tolist() == want
    assert ref.dare_keep_threshold(0.0) == 0 and ref.dare_keep_threshold(1.0) == 2**24
    assert ref.dare_keep_threshold(0.3) == round(0.3 * 2**24)


@pytest.mark.parametrize(("dtype", "n"), [(torch.float32, 70001), (torch.bfloat16, 4099), (torch.float16, 4099)])
def test_dare_masks_are_the_reference_hash(dtype, n):
    tvs = [(sample(n, seed=600 + t) + 0.01).to(dtype) for t in range(3)]
    tvs = [torch.where(tv == 0, torch.ones_like(tv), tv) for tv in tvs]  # every entry nonzero
    densities = [0.1, 0.5, 0.9]
    out = mtmerge.dare(tvs, densities, seed=1234)
    again = mtmerge.dare(tvs, densities, seed=1234)
    other = mtmerge.dare(tvs, densities, seed=1235)
    for t, (tv, d) in enumerate(zip(tvs, densities, strict=True)):
        mask = ref.dare_keep_mask(n, 1234, t, ref.dare_keep_threshold(d))
        assert out[t].dtype == dtype and torch.equal(out[t] != 0, mask)
        assert torch.equal(out[t], again[t])  # deterministic by seed
        assert not torch.equal(other[t] != 0, mask)
        assert abs(mask.float().mean().item() - d) < 5 * (d * (1 - d) / n) ** 0.5
        assert_close(out[t][mask], (tv.float()[mask] / d).to(dtype))
    # each task draws its own stream: task 1 of a list is task 1 alone only with the offset
    same = mtmerge.dare([tvs[1], tvs[1]], 0.5, seed=1234)
    assert not torch.equal(same[0] != 0, same[1] != 0)
    # density 0 drops everything, 1 keeps everything unscaled
    assert all(not bool(x.any()) for x in mtmerge.dare(tvs, 0.0, seed=1))
    assert all(torch.equal(x, tv) for x, tv in zip(mtmerge.dare(tvs, 1.0, seed=1), tvs, strict=True))


def test_dare_l1_rescale_restores_the_l1_norm():
    tvs = [sample(20001, seed=610 + t, scale=1 + t) for t in range(3)]
    densities = [0.1, 0.3, 0.8]
    out = mtmerge.dare(tvs, densities, seed=7, rescale="l1")
    for t, tv in enumerate(tvs):
        kept = out[t] != 0
        assert torch.equal(kept, ref.dare_keep_mask(20001, 7, t, ref.dare_keep_threshold(densities[t])))
        assert out[t].abs().double().sum().item() == pytest.approx(tv.abs().double().sum().item(), rel=1e-5)
        ratio = out[t][kept] / tv[kept]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-6)  # one scale per task
    # the op gives sum|tau| and sum|kept tau| in float64
    keep = [ref.dare_keep_threshold(d) for d in densities]
    got = torch.ops.mtmerge.dare_abs_sums(None, tvs, 7, keep, 0)
    want = ref.dare_abs_sums(None, tvs, 7, keep, 0)
    assert got.dtype == torch.float64 and got.shape == (3, 2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    masks = [ref.dare_keep_mask(20001, 7, t, keep[t]) for t in range(3)]
    first = torch.tensor([[tv.abs().double().sum(), tv.abs().double()[m].sum()] for tv, m in zip(tvs, masks,
                                                                                                  strict=True)])
    torch.testing.assert_close(want, first, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rescale", ["inverse", "l1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_linear(rescale, dtype):
    base, fts = make_models(4097, 3, dtype, seed=620)
    tvs = [(f.float() - base.float()).to(dtype) for f in fts]
    densities, weights = [0.2, 0.5, 0.7], [1.0, 0.5, 3.0]
    # the same masks and scales on the float32 task vectors (one rounding at the end)
    dropped = mtmerge.dare([tv.float() for tv in tvs], densities, seed=11, rescale=rescale)
    want = sum(w * x for w, x in zip(weights, dropped, strict=True))
    got = mtmerge.dare_linear(tvs, densities, weights, seed=11, rescale=rescale)
    assert_close(got, want.to(dtype))
    got = mtmerge.dare_linear(tvs, densities, weights, seed=11, rescale=rescale, normalize=True)
    assert_close(got, (want / sum(weights)).to(dtype))
    assert_close(got, ref_dare_merge(None, tvs, densities, [w / 4.5 for w in weights], 1.0, None, 11, rescale))
    # through ties_merge: sparsify="dare" with a linear merge is not offered; a TIES one is
    got = mtmerge.ties_merge(base, fts, densities, weights, lam=0.5, sparsify="dare", seed=11, rescale=rescale)
    assert_close(got, ref_dare_merge(base, fts, densities, weights, 0.5, FLAVORS["peft"], 11, rescale))


@pytest.mark.parametrize("rescale", ["inverse", "l1"])
@pytest.mark.parametrize(("flavor", "knobs"), SIZE_KNOBS)
def test_dare_ties(rescale, flavor, knobs):
    base, fts = make_models(3001, 3, seed=630)
    tvs = flat_task_vectors(base, fts)
    densities, weights = [0.3, 0.6, 0.9], [1.0, 0.5, 2.0]
    knobs = {k: v for k, v in knobs.items() if k != "selection"}  # DARE replaces the trim
    got = mtmerge.dare_ties(tvs, densities, weights, seed=5, rescale=rescale, flavor=flavor, **knobs)
    resolved = resolve_knobs(flavor, **knobs)
    assert_close(got, ref_dare_merge(None, tvs, densities, weights, 1.0, resolved, 5, rescale))
    # = TIES without a trim on the DARE'd task vectors
    dropped = mtmerge.dare(tvs, densities, seed=5, rescale=rescale)
    trimless = {k: v for k, v in resolved._asdict().items() if k not in ("selection", "k_rule")}
    assert_close(got, mtmerge.ties(dropped, 1.0, weights, **trimless))
    got = mtmerge.ties_merge(base, fts, densities, weights, lam=1.3, sparsify="dare", seed=5, rescale=rescale,
                             flavor=flavor, **knobs)
    assert_close(got, ref_dare_merge(base, fts, densities, weights, 1.3, resolved, 5, rescale))


def test_dare_ties_with_merge_sum_matches_mergekit_dare_ties_math():
    """mergekit's dare_ties (normalize=False by default) on the same DARE'd task vectors: the
    recipe in dare_ties' docstring (flavor="mergekit", merge="sum", rescale="l1")."""
    base, fts = make_models(2000, 3, seed=640)
    tvs = flat_task_vectors(base, fts)
    dropped = mtmerge.dare(tvs, 0.5, seed=9, rescale="l1")
    want = mergekit_ties_local(base, fts, [1.0, 0.5, 2.0], None, 1, normalize=False, sparsified=dropped) - base
    got = mtmerge.dare_ties(tvs, 0.5, [1.0, 0.5, 2.0], seed=9, rescale="l1", flavor="mergekit", merge="sum")
    assert_close(got, want)


def test_same_bits_with_one_and_two_threads():
    n = 2**17 + 3
    base, fts = make_models(n, 3, torch.bfloat16, seed=650)
    base32, fts32 = make_models(n, 3, seed=651)
    tvs = flat_task_vectors(base32, fts32)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        masks = mtmerge.tall_masks(fts32, sum(tvs), [0.3, 0.4, 0.5], base=base32)
        results.append([
            mtmerge.ties_merge(base, fts, [0.2, 0.5, 0.1], [1.0, 0.5, 2.0], lam=0.9),
            mtmerge.ties_merge(base32, fts32, 0.3, flavor="paper"),
            mtmerge.ties_merge(base32, fts32, 0.3, flavor="mergekit", merge="max"),
            mtmerge.dare_ties(tvs, 0.4, [1.0, 0.5, 2.0], seed=3, rescale="l1"),
            mtmerge.dare_linear(tvs, 0.4, seed=3),
            masks,
            mtmerge.consensus_mask(masks, 2),
            torch.ops.mtmerge.dare_abs_sums(None, tvs, 3, [ref.dare_keep_threshold(0.4)] * 3, 0),
        ])
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


# =============================================================================================
# 6. TALL masks and Consensus
# =============================================================================================


def numpy_tall(tvs, mtl, lams):
    rows = [np.abs(tv.numpy()) > np.float32(lam) * np.abs(mtl.numpy() - tv.numpy()) for tv, lam in
            zip(tvs, lams, strict=True)]
    return np.stack([np.packbits(r, bitorder="little") for r in rows]), np.stack(rows)


@pytest.mark.parametrize(("dtype", "numel"), [*itertools.product(DTYPES, [1, 13, 1001]), (torch.float32, 70001)])
def test_tall_masks(dtype, numel):
    base, fts = make_models(numel, 4, dtype, seed=numel + 700)
    tvs = flat_task_vectors(base, fts)
    mtl = sum(tvs)
    lams = [0.2, 0.4, 0.5, 0.6]
    want = ref.tall_masks(base, fts, mtl, lams)
    got = mtmerge.tall_masks(fts, mtl, lams, base=base)
    assert got.dtype == torch.uint8 and got.shape == (4, (numel + 7) // 8)
    assert torch.equal(got, want)
    packed, _ = numpy_tall(tvs, mtl, lams)
    assert got.numpy().tolist() == packed.tolist()
    # task vectors given directly (in the input dtype), one lam for all
    tvs_in = [tv.to(dtype) for tv in tvs]
    got = mtmerge.tall_masks(tvs_in, mtl.to(dtype), 0.4)
    assert torch.equal(got, ref.tall_masks(None, tvs_in, mtl.to(dtype), [0.4] * 4))
    assert torch.equal(torch.ops.mtmerge.tall_masks(None, tvs_in, mtl.to(dtype), [0.4] * 4), got)


@pytest.mark.parametrize("numel", [1, 13, 1001])
def test_consensus_mask_every_k(numel):
    base, fts = make_models(numel, 4, seed=710)
    tvs = flat_task_vectors(base, fts)
    mtl = sum(tvs)
    masks = mtmerge.tall_masks(tvs, mtl, 0.3)
    _, rows = numpy_tall(tvs, mtl, [0.3] * 4)
    counts = rows.sum(axis=0)
    for k in range(1, 6):
        got = mtmerge.consensus_mask(masks, k)
        assert got.dtype == torch.uint8 and got.shape == ((numel + 7) // 8,)
        assert torch.equal(got, ref.consensus_mask(masks, k))
        assert got.numpy().tolist() == np.packbits(counts >= k, bitorder="little").tolist()
    assert not bool(mtmerge.consensus_mask(masks, 5).any())
    # arbitrary bytes, padding bits included, and many tasks
    gen = torch.Generator().manual_seed(711)
    raw = torch.randint(0, 256, (9, 37), generator=gen, dtype=torch.uint8)
    bits = np.unpackbits(raw.numpy(), axis=1, bitorder="little").sum(axis=0)
    for k in range(1, 11):
        got = torch.ops.mtmerge.consensus_mask(raw, k)
        assert got.numpy().tolist() == np.packbits(bits >= k, bitorder="little").tolist()


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_consensus_merge(k, dtype):
    base, fts = make_models(2003, 3, dtype, seed=720)
    weights, tall_lam = [1.0, 0.5, 2.0], [0.3, 0.4, 0.5]
    tvs = flat_task_vectors(base, fts)
    mtl = sum(w * tv for w, tv in zip(weights, tvs, strict=True))
    _, rows = numpy_tall(tvs, mtl, tall_lam)
    keep = torch.from_numpy(rows.sum(axis=0) >= k)
    cons = ref.consensus_mask(ref.tall_masks(base, fts, mtl, tall_lam), k)
    assert cons.numpy().tolist() == np.packbits(keep.numpy(), bitorder="little").tolist()
    # task arithmetic on the consensus entries
    got = mtmerge.consensus_merge(base, fts, weights, 0.8, method="task_arithmetic", k=k, tall_lam=tall_lam)
    want = base.reshape(-1).float() + 0.8 * torch.where(keep, mtl, torch.zeros_like(mtl))
    assert_close(got, want.reshape(base.shape).to(dtype))
    # TIES on the consensus entries, with knobs
    for flavor, knobs in [("peft", {}), ("paper", {"merge": "sum"})]:
        got = mtmerge.consensus_merge(base, fts, weights, 0.8, k=k, tall_lam=tall_lam, density=0.3, flavor=flavor,
                                      **knobs)
        want = ref_ties_merge(base, fts, [0.3] * 3, weights, 0.8, resolve_knobs(flavor, **knobs), consensus=cons)
        assert_close(got, want)
    # ties_merge with the consensus given
    got = mtmerge.ties_merge(base, fts, 0.5, weights, consensus=cons)
    assert_close(got, ref_ties_merge(base, fts, [0.5] * 3, weights, 1.0, FLAVORS["peft"], consensus=cons))


# =============================================================================================
# 7. opcheck
# =============================================================================================


def _op_args():
    base, fts = make_models(37, 3, seed=800, kind="few_values")
    tvs = flat_task_vectors(base, fts)
    cons = ref.pack_bits(torch.arange(37) % 3 != 0)
    thr, cut = ref.delta_threshold(base, fts, [10, 20, 5], "exact")
    keep = [ref.dare_keep_threshold(0.5)] * 3
    w, s = [1.0, 0.5, 2.0], [1.0, 2.0, 1.0]
    masks = ref.tall_masks(base, fts, sum(tvs), [0.4] * 3)
    out = torch.empty(37)
    return {
        "delta_threshold": [(base, fts, [10, 20, 5], "exact", False, None),
                            (None, tvs, [0, 37, 3], "geq", False, cons)],
        "tie_cutoffs": [(base, fts, thr, torch.tensor([1, 0, 2]), None),
                        (None, tvs, thr, torch.tensor([3, 1, 1]), cons)],
        "dare_abs_sums": [(base, fts, 7, keep, 0), (None, tvs, 7, keep, 2)],
        "elect_sign_total": [(base, fts, w, s, thr, cut, 0, [ref.DARE_KEEP_ONE] * 3, "sum", False, None),
                             (None, tvs, w, s, thr, cut, 7, keep, "count", True, cons)],
        "merge_fused": [(base, fts, w, s, thr, cut, 0, [ref.DARE_KEEP_ONE] * 3, None, "sum", False, 1, "mean",
                         "count", 0.5, False, out, 0),
                        (None, tvs, w, s, thr, cut, 7, keep, cons, "count", True, -1, "max", "weight", 1.0, False,
                         out, 1),
                        (base, fts, w, s, thr, cut, 0, [ref.DARE_KEEP_ONE] * 3, None, "none", False, 1, "sum",
                         "count", 1.0, False, torch.empty(37, dtype=torch.bfloat16), 0)],
        "tall_masks": [(base, fts, sum(tvs), [0.4, 0.3, 0.2]), (None, tvs, sum(tvs), [0.4] * 3)],
        "consensus_mask": [(masks, 2), (masks, 1)],
        "magnitude_histogram": [(base, fts, 16, 15, [0, 0, 0], 31, None),
                                (None, tvs, 0, 16, [0x3E80, 0x3F00, 0x3E00], 16, cons)],
    }


@pytest.mark.parametrize("name", ["delta_threshold", "tie_cutoffs", "dare_abs_sums", "elect_sign_total",
                                  "merge_fused", "tall_masks", "consensus_mask", "magnitude_histogram"])
def test_opcheck(name):
    op = getattr(torch.ops.mtmerge, name).default
    for args in _op_args()[name]:
        torch.library.opcheck(op, args)


def test_ops_match_the_reference_directly():
    """Each op on CPU tensors against the reference function, the same arguments."""
    for name, cases in _op_args().items():
        for args in cases:
            if name == "merge_fused":
                got_out, want_out = torch.empty_like(args[16]), torch.empty_like(args[16])
                getattr(torch.ops.mtmerge, name)(*args[:16], got_out, args[17])
                ref.merge_fused(*args[:16], want_out, args[17])
                assert_close(got_out, want_out)
                continue
            got = getattr(torch.ops.mtmerge, name)(*args)
            want = getattr(ref, name)(*args)
            for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                            strict=True):
                assert g.dtype == w.dtype and g.shape == w.shape, name
                if g.dtype == torch.float64:
                    torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
                else:
                    assert torch.equal(g, w), (name, g, w)


# =============================================================================================
# 8. bad input
# =============================================================================================


def _bad_calls():
    b = torch.randn(10)
    f = [torch.randn(10), torch.randn(10)]
    tvs = [torch.randn(10), torch.randn(10)]
    meta = torch.empty(10, device="meta")
    masks = mtmerge.tall_masks(tvs, tvs[0] + tvs[1], 0.4)
    return [
        (lambda: mtmerge.ties_merge(b, [f[0], torch.randn(11)]), ValueError, r"finetuned\[1\] has shape"),
        (lambda: mtmerge.ties_merge(b, [f[0], f[1].half()]), ValueError, r"finetuned\[1\] has dtype"),
        (lambda: mtmerge.ties_merge(b.half(), f), ValueError, r"finetuned\[0\] has dtype"),
        (lambda: mtmerge.ties_merge(b, [f[0], meta]), ValueError, r"finetuned\[1\] is on meta"),
        (lambda: mtmerge.ties_merge(b, [f[0], f[1].long()]), ValueError, r"finetuned\[1\] must be float32"),
        (lambda: mtmerge.task_arithmetic(b, [f[0], torch.randn(2, 5)]), ValueError, r"finetuned\[1\] has shape"),
        (lambda: mtmerge.ties([tvs[0], torch.randn(9)]), ValueError, r"task_vectors\[1\] has shape"),
        (lambda: mtmerge.ties([tvs[0], meta]), ValueError, r"task_vectors\[1\] is on meta"),
        (lambda: mtmerge.dare([tvs[0], tvs[1].bfloat16()], 0.5, seed=0), ValueError, r"task_vectors\[1\] has dtype"),
        (lambda: mtmerge.tall_masks(tvs, torch.randn(11), 0.4), ValueError, "merged_task_vector has shape"),
        (lambda: mtmerge.tall_masks(tvs, meta, 0.4), ValueError, "merged_task_vector"),
        (lambda: mtmerge.ties_merge(b, f, out=torch.empty(10, device="meta")), ValueError, "out is on meta"),
        (lambda: mtmerge.ties_merge(b, f, out=torch.empty(11)), ValueError, "out has shape"),
        (lambda: mtmerge.ties_merge(b, f, out=torch.empty(20)[::2]), ValueError, "out must be contiguous"),
        (lambda: mtmerge.ties_merge(b, f, out=torch.empty(10, dtype=torch.int32)), ValueError, "out must be float"),
        # density, weights, lam, seed
        (lambda: mtmerge.ties_merge(b, f, density=1.5), ValueError, "density must be in"),
        (lambda: mtmerge.ties_merge(b, f, density=-0.1), ValueError, "density must be in"),
        (lambda: mtmerge.ties_merge(b, f, density=float("nan")), ValueError, "density must be in"),
        (lambda: mtmerge.ties(tvs, [0.5, 1.01]), ValueError, "density must be in"),
        (lambda: mtmerge.dare(tvs, 2.0, seed=0), ValueError, "density must be in"),
        (lambda: mtmerge.magnitude_prune(tvs[0], -1.0), ValueError, "density must be in"),
        (lambda: mtmerge.ties_merge(b, f, density=[0.5]), ValueError, "density must have one entry per task"),
        (lambda: mtmerge.ties_merge(b, f, weights=[1.0]), ValueError, "weights must have one entry per task"),
        (lambda: mtmerge.task_arithmetic(b, f, [1.0, 2.0, 3.0]), ValueError, "weights must have one entry"),
        (lambda: mtmerge.dare_ties(tvs, 0.5, [1.0], seed=0), ValueError, "weights must have one entry"),
        (lambda: mtmerge.ties(tvs, 0.5, [1.0, float("inf")]), ValueError, "weights must be finite"),
        (lambda: mtmerge.ties_merge(b, f, lam=float("nan")), ValueError, "lam must be finite"),
        (lambda: mtmerge.tall_masks(tvs, tvs[0], [0.4]), ValueError, "lam must have one entry per task"),
        (lambda: mtmerge.dare(tvs, 0.5, seed=-1), ValueError, "seed must be in"),
        (lambda: mtmerge.dare_ties(tvs, 0.5, seed=None), TypeError, "seed must be an int"),
        (lambda: mtmerge.ties_merge(b, f, sparsify="dare"), TypeError, "seed must be an int"),
        # empty lists
        (lambda: mtmerge.ties_merge(b, []), ValueError, "finetuned must hold at least one tensor"),
        (lambda: mtmerge.task_arithmetic(b, []), ValueError, "finetuned must hold at least one tensor"),
        (lambda: mtmerge.ties([]), ValueError, "task_vectors must hold at least one tensor"),
        (lambda: mtmerge.dare([], 0.5, seed=0), ValueError, "task_vectors must hold at least one tensor"),
        (lambda: mtmerge.dare_linear([], 0.5, seed=0), ValueError, "task_vectors must hold at least one tensor"),
        (lambda: mtmerge.tall_masks([], tvs[0], 0.4), ValueError, "task_vectors must hold at least one tensor"),
        (lambda: mtmerge.consensus_merge(b, []), ValueError, "finetuned must hold at least one tensor"),
        # unknown flavor and knob values
        (lambda: mtmerge.ties(tvs, flavor="ties"), ValueError, "flavor must be one of"),
        (lambda: mtmerge.ties_merge(b, f, selection="top"), ValueError, "selection must be one of"),
        (lambda: mtmerge.ties_merge(b, f, elect="mass"), ValueError, "elect must be one of"),
        (lambda: mtmerge.ties_merge(b, f, elect_weighted="yes"), ValueError, "elect_weighted must be one of"),
        (lambda: mtmerge.ties_merge(b, f, zero_sign="minority"), ValueError, "zero_sign must be one of"),
        (lambda: mtmerge.ties(tvs, merge="median"), ValueError, "merge must be one of"),
        (lambda: mtmerge.ties(tvs, divisor="sum"), ValueError, "divisor must be one of"),
        (lambda: mtmerge.ties_merge(b, f, scope="layer"), ValueError, "scope must be one of"),
        (lambda: mtmerge.ties_merge(b, f, sparsify="random"), ValueError, "sparsify must be one of"),
        (lambda: mtmerge.dare(tvs, 0.5, seed=0, rescale="l2"), ValueError, "rescale must be one of"),
        (lambda: mtmerge.magnitude_prune(tvs[0], 0.5, "top"), ValueError, "selection must be one of"),
        (lambda: mtmerge.magnitude_prune(tvs[0], 0.5, k_rule="ceil"), ValueError, "k_rule must be one of"),
        (lambda: mtmerge.dare_ties(tvs, 0.5, seed=0, flavor="dare"), ValueError, "flavor must be one of"),
        (lambda: mtmerge.consensus_merge(b, f, method="mean"), ValueError, "method must be"),
        (lambda: mtmerge.consensus_merge(b, f, zero_sign="none"), ValueError, "zero_sign must be one of"),
        # consensus masks
        (lambda: mtmerge.consensus_mask(masks, 0), ValueError, "k must be >= 1"),
        (lambda: mtmerge.consensus_mask(masks, 1.5), TypeError, "k must be an int"),
        (lambda: mtmerge.consensus_mask(masks.float(), 1), ValueError, "masks must be a uint8"),
        (lambda: mtmerge.consensus_mask(masks[0], 1), ValueError, "masks must be a uint8"),
        (lambda: mtmerge.ties_merge(b, f, consensus=torch.zeros(3, dtype=torch.uint8)), ValueError,
         "consensus must hold"),
        (lambda: mtmerge.ties_merge(b, f, consensus=torch.zeros(2)), TypeError, "consensus must be a packed uint8"),
        # NaN / Inf
        (lambda: mtmerge.task_arithmetic(b, [f[0], _with(f[1], 3, "nan")]), ValueError, "finetuned.*NaN"),
        (lambda: mtmerge.task_arithmetic(_with(b, 3, "inf"), f), ValueError, "base.*Inf"),
        (lambda: mtmerge.ties_merge(b, [f[0], _with(f[1], 3, "nan")]), ValueError, r"finetuned\[1\].*NaN"),
        (lambda: mtmerge.ties_merge(b, [f[0], _with(f[1], 3, "-inf")]), ValueError, r"finetuned\[1\].*Inf"),
        (lambda: mtmerge.ties_merge(b, [f[0], _with(f[1], 3, "nan")], allow_nonfinite=True), ValueError, "NaN"),
        (lambda: mtmerge.consensus_merge(b, [f[0], _with(f[1], 0, "inf")]), ValueError, "finetuned.*Inf"),
    ]


def _with(x, index, value):
    y = x.clone()
    y[index] = float(value)
    return y


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    call, error, match = _bad_calls()[case]
    with pytest.raises(error, match=match):
        call()


def _nonfinite_calls():
    b = torch.randn(10)
    f = [torch.randn(10), torch.randn(10)]
    nan, inf = _with(f[1], 3, "nan"), _with(f[1], 4, "inf")
    return {
        "ties_merge NaN in base": (lambda: mtmerge.ties_merge(_with(b, 2, "nan"), f), "base"),
        "ties NaN": (lambda: mtmerge.ties([f[0], nan]), r"task_vectors\[1\]"),
        "ties Inf": (lambda: mtmerge.ties([f[0], inf]), r"task_vectors\[1\]"),
        "magnitude_prune NaN": (lambda: mtmerge.magnitude_prune(nan, 0.5), "task_vector"),
        "dare NaN": (lambda: mtmerge.dare([f[0], nan], 0.5, seed=0), r"task_vectors"),
        "dare_linear Inf": (lambda: mtmerge.dare_linear([f[0], inf], 0.5, seed=0), r"task_vectors"),
        "dare_ties NaN": (lambda: mtmerge.dare_ties([f[0], nan], 0.5, seed=0), r"task_vectors"),
    }


@pytest.mark.parametrize("case", list(_nonfinite_calls()))
def test_nonfinite_error_names_the_public_argument(case):
    call, match = _nonfinite_calls()[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_allow_nonfinite_lets_inf_through():
    base, fts = make_models(64, 3, seed=900)
    fts[1] = _with(fts[1], 5, "inf")
    fts[2] = _with(fts[2], 9, "-inf")
    weights = [1.0, 0.5, 2.0]
    got = mtmerge.task_arithmetic(base, fts, weights, lam=0.5, allow_nonfinite=True)
    want = base + 0.5 * sum(w * (f - base) for w, f in zip(weights, fts, strict=True))
    assert_close(got, want)
    assert got[5] == float("inf") and got[9] == float("-inf")
    for flavor in ("peft", "mergekit", "paper"):
        got = mtmerge.ties_merge(base, fts, 0.3, weights, lam=0.5, flavor=flavor, allow_nonfinite=True)
        want = ref_ties_merge(base, fts, [0.3] * 3, weights, 0.5, FLAVORS[flavor], allow_nonfinite=True)
        assert_close(got, want)
        assert not bool(torch.isfinite(got[[5, 9]]).any())  # +inf elects +: inf / count; -inf likewise
    with pytest.raises(ValueError, match="Inf"):
        mtmerge.ties_merge(base, fts, 0.3, weights)


# ---- large inputs: the shared window pass of the CPU selection (n >= 2**18) --------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("selection", ["exact", "geq"])
def test_shared_window_selection_on_large_inputs(dtype, selection):
    """Above 2**18 entries the CPU kernel selects every task in one shared sampled-window pass
    and places the threshold's ties from that pass's trace: same bits as the reference, for
    any thread count, with heavy ties (bf16 deltas take few values), a consensus mask and a
    task whose k is 0."""
    n = 2**18 + 4099
    base, fts = make_models(n, 3, dtype, seed=900)
    if dtype == torch.bfloat16:  # deltas on a coarse grid: thousands of ties at each threshold
        fts = [(base.float() + torch.round(f.float() - base.float(), decimals=2)).to(dtype) for f in fts]
    ks = [int(0.2 * n), 0, int(0.55 * n)] if selection == "exact" else [int(0.2 * n), n, int(0.55 * n)]
    masks = ref.tall_masks(base, fts, sum(flat_task_vectors(base, fts)), [0.3, 0.3, 0.3])
    consensus = ref.consensus_mask(masks, 1)
    for cons in (None, consensus):
        want = ref.delta_threshold(base, fts, ks, selection, False, cons)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = torch.ops.mtmerge.delta_threshold(base, fts, ks, selection, False, cons)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (threads, cons is None)
    if selection == "exact" and dtype == torch.bfloat16:
        # partial ties really occur here, so the traced cut-off path ran
        assert int((want[1] != INT64_MAX).sum()) >= 1


@pytest.mark.parametrize("with_base", [True, False])
def test_dare_index_offset_makes_chunks_match_the_whole(with_base):
    """merge_fused / dare_abs_sums / elect_sign_total on chunks with index_offset = chunk start
    give exactly the whole tensor's DARE masks (the pipeline merges huge tensors in chunks)."""
    n, count = 10007, 3
    base, fts = make_models(n, count, seed=77)
    b = base if with_base else None
    keep = [ref.dare_keep_threshold(d) for d in (0.2, 0.5, 0.8)]
    thr = torch.zeros(count)
    cut = torch.full((count,), INT64_MAX, dtype=torch.int64)
    args = ([1.0, 0.5, 2.0], [1.0, 2.0, 5.0], thr, cut, 11, keep, None, "sum", False, 1, "mean", "count", 0.7, False)
    whole = torch.empty(n)
    torch.ops.mtmerge.merge_fused(b, fts, *args, whole)
    pieces = []
    for start, stop in [(0, 4096), (4096, 5000), (5000, n)]:
        part = torch.empty(stop - start)
        torch.ops.mtmerge.merge_fused(None if b is None else b[start:stop], [f[start:stop] for f in fts], *args,
                                      part, 0, True, start)
        want = torch.empty(stop - start)
        ref.merge_fused(None if b is None else b[start:stop], [f[start:stop] for f in fts], *args, want, 0, True,
                        start)
        assert torch.equal(part, want)
        pieces.append(part)
    assert torch.equal(torch.cat(pieces), whole)
    sums = sum(torch.ops.mtmerge.dare_abs_sums(None if b is None else b[s:e], [f[s:e] for f in fts], 11, keep, 0, s)
               for s, e in [(0, 5000), (5000, n)])
    torch.testing.assert_close(sums, ref.dare_abs_sums(b, fts, 11, keep), rtol=1e-12, atol=0)
    total = sum(int(torch.ops.mtmerge.elect_sign_total(None if b is None else b[s:e], [f[s:e] for f in fts],
                                                       [1.0] * 3, [1.0] * 3, thr, cut, 11, keep, "sum", False, None, s))
                for s, e in [(0, 3000), (3000, n)])
    assert total == int(ref.elect_sign_total(b, fts, [1.0] * 3, [1.0] * 3, thr, cut, 11, keep))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_histogram_finds_the_exact_threshold(dtype):
    """Two magnitude_histogram calls (top 15 bits, then the low 16 bits inside the chosen bin)
    find delta_threshold's exact threshold, over chunks summed; same bits for 1 and 2 threads."""
    n, k = 2**18 + 5, 40000
    base, fts = make_models(n, 2, dtype, seed=910)
    want_thr, _ = ref.delta_threshold(base, fts, [k, k], "exact")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        chunks = [(0, 100003), (100003, n)]
        hi = sum(torch.ops.mtmerge.magnitude_histogram(base[a:b], [f[a:b] for f in fts], 16, 15, [0, 0], 31, None)
                 for a, b in chunks)
        assert torch.equal(hi, ref.magnitude_histogram(base, fts, 16, 15, [0, 0]))
        bins, ranks = [], []
        for t in range(2):
            above = torch.flip(hi[t], [0]).cumsum(0)
            j = int(torch.searchsorted(above, torch.tensor([k])))
            bins.append(2**15 - 1 - j)
            ranks.append(k - (int(above[j - 1]) if j else 0))
        lo = sum(torch.ops.mtmerge.magnitude_histogram(base[a:b], [f[a:b] for f in fts], 0, 16, bins, 16, None)
                 for a, b in chunks)
        assert torch.equal(lo, ref.magnitude_histogram(base, fts, 0, 16, bins, 16))
        for t in range(2):
            above = torch.flip(lo[t], [0]).cumsum(0)
            j = int(torch.searchsorted(above, torch.tensor([ranks[t]])))
            key = (bins[t] << 16) | (2**16 - 1 - j)
            assert key == int(want_thr[t:t + 1].view(torch.int32))


def test_dare_rescale_none_keeps_the_kept_entries_as_they_are():
    """rescale="none" (mergekit's ``rescale: false``): DARE only drops entries."""
    base, fts = make_models(4001, 2, seed=920)
    tvs = flat_task_vectors(base, fts)
    dropped = mtmerge.dare(tvs, [0.3, 0.6], seed=4, rescale="none")
    for t, (tv, d) in enumerate(zip(tvs, dropped, strict=True)):
        keep = ref.dare_keep_mask(4001, 4, t, ref.dare_keep_threshold([0.3, 0.6][t]))
        assert torch.equal(d, torch.where(keep, tv, torch.zeros_like(tv)))
    with pytest.raises(ValueError, match="rescale"):
        mtmerge.dare(tvs, 0.3, seed=4, rescale="l2")


@pytest.mark.parametrize("selection", ["exact", "geq"])
def test_shared_window_with_a_single_key_in_the_bracket(selection):
    """Task vectors taking 3 values: the sampled bracket collapses to one key (lo == hi), so
    every radix level is settled by the bracket alone; results still match the reference."""
    n = 2**18 + 77
    g = torch.Generator().manual_seed(930)
    base = torch.zeros(n)
    values = torch.tensor([0.5, -1.0, 2.0])
    fts = [values[torch.randint(0, 3, (n,), generator=g)] for _ in range(2)]
    ks = [n // 2, n // 3]
    want = ref.delta_threshold(base, fts, ks, selection, False, None)
    got = torch.ops.mtmerge.delta_threshold(base, fts, ks, selection, False, None)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    out = mtmerge.ties_merge(base, fts, [0.5, 1 / 3], selection=selection)
    assert_close(out, ref_ties_merge(base, fts, [0.5, 1 / 3], [1.0, 1.0], 1.0, TiesKnobs(selection=selection)))
