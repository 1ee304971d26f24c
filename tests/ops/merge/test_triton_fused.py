"""The Triton fused merge (``merge_fused``, ``elect_sign_total``, ``task_arithmetic``) against
the reference: every knob, size, dtype and layout, bit for bit (same float32 operations in the
same order; NaN compared as NaN), and the NaN/Inf check that runs before anything is written."""

from __future__ import annotations

import pytest
import torch

from mtmerge._constants import DARE_KEEP_ONE
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import TRITON_DEVICE, assert_same, merge_scalars, rule, task_scalars, task_trim
from tests.ops.merge.triton_cases import (
    ALL_KNOBS,
    CASES,
    DARE_30,
    ELECT_CASES,
    SCALES,
    WEIGHTS,
    both_fused,
    case_id,
    fused_args,
    knob_grid,
    make_consensus,
    make_inputs,
    on,
    run_fused,
    trims,
    triton_merge,
)

pytestmark = pytest.mark.usefixtures("triton_kernels")


@pytest.mark.parametrize("case", CASES[1::2], ids=case_id)
def test_elect_sign_total(case):
    args = fused_args(case)
    for elect, weighted in ELECT_CASES[1:]:
        kwargs = dict(args, rule=rule(elect, weighted), index_offset=0)
        assert_same(triton_merge().elect_sign_total(**on(kwargs)).cpu(), ref.elect_sign_total(**kwargs))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == 1000], ids=case_id)
@pytest.mark.parametrize("dare", [True, False])
def test_merge_fused_all_knobs(case, dare):
    """Every elect / weighted / merge / divisor / zero_fill combination, bit for bit."""
    dtype = case[1]
    args = fused_args(case, "exact" if dare else "geq", dare=dare)
    for packed_rule, zero_fill in ALL_KNOBS if dare else ALL_KNOBS[::3]:
        assert_same(*both_fused(args, dtype, packed_rule, zero_fill))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != 1000], ids=case_id)
def test_merge_fused_sizes(case):
    """Odd sizes (0, 1, 7, several blocks) with a rotating subset of the knobs."""
    n, dtype = case[0], case[1]
    args = fused_args(case, "exact" if n % 2 else "geq")
    for packed_rule, zero_fill in ALL_KNOBS[n % 5 :: 7]:
        assert_same(*both_fused(args, dtype, packed_rule, zero_fill))


@pytest.mark.parametrize(("in_dtype", "out_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                     (torch.float16, torch.bfloat16), (torch.float32, torch.float16)])
def test_merge_fused_output_dtypes(in_dtype, out_dtype):
    args = fused_args((1000, in_dtype, True, True, "normal"))
    for packed_rule, zero_fill in knob_grid("sum", True)[:3]:
        assert_same(*both_fused(args, out_dtype, packed_rule, zero_fill, lam=1.7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_fused_without_base_in_output_and_task_offset(dtype):
    args = fused_args((1000, dtype, True, False, "normal"), task_offset=3)
    for packed_rule, zero_fill in ALL_KNOBS[::4]:
        no_base = [*packed_rule[:4], 0, packed_rule[5]]
        assert_same(*both_fused(args, dtype, no_base, zero_fill, index_offset=5))


def test_non_contiguous_inputs_and_output():
    n_rows, n_cols = 37, 29  # 1073 entries
    base, fts = make_inputs(0, torch.bfloat16, kind="ties", shape=(n_cols, n_rows))
    base, fts = base.T, [f.T for f in fts]  # row-major order of the views differs from storage
    assert not base.is_contiguous()
    cbase, cfts = base.contiguous(), [f.contiguous() for f in fts]
    n = base.numel()
    cons = make_consensus(n)
    K = triton_merge()
    for sel in ("exact", "geq"):
        ks = [n // 2, 3, n]
        got = K.delta_threshold(**on(dict(base=base, finetuned=fts, ks=ks, selection=sel, allow_nonfinite=False,
                                          consensus=cons)))
        want = ref.delta_threshold(cbase, cfts, ks, sel, False, cons)
        assert_same(got[0], want[0])
        assert_same(got[1], want[1])
    thresholds, cutoffs = ref.delta_threshold(cbase, cfts, [n // 2, 3, n], "exact")
    kwargs = dict(base=base, finetuned=fts, thresholds=thresholds, ties_kept=torch.tensor([1, 2, 3]), consensus=None)
    assert_same(K.tie_cutoffs(**on(kwargs)), ref.tie_cutoffs(**dict(kwargs, base=cbase, finetuned=cfts)))
    args = dict(task_scalars=task_scalars(WEIGHTS, SCALES),
                task_trim=task_trim(thresholds, cutoffs, seed=77, keep=[DARE_30, DARE_KEEP_ONE, DARE_30]),
                consensus=cons, rule=rule("sum", True, "mean", "weight"), merge_scalars=merge_scalars(0.9, 1.0),
                index_offset=0)
    out = torch.full((n_cols, n_rows), 7.0, dtype=torch.float16, device=TRITON_DEVICE).T  # non-contiguous output
    K.merge_fused(base=base.to(TRITON_DEVICE), finetuned=[f.to(TRITON_DEVICE) for f in fts], out=out, **on(args))
    want = torch.full((n_rows, n_cols), 7.0, dtype=torch.float16)
    ref.merge_fused(base=cbase, finetuned=cfts, out=want, **args)
    assert_same(out.cpu().contiguous(), want)
    merged = torch.randn(n_cols, n_rows).T
    kwargs = dict(base=base, finetuned=fts, merged=merged, lams=[0.5, 1.0, 2.0])
    assert_same(K.tall_masks(**on(kwargs)), ref.tall_masks(cbase, cfts, merged.contiguous(), [0.5, 1.0, 2.0]))


def test_merge_fused_in_place_into_base():
    base, fts = make_inputs(1000, torch.float32)
    thresholds, cutoffs = trims(base, fts, "exact")
    args = dict(task_scalars=task_scalars(WEIGHTS, SCALES), task_trim=task_trim(thresholds, cutoffs, seed=5,
                                                                                keep=[DARE_30] * 3),
                consensus=None, rule=rule("sum", False, "mean", "count"), merge_scalars=merge_scalars(0.5, 1.0),
                index_offset=0)
    want = torch.empty(1000)
    ref.merge_fused(base=base, finetuned=fts, out=want, **args)
    dev_base = base.to(TRITON_DEVICE)
    triton_merge().merge_fused(base=dev_base, finetuned=[f.to(TRITON_DEVICE) for f in fts], out=dev_base, **on(args))
    assert_same(dev_base, want)


def test_nonfinite_inputs_in_merge_fused():
    """check_finite=1 raises naming the input before anything is written (out aliasing base
    included); check_finite=0 lets NaN/Inf through exactly as the reference does."""
    base, fts = make_inputs(1000, torch.float32)
    thresholds, cutoffs = trims(base, fts, "exact")
    checked = rule("sum", False, "mean", "count", check_finite=True)
    for where, value, name in [(None, float("nan"), "base"), (2, float("inf"), r"finetuned\[2\]")]:
        b, f = base.clone(), [x.clone() for x in fts]
        (b if where is None else f[where])[999] = value
        args = dict(base=b, finetuned=f, task_scalars=task_scalars(WEIGHTS, SCALES),
                    task_trim=task_trim(thresholds, cutoffs, seed=77, keep=[DARE_30] * 3), consensus=None)
        for device, impl in ((TRITON_DEVICE, triton_merge().merge_fused), ("cpu", ref.merge_fused)):
            with pytest.raises(ValueError, match=rf"^{name} contains 1 NaN or Inf"):
                run_fused(impl, args, torch.float32, checked, device=device)
            dev_args = on(args, device)
            out = dev_args["base"] if where is None else torch.full((1000,), 7.0, device=device)
            before = out.clone()
            with pytest.raises(ValueError, match="NaN or Inf"):
                impl(**dev_args, rule=checked, merge_scalars=merge_scalars(1.0, 1.0, device), out=out, index_offset=0)
            assert_same(out, before)
        for packed_rule, zero_fill in knob_grid("sum", False) + knob_grid("count", True) + knob_grid("none", False):
            assert_same(*both_fused(args, torch.float32, packed_rule, zero_fill))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_task_arithmetic(dtype):
    """The differentiable op's Triton forward: bit-identical to the reference (and so to the
    linear merge_fused)."""
    base, fts = make_inputs(4099, dtype)
    kwargs = dict(base=base, finetuned=fts, weights=torch.tensor([1.0, -0.5, 2.0]), lam=torch.tensor(0.4))
    assert_same(triton_merge().task_arithmetic(**on(kwargs)), ref.task_arithmetic(**kwargs))
