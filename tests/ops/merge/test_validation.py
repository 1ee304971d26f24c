"""Bad input through the public merge API: a clear ValueError/TypeError naming the public
argument, never a crash; NaN/Inf rejected unless ``allow_nonfinite=True``; an op that raises
leaves ``out`` (which may alias an input) untouched, bit for bit; a knob that cannot do what it
says (``scope="global"`` on one tensor) raises."""

from __future__ import annotations

import pytest
import torch

import mtmerge
from mtmerge.ops.recipe import FLAVORS
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import (
    DEVICES,
    assert_close,
    assert_same,
    keep_all,
    make_models,
    merge_scalars,
    ref_ties_merge,
    rule,
    task_scalars,
    task_trim,
    with_value,
)

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def _bad_calls():
    b = torch.randn(10)
    f = [torch.randn(10), torch.randn(10)]
    tvs = [torch.randn(10), torch.randn(10)]
    meta = torch.empty(10, device="meta")
    masks = mtmerge.tall_masks(tvs, tvs[0] + tvs[1], 0.4)
    return [
        (lambda: mtmerge.ties_merge(b, [f[0], torch.randn(11)]), ValueError, r"finetuned\[1\] has shape"),
        (lambda: mtmerge.ties_merge(b, [f[0], f[1].half()]), TypeError, r"finetuned\[1\] has dtype"),
        (lambda: mtmerge.ties_merge(b.half(), f), TypeError, r"finetuned\[0\] has dtype"),
        (lambda: mtmerge.ties_merge(b, [f[0], meta]), ValueError, r"finetuned\[1\] is on meta"),
        (lambda: mtmerge.ties_merge(b, [f[0], f[1].long()]), TypeError, r"finetuned\[1\] must be .*float32"),
        (lambda: mtmerge.task_arithmetic(b, [f[0], torch.randn(2, 5)]), ValueError, r"finetuned\[1\] has shape"),
        (lambda: mtmerge.ties([tvs[0], torch.randn(9)]), ValueError, r"task_vectors\[1\] has shape"),
        (lambda: mtmerge.ties([tvs[0], meta]), ValueError, r"task_vectors\[1\] is on meta"),
        (lambda: mtmerge.dare([tvs[0], tvs[1].bfloat16()], 0.5, seed=0), TypeError, r"task_vectors\[1\] has dtype"),
        (lambda: mtmerge.tall_masks(tvs, torch.randn(11), 0.4), ValueError, "merged_task_vector has shape"),
        (lambda: mtmerge.tall_masks(tvs, meta, 0.4), ValueError, "merged_task_vector"),
        (lambda: mtmerge.ties_merge(b, f, out=torch.empty(10, device="meta")), ValueError, "out is on meta"),
        (lambda: mtmerge.ties_merge(b, f, out=torch.empty(11)), ValueError, "out has shape"),
        (lambda: mtmerge.ties_merge(b, f, out=torch.empty(20)[::2]), ValueError, "out must be contiguous"),
        (lambda: mtmerge.ties_merge(b, f, out=torch.empty(10, dtype=torch.int32)), TypeError, "out must be float"),
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
        (lambda: mtmerge.dare_ties(tvs, 0.5, seed=None), (TypeError, ValueError), "seed"),
        (lambda: mtmerge.ties_merge(b, f, sparsify="dare"), (TypeError, ValueError), "seed"),
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
        (lambda: mtmerge.consensus_mask(masks, 0), ValueError, "k must be"),
        (lambda: mtmerge.consensus_mask(masks, 1.5), TypeError, "k must be an int"),
        (lambda: mtmerge.consensus_mask(masks.float(), 1), TypeError, "masks must be .*uint8"),
        (lambda: mtmerge.consensus_mask(masks[0], 1), ValueError, "masks must be .*uint8"),
        (lambda: mtmerge.ties_merge(b, f, consensus=torch.zeros(3, dtype=torch.uint8)), ValueError,
         "consensus must hold"),
        (lambda: mtmerge.ties_merge(b, f, consensus=torch.zeros(2)), TypeError, "consensus must be a packed uint8"),
        # NaN / Inf
        (lambda: mtmerge.task_arithmetic(b, [f[0], with_value(f[1], 3, "nan")]), ValueError, "finetuned.*NaN"),
        (lambda: mtmerge.task_arithmetic(with_value(b, 3, "inf"), f), ValueError, "base.*Inf"),
        (lambda: mtmerge.ties_merge(b, [f[0], with_value(f[1], 3, "nan")]), ValueError, r"finetuned\[1\].*NaN"),
        (lambda: mtmerge.ties_merge(b, [f[0], with_value(f[1], 3, "-inf")]), ValueError, r"finetuned\[1\].*Inf"),
        (lambda: mtmerge.ties_merge(b, [f[0], with_value(f[1], 3, "nan")], allow_nonfinite=True), ValueError, "NaN"),
        (lambda: mtmerge.consensus_merge(b, [f[0], with_value(f[1], 0, "inf")]), ValueError, "finetuned.*Inf"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    call, error, match = _bad_calls()[case]
    with pytest.raises(error, match=match):
        call()


def _nonfinite_calls():
    b = torch.randn(10)
    f = [torch.randn(10), torch.randn(10)]
    nan, inf = with_value(f[1], 3, "nan"), with_value(f[1], 4, "inf")
    return {
        "ties_merge NaN in base": (lambda: mtmerge.ties_merge(with_value(b, 2, "nan"), f), "base"),
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
    fts[1] = with_value(fts[1], 5, "inf")
    fts[2] = with_value(fts[2], 9, "-inf")
    weights = [1.0, 0.5, 2.0]
    got = mtmerge.task_arithmetic(base, fts, weights, lam=0.5, allow_nonfinite=True)
    want = base + 0.5 * sum(w * (f - base) for w, f in zip(weights, fts, strict=True))
    assert_close(got, want)
    assert got[5] == float("inf") and got[9] == float("-inf")
    for flavor in ("peft", "mergekit", "paper"):
        got = mtmerge.ties_merge(base, fts, 0.3, weights, lam=0.5, flavor=flavor, allow_nonfinite=True)
        want = ref_ties_merge(base, fts, [0.3] * 3, weights, 0.5, FLAVORS[flavor], allow_nonfinite=True)
        assert_same(got, want)
        assert not bool(torch.isfinite(got[[5, 9]]).any())  # +inf elects +: inf / count; -inf likewise
    with pytest.raises(ValueError, match="Inf"):
        mtmerge.ties_merge(base, fts, 0.3, weights)


# ---- an op that raises leaves out= untouched ------------------------------------------------------


def _out_calls():
    """name -> (call(out, base, fts, tvs), which inputs out may alias). Inf sits in fts[1] / tvs[1]."""
    return {
        "task_arithmetic": lambda out, b, f, tv: mtmerge.task_arithmetic(b, f, [1.0, 0.5, 2.0], 0.5, out=out),
        "ties_merge": lambda out, b, f, tv: mtmerge.ties_merge(b, f, 0.3, out=out),
        "ties_merge dare": lambda out, b, f, tv: mtmerge.ties_merge(b, f, 0.3, sparsify="dare", seed=1, out=out),
        "ties": lambda out, b, f, tv: mtmerge.ties(tv, 0.3, out=out),
        "magnitude_prune": lambda out, b, f, tv: mtmerge.magnitude_prune(tv[1], 0.3, out=out),
        "dare_linear": lambda out, b, f, tv: mtmerge.dare_linear(tv, 0.5, seed=3, out=out),
        "dare_ties": lambda out, b, f, tv: mtmerge.dare_ties(tv, 0.5, seed=3, out=out),
        "consensus_merge": lambda out, b, f, tv: mtmerge.consensus_merge(b, f, out=out),
        "consensus_merge task_arithmetic": lambda out, b, f, tv: mtmerge.consensus_merge(
            b, f, method="task_arithmetic", out=out),
    }


def _uses_base(name: str) -> bool:
    return "merge" in name.split()[0] or name == "task_arithmetic"


# out aliases: a fresh buffer, base itself (ops with a base), the input holding the Inf
OUT_CASES = [(name, alias) for name in _out_calls() for alias in ("fresh", "base", "input")
             if alias != "base" or _uses_base(name)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "alias"), OUT_CASES)
def test_an_op_that_raises_leaves_out_untouched(name, alias, device):
    """Inf in one input, allow_nonfinite=False: ValueError, and ``out`` keeps every bit, also
    when it is ``base`` itself (or the input holding the Inf)."""
    base, fts = make_models(4099, 3, seed=940)
    base, fts = base.to(device), [f.to(device) for f in fts]
    fts[1] = with_value(fts[1], 4000, "inf")
    tvs = [f - base for f in fts]
    uses_base = _uses_base(name)
    out = {"fresh": torch.randn(4099, device=device), "base": base, "input": tvs[1] if not uses_base else fts[1]}[alias]
    before = out.clone()
    with pytest.raises(ValueError, match="Inf"):
        _out_calls()[name](out, base, fts, tvs)
    assert_same(out, before)


@pytest.mark.parametrize("where", ["base", "finetuned"])
def test_merge_fused_checks_before_writing(where):
    """merge_fused with rule[RULE_CHECK_FINITE] = 1 raises before writing out, even out = base."""
    base, fts = make_models(5000, 3, seed=941)
    if where == "base":
        base = with_value(base, 4999, "nan")
        match = r"^base contains 1 NaN or Inf"
    else:
        fts[2] = with_value(fts[2], 17, "-inf")
        match = r"^finetuned\[2\] contains 1 NaN or Inf"
    args = dict(finetuned=fts, task_scalars=task_scalars([1.0] * 3), task_trim=task_trim(*keep_all(3)),
                consensus=None, rule=rule("sum", check_finite=True), merge_scalars=merge_scalars(1.0, 1.0))
    for out in (torch.full((5000,), 7.0), base):
        before = out.clone()
        for impl in (torch.ops.mtmerge.merge_fused, ref.merge_fused):
            with pytest.raises(ValueError, match=match):
                impl(base=base, out=out, **args)
            assert_same(out, before)


# ---- a knob does what it says or raises -----------------------------------------------------


def test_scope_global_without_thresholds_raises():
    """One tensor cannot see the whole model: scope="global" needs thresholds= from the caller."""
    base, fts = make_models(100, 2, seed=950)
    tvs = [f - base for f in fts]
    with pytest.raises(ValueError, match="scope"):
        mtmerge.ties_merge(base, fts, 0.3, scope="global")
    with pytest.raises(ValueError, match="scope"):
        mtmerge.ties(tvs, 0.3, scope="global")
