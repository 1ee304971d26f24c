"""The Triton trim launchers (``delta_threshold``, ``tie_cutoffs``, ``magnitude_histogram``)
against the reference, bit for bit, including the NaN/Inf policy."""

from __future__ import annotations

import pytest
import torch

from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import DTYPES, assert_same, assert_same_pair
from tests.ops.merge.triton_cases import CASES, case_id, cpu, make_consensus, make_inputs, on, triton_merge

pytestmark = pytest.mark.usefixtures("triton_kernels")


def delta_threshold(base, fts, ks, selection="exact", allow_nonfinite=False, consensus=None):
    return cpu(triton_merge().delta_threshold(**on(dict(base=base, finetuned=fts, ks=ks, selection=selection,
                                                         allow_nonfinite=allow_nonfinite, consensus=consensus))))


def tie_cutoffs(**kwargs):
    return triton_merge().tie_cutoffs(**on(kwargs)).cpu()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_delta_threshold(case):
    n, dtype, with_base, with_cons, kind = case
    base, fts = make_inputs(n, dtype, kind=kind, with_base=with_base)
    cons = make_consensus(n) if with_cons else None
    for selection, ks in [("exact", [0, n // 3, max(n - 1, 0)]), ("geq", [min(1, n), n // 2, n])]:
        want = ref.delta_threshold(base, fts, ks, selection, False, cons)
        assert_same_pair(delta_threshold(base, fts, ks, selection, False, cons), want)


def test_delta_threshold_ties_in_later_blocks():
    """The kept ties end deep inside the data: the tie scan must find the right block."""
    n = 5000
    x = torch.zeros(n)
    x[::7] = 1.0
    x[4000:] = 2.0
    for k in (1000, 1001, 1500):  # 1000 entries are 2.0, the rest of the k are ties at 1.0
        want = ref.delta_threshold(None, [x, -x], [k, k + 3])
        assert_same_pair(delta_threshold(None, [x, -x], [k, k + 3]), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tie_cutoffs(dtype):
    n = 4099
    base, fts = make_inputs(n, dtype, kind="ties")
    cons = None if dtype == torch.float16 else make_consensus(n)
    thresholds = torch.tensor([0.25, 0.5, 0.0])  # magnitudes present many times
    for ties_kept in ([0, 1, 5], [-1, 400, 10**9], [1500, 2000, 17]):
        kwargs = dict(base=base, finetuned=fts, thresholds=thresholds, ties_kept=torch.tensor(ties_kept),
                      consensus=cons)
        assert_same(tie_cutoffs(**kwargs), ref.tie_cutoffs(**kwargs))
    # no tie at all: ties_kept <= 0 gives -1, else INT64_MAX ("all of them")
    kwargs = dict(base=base, finetuned=fts, thresholds=torch.tensor([123.0] * 3), ties_kept=torch.tensor([0, 1, -1]),
                  consensus=None)
    assert_same(tie_cutoffs(**kwargs), ref.tie_cutoffs(**kwargs))


def test_tie_cutoffs_empty():
    x = torch.zeros(0)
    for tk in ([0], [1], [-1]):
        kwargs = dict(base=None, finetuned=[x], thresholds=torch.tensor([0.0]), ties_kept=torch.tensor(tk),
                      consensus=None)
        assert_same(tie_cutoffs(**kwargs), ref.tie_cutoffs(**kwargs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_task_vectors_in_delta_threshold(dtype):
    base, fts = make_inputs(1000, dtype)
    fts[1][10] = float("nan")
    for impl in (ref.delta_threshold, delta_threshold):
        with pytest.raises(ValueError, match=r"finetuned\[1\]: its task vector has 1 NaN"):
            impl(base, fts, [5, 5, 5])
        with pytest.raises(ValueError, match=r"finetuned\[1\]: its task vector has 1 NaN"):
            impl(base, fts, [5, 5, 5], allow_nonfinite=True)
        with pytest.raises(ValueError, match=r"finetuned\[1\]: .* NaN"):
            impl(base, fts, [5, 5, 5], consensus=torch.full((125,), 255, dtype=torch.uint8))
    # NaN outside the consensus mask is not part of the task vector
    cons = torch.full((125,), 255, dtype=torch.uint8)
    cons[1] = 0  # entries 8..15
    assert_same_pair(delta_threshold(base, fts, [5, 500, 1000], consensus=cons),
                     ref.delta_threshold(base, fts, [5, 500, 1000], consensus=cons))
    fts[1][10] = float("-inf")
    for impl in (ref.delta_threshold, delta_threshold):
        with pytest.raises(ValueError, match=r"finetuned\[1\]: its task vector has 1 Inf .*allow_nonfinite=True"):
            impl(base, fts, [5, 5, 5])
    for sel in ("exact", "geq"):
        assert_same_pair(delta_threshold(base, fts, [1, 2, 1000], sel, True),
                         ref.delta_threshold(base, fts, [1, 2, 1000], sel, True))
    fts[1][10] = float("nan")
    for impl in (ref.tie_cutoffs, tie_cutoffs):
        with pytest.raises(ValueError, match=r"finetuned\[1\]: its task vector has 1 NaN"):
            impl(base=base, finetuned=fts, thresholds=torch.zeros(3), ties_kept=torch.ones(3, dtype=torch.int64),
                 consensus=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_histogram(dtype):
    n = 1003
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=gen).to(dtype)
    fts = [(base.float() + torch.randn(n, generator=gen) * 0.1).to(dtype) for _ in range(3)]
    cons = ref.pack_bits(torch.arange(n) % 5 != 0)
    for shift, bits, prefixes, prefix_shift in [(16, 15, [0, 0, 0], 31), (0, 16, [0x3C00, 0x3D00, 0x3E00], 16),
                                                (5, 11, [1, 2, 3], 31)]:
        for b, c in [(base, None), (None, cons), (base, cons)]:
            kwargs = dict(base=b, finetuned=fts, shift=shift, bits=bits, prefixes=prefixes, prefix_shift=prefix_shift,
                          consensus=c)
            assert torch.equal(triton_merge().magnitude_histogram(**on(kwargs)).cpu(),
                               ref.magnitude_histogram(**kwargs))
