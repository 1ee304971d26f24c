"""TALL masks and Consensus: ``tall_masks`` / ``consensus_mask`` / ``consensus_merge`` against
numpy's ``packbits(bitorder="little")`` and the reference, bit for bit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import mtmerge
from mtmerge.ops.recipe import FLAVORS, resolve_knobs
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import DTYPES, assert_close, assert_same, flat_task_vectors, make_models, ref_ties_merge

pytestmark = pytest.mark.usefixtures("cpp_kernels")


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
    direct = torch.ops.mtmerge.tall_masks(base=None, finetuned=tvs_in, merged=mtl.to(dtype), lams=[0.4] * 4)
    assert torch.equal(direct, got)


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
        got = torch.ops.mtmerge.consensus_mask(masks=raw, k=k)
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
        assert_same(got, want)
    # ties_merge with the consensus given
    got = mtmerge.ties_merge(base, fts, 0.5, weights, consensus=cons)
    assert_same(got, ref_ties_merge(base, fts, [0.5] * 3, weights, 1.0, FLAVORS["peft"], consensus=cons))
