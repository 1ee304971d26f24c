"""The merge family's building blocks called directly (``torch.ops.mtmerge.*`` on CPU tensors,
the C++ kernels) against their reference functions, bit for bit: every op promises a fixed
sequence of float32 operations (float64 sums of ``dare_abs_sums`` excepted: 1e-12), so a kernel
that rounds differently fails here. ``merge_fused`` over every knob, dtype, layout and DARE;
``task_arithmetic`` equal to the linear ``merge_fused``; same bits for 1 and 2 threads."""

from __future__ import annotations

import itertools

import pytest
import torch

import mtmerge
from mtmerge import _rng
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import (
    DTYPES,
    assert_same,
    flat_task_vectors,
    keep_all,
    make_models,
    merge_scalars,
    rule,
    task_scalars,
    task_trim,
)
from tests.ops.merge.op_cases import op_cases

pytestmark = pytest.mark.usefixtures("cpp_kernels")

WEIGHTS = [0.7, 1.3, -0.4]
SCALES = [1.0, 1 / 0.3, 1.25]
ELECT_CASES = [("none", False), ("sum", False), ("sum", True), ("count", False), ("count", True)]


def _outputs(result):
    return result if isinstance(result, (tuple, list)) else (result,)


@pytest.mark.parametrize("name", sorted(op_cases()))
def test_op_matches_the_reference(name):
    """Each op on CPU tensors against the reference function, the same keyword arguments."""
    op = getattr(torch.ops.mtmerge, name)
    reference = getattr(ref, name)
    for kwargs in op_cases()[name]:
        if "out" in kwargs:
            got_out, want_out = torch.full_like(kwargs["out"], 7.0), torch.full_like(kwargs["out"], 7.0)
            op(**{**kwargs, "out": got_out})
            reference(**{**kwargs, "out": want_out})
            assert_same(got_out, want_out)
            continue
        got, want = _outputs(op(**kwargs)), _outputs(reference(**kwargs))
        for g, w in zip(got, want, strict=True):
            if w.dtype == torch.float64:
                assert g.dtype == w.dtype and g.shape == w.shape
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
            else:
                assert_same(g, w)


def make_case(n, dtype, with_base, with_cons, dare, selection="exact", seed=0):
    gen = torch.Generator().manual_seed(seed)
    base, fts = make_models(n, 3, dtype, seed=seed, kind="few_values" if seed % 2 else "normal")
    b = base if with_base else None
    cons = ref.pack_bits(torch.rand(n, generator=gen) < 0.6) if with_cons else None
    ks = [n // 2, n // 5, n] if selection == "exact" else [n // 3, 1, n]
    thr, cut = ref.delta_threshold(b, fts, ks, selection, False, cons)
    keep = [_rng.dare_keep_threshold(d) for d in (0.3, 1.0, 0.8)] if dare else None
    return dict(base=b, finetuned=fts, task_scalars=task_scalars(WEIGHTS, SCALES),
                task_trim=task_trim(thr, cut, seed=77, keep=keep), consensus=cons)


def knob_grid(elect, weighted):
    if elect == "none":
        return [rule("none", weighted, "sum", "count")]
    return [rule(elect, weighted, m, d) for m, d in itertools.product(("mean", "sum", "max"), ("count", "weight"))
            if m == "mean" or d == "count"]


CASES = [(n, dtype, with_base, with_cons, dare) for n, dtype, (with_base, with_cons, dare) in zip(
    [1, 7, 1000, 4099] * 3, [d for d in DTYPES for _ in range(4)],
    itertools.cycle([(True, False, True), (False, True, False), (True, True, True)]), strict=False)]


@pytest.mark.parametrize(("n", "dtype", "with_base", "with_cons", "dare"), CASES)
def test_merge_fused_every_knob(n, dtype, with_base, with_cons, dare):
    """Every elect / weighted / merge / divisor / zero fill / lam, C++ = reference bit for bit."""
    case = make_case(n, dtype, with_base, with_cons, dare, "exact" if n % 2 else "geq", seed=n)
    for elect, weighted in ELECT_CASES:
        for packed_rule in knob_grid(elect, weighted):
            for fill, lam in [(1.0, 0.9), (-1.0, 1.0), (0.0, 1.7)]:
                args = dict(case, rule=packed_rule, merge_scalars=merge_scalars(lam, fill))
                got, want = torch.full((n,), 7.0, dtype=dtype), torch.full((n,), 7.0, dtype=dtype)
                torch.ops.mtmerge.merge_fused(out=got, **args)
                ref.merge_fused(out=want, **args)
                assert_same(got, want)
        if elect != "none":
            args = dict(case, rule=rule(elect, weighted))
            assert_same(torch.ops.mtmerge.elect_sign_total(**args), ref.elect_sign_total(**args))


@pytest.mark.parametrize(("in_dtype", "out_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                     (torch.float16, torch.bfloat16), (torch.float32, torch.float16)])
def test_merge_fused_output_dtypes_without_base_and_offsets(in_dtype, out_dtype):
    case = make_case(1000, in_dtype, True, True, True, seed=3)
    for packed_rule in [*knob_grid("sum", True)[:3], rule("count", False, "mean", "weight", with_base=False)]:
        for index_offset in (0, 2**33 + 5):
            args = dict(case, rule=packed_rule, merge_scalars=merge_scalars(1.7, 1.0), index_offset=index_offset)
            got, want = torch.empty(1000, dtype=out_dtype), torch.empty(1000, dtype=out_dtype)
            torch.ops.mtmerge.merge_fused(out=got, **args)
            ref.merge_fused(out=want, **args)
            assert_same(got, want)


def test_merge_fused_non_contiguous_and_in_place():
    base2d, fts2d = make_models(37 * 29, 3, torch.bfloat16, seed=5, shape=(29, 37))
    base, fts = base2d.T, [f.T for f in fts2d]
    thr, cut = ref.delta_threshold(base.contiguous(), [f.contiguous() for f in fts], [500, 3, 1073], "exact")
    args = dict(task_scalars=task_scalars(WEIGHTS, SCALES), task_trim=task_trim(thr, cut), consensus=None,
                rule=rule("sum", True, "mean", "weight"), merge_scalars=merge_scalars(0.9, 1.0))
    out = torch.full((29, 37), 7.0, dtype=torch.float16).T  # a non-contiguous output
    torch.ops.mtmerge.merge_fused(base=base, finetuned=fts, out=out, **args)
    want = torch.empty(37, 29, dtype=torch.float16)
    ref.merge_fused(base=base.contiguous(), finetuned=[f.contiguous() for f in fts], out=want, **args)
    assert_same(out.contiguous(), want)
    # out aliasing base: every entry reads base before it is written
    b32, f32 = make_models(1000, 3, seed=6)
    want = torch.empty(1000)
    ref.merge_fused(base=b32, finetuned=f32, out=want, **dict(args, task_trim=task_trim(*keep_all(3))))
    torch.ops.mtmerge.merge_fused(base=b32, finetuned=f32, out=b32, **dict(args, task_trim=task_trim(*keep_all(3))))
    assert_same(b32, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_op_is_the_linear_merge_fused(dtype):
    """task_arithmetic's float32 path is bit-identical to merge_fused's linear merge (PLAN.md)."""
    base, fts = make_models(4099, 4, dtype, seed=7)
    weights, lam = [1.0, 0.0, -0.5, 2.0], 0.4
    got = torch.ops.mtmerge.task_arithmetic(base=base, finetuned=fts, weights=torch.tensor(weights),
                                            lam=torch.tensor(lam))
    assert got.dtype == dtype and got.shape == base.shape
    linear = torch.empty_like(base)
    torch.ops.mtmerge.merge_fused(base=base, finetuned=fts, task_scalars=task_scalars(weights),
                                  task_trim=task_trim(*keep_all(4)), consensus=None, rule=rule("none", False, "sum"),
                                  merge_scalars=merge_scalars(lam, 1.0), out=linear)
    assert_same(got, linear)
    assert_same(got, ref.task_arithmetic(base, fts, torch.tensor(weights), torch.tensor(lam)))
    assert_same(mtmerge.task_arithmetic(base, fts, weights, lam=lam), got)


def test_same_bits_with_one_and_two_threads():
    n = 2**17 + 3
    base, fts = make_models(n, 3, torch.bfloat16, seed=650)
    base32, fts32 = make_models(n, 3, seed=651)
    tvs = flat_task_vectors(base32, fts32)
    trim = task_trim(*keep_all(3), seed=3, keep=[_rng.dare_keep_threshold(0.4)] * 3)
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
            mtmerge.task_arithmetic(base, fts, [1.0, 0.5, 2.0], lam=0.3),
            masks,
            mtmerge.consensus_mask(masks, 2),
            torch.ops.mtmerge.dare_abs_sums(base=None, finetuned=tvs, task_trim=trim, index_offset=0),
            torch.ops.mtmerge.elect_sign_total(base=base, finetuned=fts, task_scalars=task_scalars([1.0] * 3),
                                               task_trim=trim, consensus=None, rule=rule("count", False)),
        ])
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)
