"""TIES through the public API against the reference composed as the pipeline composes it (bit
for bit: the C++ kernels promise the reference's fixed sequence of float32 operations), and the
reference against an independent oracle of DESIGN.md's text: every knob combination, dtypes,
sizes, layouts and ``out=``."""

from __future__ import annotations

import pytest
import torch

import mtmerge
from mtmerge.ops.recipe import FLAVORS, TiesKnobs, resolve_knobs
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import (
    DEVICES,
    DTYPES,
    FLAVOR_NAMES,
    KNOB_VALUES,
    SIZE_KNOBS,
    assert_close,
    assert_same,
    flat_task_vectors,
    k_for,
    make_models,
    oracle_ties,
    ref_ties_merge,
)

pytestmark = pytest.mark.usefixtures("cpp_kernels")


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
    assert_same(got, want)
    # the reference against the oracle (k: 0.003 * 301 rounds down to 0; mergekit keeps 1)
    ks = [k_for(d, 301, resolved.k_rule) for d in densities]
    oracle = base + 0.7 * oracle_ties(flat_task_vectors(base, fts), ks, weights, resolved)
    assert_close(want, oracle)


def check_ties_merge(base, fts, flavor, knobs, with_task_vectors=True, device="cpu"):
    """ties_merge / ties on ``device`` against the reference on CPU, bit for bit; the trim's
    selection pass (delta_threshold) too."""
    dtype, numel = base.dtype, base.numel()
    densities, weights = [0.2, 0.5, 0.9], [1.0, 0.5, 2.0]
    resolved = resolve_knobs(flavor, **knobs)
    ks = [k_for(d, numel, resolved.k_rule) for d in densities]
    dev_base, dev_fts = base.to(device), [f.to(device) for f in fts]
    got_thr, got_cut = torch.ops.mtmerge.delta_threshold(base=dev_base, finetuned=dev_fts, ks=ks,
                                                         selection=resolved.selection, allow_nonfinite=False,
                                                         consensus=None)
    want_thr, want_cut = ref.delta_threshold(base, fts, ks, resolved.selection, False, None)
    assert torch.equal(got_thr.cpu(), want_thr) and torch.equal(got_cut.cpu(), want_cut)
    got = mtmerge.ties_merge(dev_base, dev_fts, densities, weights, lam=0.8, flavor=flavor, **knobs)
    assert got.dtype == dtype and got.shape == base.shape and got.is_contiguous() and got.device.type == device
    assert_same(got, ref_ties_merge(base, fts, densities, weights, 0.8, resolved))
    if with_task_vectors:
        tvs = [(f.float() - base.float()).to(dtype) for f in fts]
        got = mtmerge.ties([tv.to(device) for tv in tvs], densities, weights, flavor=flavor, **knobs)
        assert_same(got, ref_ties_merge(None, tvs, densities, weights, 1.0, resolved))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 7, 1023])
@pytest.mark.parametrize(("flavor", "knobs"), SIZE_KNOBS)
def test_ties_merge_dtypes_and_sizes(device, dtype, numel, flavor, knobs):
    base, fts = make_models(numel, 3, dtype, seed=numel)
    check_ties_merge(base, fts, flavor, knobs, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "flavor", "knobs"), [(torch.float32, *SIZE_KNOBS[3]),
                                                        (torch.bfloat16, *SIZE_KNOBS[1]),
                                                        (torch.float16, *SIZE_KNOBS[2])])
def test_ties_merge_large(device, dtype, flavor, knobs):
    base, fts = make_models(70001, 3, dtype, seed=70001)
    check_ties_merge(base, fts, flavor, knobs, with_task_vectors=False, device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flavor", ["peft", "mergekit", "paper"])
def test_many_ties_in_low_precision(dtype, flavor):
    base, fts = make_models(5001, 3, dtype, seed=501, kind="few_values")
    for densities in ([0.1, 0.37, 0.8], [0.0, 1.0, 0.5]):
        resolved = FLAVORS[flavor]
        ks = [k_for(d, 5001, resolved.k_rule) for d in densities]
        got_thr, got_cut = torch.ops.mtmerge.delta_threshold(base=base, finetuned=fts, ks=ks,
                                                             selection=resolved.selection, allow_nonfinite=False,
                                                             consensus=None)
        want_thr, want_cut = ref.delta_threshold(base, fts, ks, resolved.selection, False, None)
        assert torch.equal(got_thr, want_thr) and torch.equal(got_cut, want_cut)
        got = mtmerge.ties_merge(base, fts, densities, [1.0, 0.0, 2.0], lam=1.5, flavor=flavor)
        assert_same(got, ref_ties_merge(base, fts, densities, [1.0, 0.0, 2.0], 1.5, resolved))
        got = mtmerge.ties_merge(base, fts, densities, [1.0, 0.0, 2.0], lam=1.5, flavor=flavor, merge="max")
        assert_same(got, ref_ties_merge(base, fts, densities, [1.0, 0.0, 2.0], 1.5, resolved._replace(merge="max")))


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
            assert_same(got, ref_ties_merge(cbase, cfts, [0.3, 0.5, 0.1], [1.0, 2.0, 0.5], 0.9, FLAVORS[flavor]))
        got = mtmerge.task_arithmetic(base, fts, [1.0, 2.0, 0.5], lam=0.9)
        want = cbase.float() + 0.9 * sum(w * (f.float() - cbase.float()) for w, f in zip([1.0, 2.0, 0.5], cfts,
                                                                                      strict=True))
        assert_close(got, want.to(dtype))
        assert_same(got, ref.task_arithmetic(cbase, cfts, torch.tensor([1.0, 2.0, 0.5]), torch.tensor(0.9)))
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
    assert_same(got, want)
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
    assert_same(zero, ref_ties_merge(base, fts, [0.0] * 3, weights, 1.0, FLAVORS[flavor]))
    one = mtmerge.ties_merge(base, fts, 1.0, weights, flavor=flavor)
    knobs = FLAVORS[flavor]
    assert_close(one, base + oracle_ties(tvs, [257] * 3, weights, knobs))
    assert_same(one, ref_ties_merge(base, fts, [1.0] * 3, weights, 1.0, knobs))


@pytest.mark.parametrize("device", DEVICES)
def test_task_arithmetic_matches_the_formula(device):
    for dtype in DTYPES:
        base, fts = make_models(3001, 4, dtype, seed=505)
        weights = [1.0, 0.0, -0.5, 2.0]
        got = mtmerge.task_arithmetic(base.to(device), [f.to(device) for f in fts], weights, lam=0.4)
        assert got.device.type == device
        want = base.float() + 0.4 * sum(w * (f.float() - base.float()) for w, f in zip(weights, fts, strict=True))
        assert_close(got, want.to(dtype))
        assert_same(got, ref.task_arithmetic(base, fts, torch.tensor(weights), torch.tensor(0.4)))
