"""DARE: the counter-based keep decisions (mtmerge/_rng.py + the per-entry hash), the public
``dare`` / ``dare_linear`` / ``dare_ties`` against the reference, the L1 rescale and chunking
with ``index_offset`` (the pipeline merges huge tensors in pieces)."""

from __future__ import annotations

import pytest
import torch

import mtmerge
from mtmerge import _constants as constants
from mtmerge import _rng
from mtmerge.ops.recipe import FLAVORS, resolve_knobs
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import (
    DTYPES,
    SIZE_KNOBS,
    assert_close,
    assert_same,
    flat_task_vectors,
    keep_all,
    make_models,
    merge_scalars,
    ref_dare_merge,
    rule,
    sample,
    task_scalars,
    task_trim,
)

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def _py_fmix32(x):
    """MurmurHash3's fmix32 on Python ints, written out again (not mtmerge._rng's)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_dare_hash_is_the_documented_formula():
    assert _py_fmix32(1) == 0x514E28B7 and _py_fmix32(0) == 0  # MurmurHash3's known values
    assert all(_rng.fmix32(x) == _py_fmix32(x) for x in (0, 1, 2**31, 2**32 - 1, 12345))
    index = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3])
    for seed, task in [(0, 0), (1234, 3), (2**62 + 5, 1)]:
        key = _py_fmix32(_py_fmix32(_py_fmix32(task + 0x9E3779B9) ^ (seed >> 32)) ^ (seed & 0xFFFFFFFF))
        assert _rng.dare_task_key(seed, task) == key
        want = [_py_fmix32(_py_fmix32((i & 0xFFFFFFFF) ^ key) ^ (i >> 32) ^ constants.DARE_HIGH_WORD_SALT) >> 8
                for i in index.tolist()]
        assert ref.dare_hash(index, key).tolist() == want
    assert _rng.dare_keep_threshold(0.0) == 0 and _rng.dare_keep_threshold(1.0) == 2**24 == constants.DARE_KEEP_ONE
    assert _rng.dare_keep_threshold(0.3) == round(0.3 * 2**24)


@pytest.mark.parametrize(("dtype", "n"), [(torch.float32, 70001), (torch.bfloat16, 4099), (torch.float16, 4099)])
def test_dare_masks_are_the_reference_hash(dtype, n):
    tvs = [(sample(n, seed=600 + t) + 0.01).to(dtype) for t in range(3)]
    tvs = [torch.where(tv == 0, torch.ones_like(tv), tv) for tv in tvs]  # every entry nonzero
    densities = [0.1, 0.5, 0.9]
    out = mtmerge.dare(tvs, densities, seed=1234)
    again = mtmerge.dare(tvs, densities, seed=1234)
    other = mtmerge.dare(tvs, densities, seed=1235)
    for t, (tv, d) in enumerate(zip(tvs, densities, strict=True)):
        mask = ref.dare_keep_mask(n, 1234, t, _rng.dare_keep_threshold(d))
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
        assert torch.equal(kept, ref.dare_keep_mask(20001, 7, t, _rng.dare_keep_threshold(densities[t])))
        assert out[t].abs().double().sum().item() == pytest.approx(tv.abs().double().sum().item(), rel=1e-5)
        ratio = out[t][kept] / tv[kept]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-6)  # one scale per task
    # the op gives sum|tau| and sum|kept tau| in float64 (summed in another order: 1e-12)
    keep = [_rng.dare_keep_threshold(d) for d in densities]
    trim = task_trim(*keep_all(3), seed=7, keep=keep)
    got = torch.ops.mtmerge.dare_abs_sums(base=None, finetuned=tvs, task_trim=trim, index_offset=0)
    want = ref.dare_abs_sums(None, tvs, trim, 0)
    assert got.dtype == torch.float64 and got.shape == (3, 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    masks = [ref.dare_keep_mask(20001, 7, t, keep[t]) for t in range(3)]
    first = torch.tensor([[tv.abs().double().sum(), tv.abs().double()[m].sum()] for tv, m in zip(tvs, masks,
                                                                                                  strict=True)])
    torch.testing.assert_close(want, first, rtol=1e-9, atol=1e-9)


def test_dare_rescale_none_keeps_the_kept_entries_as_they_are():
    """rescale="none" (mergekit's ``rescale: false``): DARE only drops entries."""
    base, fts = make_models(4001, 2, seed=920)
    tvs = flat_task_vectors(base, fts)
    dropped = mtmerge.dare(tvs, [0.3, 0.6], seed=4, rescale="none")
    for t, (tv, d) in enumerate(zip(tvs, dropped, strict=True)):
        keep = ref.dare_keep_mask(4001, 4, t, _rng.dare_keep_threshold([0.3, 0.6][t]))
        assert torch.equal(d, torch.where(keep, tv, torch.zeros_like(tv)))
    with pytest.raises(ValueError, match="rescale"):
        mtmerge.dare(tvs, 0.3, seed=4, rescale="l2")


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
    assert_same(got, ref_dare_merge(None, tvs, densities, [w / 4.5 for w in weights], 1.0, None, 11, rescale))
    # through ties_merge: sparsify="dare" with a linear merge is not offered; a TIES one is
    got = mtmerge.ties_merge(base, fts, densities, weights, lam=0.5, sparsify="dare", seed=11, rescale=rescale)
    assert_same(got, ref_dare_merge(base, fts, densities, weights, 0.5, FLAVORS["peft"], 11, rescale))


@pytest.mark.parametrize("rescale", ["inverse", "l1"])
@pytest.mark.parametrize(("flavor", "knobs"), SIZE_KNOBS)
def test_dare_ties(rescale, flavor, knobs):
    base, fts = make_models(3001, 3, seed=630)
    tvs = flat_task_vectors(base, fts)
    densities, weights = [0.3, 0.6, 0.9], [1.0, 0.5, 2.0]
    knobs = {k: v for k, v in knobs.items() if k != "selection"}  # DARE replaces the trim
    got = mtmerge.dare_ties(tvs, densities, weights, seed=5, rescale=rescale, flavor=flavor, **knobs)
    resolved = resolve_knobs(flavor, **knobs)
    assert_same(got, ref_dare_merge(None, tvs, densities, weights, 1.0, resolved, 5, rescale))
    # = TIES without a trim on the DARE'd task vectors
    dropped = mtmerge.dare(tvs, densities, seed=5, rescale=rescale)
    trimless = {k: v for k, v in resolved._asdict().items() if k not in ("selection", "k_rule")}
    assert_close(got, mtmerge.ties(dropped, 1.0, weights, **trimless))
    got = mtmerge.ties_merge(base, fts, densities, weights, lam=1.3, sparsify="dare", seed=5, rescale=rescale,
                             flavor=flavor, **knobs)
    assert_same(got, ref_dare_merge(base, fts, densities, weights, 1.3, resolved, 5, rescale))


@pytest.mark.parametrize("with_base", [True, False])
def test_dare_index_offset_makes_chunks_match_the_whole(with_base):
    """merge_fused / dare_abs_sums / elect_sign_total on chunks with index_offset = chunk start
    give exactly the whole tensor's DARE masks (the pipeline merges huge tensors in chunks)."""
    n, count = 10007, 3
    base, fts = make_models(n, count, seed=77)
    b = base if with_base else None
    keep = [_rng.dare_keep_threshold(d) for d in (0.2, 0.5, 0.8)]
    trim = task_trim(*keep_all(count), seed=11, keep=keep)
    scalars = task_scalars([1.0, 0.5, 2.0], [1.0, 2.0, 5.0])
    fused = dict(task_scalars=scalars, task_trim=trim, consensus=None, rule=rule("sum", False, "mean", "count"),
                 merge_scalars=merge_scalars(0.7, 1.0))

    def piece(x, start, stop):
        return None if x is None else x[start:stop]

    whole = torch.empty(n)
    torch.ops.mtmerge.merge_fused(base=b, finetuned=fts, out=whole, **fused)
    pieces = []
    for start, stop in [(0, 4096), (4096, 5000), (5000, n)]:
        part = torch.empty(stop - start)
        args = dict(base=piece(b, start, stop), finetuned=[f[start:stop] for f in fts], index_offset=start, **fused)
        torch.ops.mtmerge.merge_fused(out=part, **args)
        want = torch.empty(stop - start)
        ref.merge_fused(out=want, **args)
        assert_same(part, want)
        pieces.append(part)
    assert_same(torch.cat(pieces), whole)
    sums = sum(torch.ops.mtmerge.dare_abs_sums(base=piece(b, s, e), finetuned=[f[s:e] for f in fts], task_trim=trim,
                                               index_offset=s)
               for s, e in [(0, 5000), (5000, n)])
    torch.testing.assert_close(sums, ref.dare_abs_sums(b, fts, trim), rtol=1e-12, atol=0)
    ones = task_scalars([1.0] * 3)
    total = sum(int(torch.ops.mtmerge.elect_sign_total(base=piece(b, s, e), finetuned=[f[s:e] for f in fts],
                                                       task_scalars=ones, task_trim=trim, consensus=None,
                                                       rule=rule("sum"), index_offset=s))
                for s, e in [(0, 3000), (3000, n)])
    assert total == int(ref.elect_sign_total(b, fts, ones, trim, None, rule("sum")))
