"""The trim's building blocks on CPU (the C++ kernels) against the reference, bit for bit:
``delta_threshold`` (per-task threshold and tie cut-off of ``finetuned[t] - base``),
``tie_cutoffs`` and ``magnitude_histogram`` (the pipeline's streaming top-k), with odd sizes,
heavy ties, consensus masks and the NaN/Inf policy."""

from __future__ import annotations

import itertools

import pytest
import torch

from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import DTYPES, assert_same, assert_same_pair, make_models

pytestmark = pytest.mark.usefixtures("cpp_kernels")

SIZES = [0, 1, 7, 1000, 4099]
CASES = [
    (n, dtype, with_base, with_cons, kind)
    for i, (n, dtype) in enumerate(itertools.product(SIZES, DTYPES))
    for with_base, with_cons, kind in [[(True, False, "few_values"), (False, True, "normal"),
                                        (True, True, "few_values")][i % 3]]
]


def case_id(case):
    n, dtype, with_base, with_cons, kind = case
    return f"n{n}-{str(dtype)[6:]}-{'base' if with_base else 'nobase'}-{'cons' if with_cons else 'nocons'}-{kind}"


def make_consensus(n, seed=1, p=0.6):
    gen = torch.Generator().manual_seed(seed)
    return ref.pack_bits(torch.rand(n, generator=gen) < p)


def delta_threshold(base, fts, ks, selection="exact", allow_nonfinite=False, consensus=None):
    return torch.ops.mtmerge.delta_threshold(base=base, finetuned=fts, ks=ks, selection=selection,
                                             allow_nonfinite=allow_nonfinite, consensus=consensus)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_delta_threshold(case):
    n, dtype, with_base, with_cons, kind = case
    base, fts = make_models(n, 3, dtype, seed=n, kind=kind)
    base = base if with_base else None
    cons = make_consensus(n) if with_cons else None
    for selection, ks in [("exact", [0, n // 3, max(n - 1, 0)]), ("geq", [min(1, n), n // 2, n])]:
        assert_same_pair(delta_threshold(base, fts, ks, selection, False, cons),
                         ref.delta_threshold(base, fts, ks, selection, False, cons))


def test_delta_threshold_ties_in_later_blocks():
    """The kept ties end deep inside the data: the tie scan must find the right block."""
    n = 5000
    x = torch.zeros(n)
    x[::7] = 1.0
    x[4000:] = 2.0
    for k in (1000, 1001, 1500):  # 1000 entries are 2.0, the rest of the k are ties at 1.0
        assert_same_pair(delta_threshold(None, [x, -x], [k, k + 3]), ref.delta_threshold(None, [x, -x], [k, k + 3]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tie_cutoffs(dtype):
    n = 4099
    base, fts = make_models(n, 3, dtype, seed=3, kind="few_values")
    cons = None if dtype == torch.float16 else make_consensus(n)
    thresholds = torch.tensor([0.25, 0.5, 0.0])  # magnitudes present many times
    for ties_kept in ([0, 1, 5], [-1, 400, 10**9], [1500, 2000, 17]):
        kwargs = dict(base=base, finetuned=fts, thresholds=thresholds, ties_kept=torch.tensor(ties_kept),
                      consensus=cons)
        assert_same(torch.ops.mtmerge.tie_cutoffs(**kwargs), ref.tie_cutoffs(**kwargs))
    # no tie at all: ties_kept <= 0 gives -1, else INT64_MAX ("all of them")
    kwargs = dict(base=base, finetuned=fts, thresholds=torch.tensor([123.0] * 3), ties_kept=torch.tensor([0, 1, -1]),
                  consensus=None)
    assert_same(torch.ops.mtmerge.tie_cutoffs(**kwargs), ref.tie_cutoffs(**kwargs))
    empty = dict(base=None, finetuned=[torch.zeros(0)], thresholds=torch.tensor([0.0]), consensus=None)
    for tk in ([0], [1], [-1]):
        assert_same(torch.ops.mtmerge.tie_cutoffs(ties_kept=torch.tensor(tk), **empty),
                    ref.tie_cutoffs(ties_kept=torch.tensor(tk), **empty))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_task_vectors_in_delta_threshold(dtype):
    """NaN is always an error naming the task; Inf is one unless allow_nonfinite; entries
    outside the consensus mask are not part of the task vector."""
    base, fts = make_models(1000, 3, dtype, seed=4)
    fts[1][10] = float("nan")
    for impl in (delta_threshold, ref.delta_threshold):
        with pytest.raises(ValueError, match=r"finetuned\[1\].* 1 NaN"):
            impl(base, fts, [5, 5, 5])
        with pytest.raises(ValueError, match=r"finetuned\[1\].* 1 NaN"):
            impl(base, fts, [5, 5, 5], allow_nonfinite=True)
        with pytest.raises(ValueError, match=r"finetuned\[1\].* NaN"):
            impl(base, fts, [5, 5, 5], consensus=torch.full((125,), 255, dtype=torch.uint8))
    cons = torch.full((125,), 255, dtype=torch.uint8)
    cons[1] = 0  # entries 8..15
    assert_same_pair(delta_threshold(base, fts, [5, 500, 1000], consensus=cons),
                     ref.delta_threshold(base, fts, [5, 500, 1000], consensus=cons))
    fts[1][10] = float("-inf")
    for impl in (delta_threshold, ref.delta_threshold):
        with pytest.raises(ValueError, match=r"finetuned\[1\].* 1 Inf.*allow_nonfinite=True"):
            impl(base, fts, [5, 5, 5])
    for sel in ("exact", "geq"):
        assert_same_pair(delta_threshold(base, fts, [1, 2, 1000], sel, True),
                         ref.delta_threshold(base, fts, [1, 2, 1000], sel, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_histogram_finds_the_exact_threshold(dtype):
    """Two magnitude_histogram calls (top 15 bits, then the low 16 bits inside the chosen bin)
    find delta_threshold's exact threshold, over chunks summed; same bits for 1 and 2 threads."""
    n, k = 2**18 + 5, 40000
    base, fts = make_models(n, 2, dtype, seed=910)
    want_thr, _ = ref.delta_threshold(base, fts, [k, k], "exact")

    def histogram(a, b, **kwargs):
        return torch.ops.mtmerge.magnitude_histogram(base=base[a:b], finetuned=[f[a:b] for f in fts], consensus=None,
                                                     **kwargs)

    for threads in (1, 2):
        torch.set_num_threads(threads)
        chunks = [(0, 100003), (100003, n)]
        hi = sum(histogram(a, b, shift=16, bits=15, prefixes=[0, 0], prefix_shift=31) for a, b in chunks)
        assert torch.equal(hi, ref.magnitude_histogram(base, fts, 16, 15, [0, 0]))
        bins, ranks = [], []
        for t in range(2):
            above = torch.flip(hi[t], [0]).cumsum(0)
            j = int(torch.searchsorted(above, torch.tensor([k])))
            bins.append(2**15 - 1 - j)
            ranks.append(k - (int(above[j - 1]) if j else 0))
        lo = sum(histogram(a, b, shift=0, bits=16, prefixes=bins, prefix_shift=16) for a, b in chunks)
        assert torch.equal(lo, ref.magnitude_histogram(base, fts, 0, 16, bins, 16))
        for t in range(2):
            above = torch.flip(lo[t], [0]).cumsum(0)
            j = int(torch.searchsorted(above, torch.tensor([ranks[t]])))
            key = (bins[t] << 16) | (2**16 - 1 - j)
            assert key == int(want_thr[t:t + 1].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_histogram_with_consensus(dtype):
    n = 1003
    base, fts = make_models(n, 3, dtype, seed=911)
    cons = ref.pack_bits(torch.arange(n) % 5 != 0)
    for args in [(16, 15, [0, 0, 0], 31), (0, 16, [0x3C00, 0x3D00, 0x3E00], 16), (5, 11, [1, 2, 3], 31)]:
        for b, c in [(base, None), (None, cons), (base, cons)]:
            kwargs = dict(base=b, finetuned=fts, shift=args[0], bits=args[1], prefixes=args[2], prefix_shift=args[3],
                          consensus=c)
            assert torch.equal(torch.ops.mtmerge.magnitude_histogram(**kwargs), ref.magnitude_histogram(**kwargs))
