"""Exact top-k magnitude selection (``magnitude_threshold`` / ``threshold_mask`` / ``topk_mask``):
every backend against the reference, and the reference against first principles.

Backends: "cpu" = torch.ops.mtmerge on CPU tensors (the C++ kernel), "triton" = the Triton
launchers (compiled on a GPU, else the interpreter on CPU tensors), "reference" =
mtmerge.reference. The C++ fast path (sampled window) and its fall-backs:
test_select_fallbacks.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtmerge
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import DEVICES, DTYPES, TRITON_DEVICE, assert_triton_backend

SELECTIONS = ["exact", "geq"]

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def _triton():
    pytest.importorskip("triton")
    assert_triton_backend()
    from mtmerge.kernels import merge as triton_merge

    return triton_merge


def run_threshold(backend, xs, k, selection):
    if backend == "cpu":
        xs = [x.cpu() for x in xs]
        return torch.ops.mtmerge.magnitude_threshold(xs=xs, k=k, selection=selection)
    if backend == "triton":
        xs = [x.to(TRITON_DEVICE) for x in xs]
        return tuple(r.cpu() for r in _triton().magnitude_threshold(xs=xs, k=k, selection=selection))
    return ref.magnitude_threshold(xs, k, selection)


def run_mask(backend, xs, threshold, ties_kept, selection, packed=False):
    if backend == "cpu":
        return torch.ops.mtmerge.threshold_mask(xs=xs, threshold=threshold, ties_kept=ties_kept, selection=selection,
                                                packed=packed)
    if backend == "triton":
        dev = TRITON_DEVICE
        masks = _triton().threshold_mask(xs=[x.to(dev) for x in xs], threshold=threshold.to(dev),
                                         ties_kept=ties_kept.to(dev), selection=selection, packed=packed)
        return [m.cpu() for m in masks]
    return ref.threshold_mask(xs, threshold, ties_kept, selection, packed)


def sample(numel, dtype, seed=0, kind="normal"):
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(numel, generator=gen)
    elif kind == "few_values":  # heavy ties: a handful of distinct magnitudes, both signs
        x = torch.randint(-4, 5, (numel,), generator=gen).float() * 0.5
    else:
        raise ValueError(kind)
    return x.to(dtype)


def k_values(n):
    return sorted({0, 1, n // 5, n // 2, max(n - 1, 0), n} & set(range(n + 1)))


def assert_same_selection(backend, xs, k, selection):
    """Threshold, tie count, bool masks and packed masks equal the reference bit for bit."""
    want_t, want_ties = ref.magnitude_threshold(xs, k, selection)
    got_t, got_ties = run_threshold(backend, xs, k, selection)
    assert got_t.dtype == xs[0].dtype and got_t.shape == ()
    assert got_ties.dtype == torch.int64 and got_ties.shape == ()
    assert torch.equal(got_t, want_t), (got_t, want_t)
    assert int(got_ties) == int(want_ties)
    want_masks = ref.threshold_mask(xs, want_t, want_ties, selection)
    for packed in (False, True):
        got_masks = run_mask(backend, xs, got_t, got_ties, selection, packed)
        assert len(got_masks) == len(xs)
        for got, want in zip(got_masks, want_masks, strict=True):
            expected = ref.pack_bits(want) if packed else want
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected)


# ---- the reference against first principles -----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "few_values"])
def test_reference_exact_keeps_the_k_largest_and_breaks_ties_by_index(dtype, kind):
    x = sample(257, dtype, seed=3, kind=kind)
    a = x.abs().double()
    for k in k_values(x.numel()):
        t, ties = ref.magnitude_threshold([x], k, "exact")
        (mask,) = ref.threshold_mask([x], t, ties, "exact")
        assert int(mask.sum()) == k
        if 0 < k < x.numel():
            assert a[mask].min() >= a[~mask].max()
            # among entries equal to the threshold, the kept ones come first in flat order
            tie_positions = torch.nonzero(a == float(t)).flatten()
            kept = mask[tie_positions]
            assert torch.equal(kept, torch.sort(kept, descending=True, stable=True).values)
        # an independent computation of the same threshold
        if k > 0:
            assert float(t) == float(torch.sort(a, descending=True).values[k - 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_geq_matches_the_ties_paper_rule(dtype):
    x = sample(301, dtype, seed=4, kind="few_values")
    a = x.abs().float()
    n = x.numel()
    for k in range(0, n):
        t, ties = ref.magnitude_threshold([x], k, "geq")
        (mask,) = ref.threshold_mask([x], t, ties, "geq")
        kth = torch.kthvalue(a, n - k).values if k < n else a.min()  # the paper: kthvalue(n - k)
        assert float(t) == float(kth)
        assert torch.equal(mask, a >= kth)
        assert int(ties) == int((a == kth).sum())
    t, _ = ref.magnitude_threshold([x], n, "geq")
    assert bool(ref.threshold_mask([x], t, torch.tensor(0), "geq")[0].all())


def test_pack_bits_matches_numpy_little_bitorder():
    gen = torch.Generator().manual_seed(0)
    for numel in (0, 1, 7, 8, 9, 123):
        mask = torch.rand(numel, generator=gen) > 0.5
        expected = np.packbits(mask.numpy(), bitorder="little")
        assert ref.pack_bits(mask).numpy().tolist() == expected.tolist()
        assert torch.equal(ref.unpack_bits(ref.pack_bits(mask), numel), mask)


# ---- each backend against the reference -----------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [0, 1, 7, 1023])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_matches_reference_small(backend, dtype, numel, selection):
    x = sample(numel, dtype, seed=numel)
    for k in k_values(numel):
        assert_same_selection(backend, [x], k, selection)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_triton_matches_reference_large(selection):
    x = sample(2**20 + 3, torch.float32, seed=2)
    assert_same_selection("triton", [x], x.numel() // 5, selection)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_many_ties(backend, dtype, selection):
    x = sample(3001, dtype, seed=5, kind="few_values")
    for k in (0, 1, 2, 100, 1500, 2999, 3000, 3001):
        assert_same_selection(backend, [x], k, selection)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_list_of_tensors_is_one_vector(backend, dtype, selection):
    shapes = [(7,), (0,), (31, 33), (1,), (2, 3, 50)]
    xs = [sample(int(np.prod(s)), dtype, seed=i, kind="few_values").reshape(s) for i, s in enumerate(shapes)]
    n = sum(x.numel() for x in xs)
    for k in k_values(n):
        assert_same_selection(backend, xs, k, selection)
    # the list gives what the concatenation gives
    flat = torch.cat([x.reshape(-1) for x in xs])
    t_list, ties_list = run_threshold(backend, xs, n // 3, selection)
    t_flat, ties_flat = run_threshold(backend, [flat], n // 3, selection)
    assert torch.equal(t_list, t_flat) and int(ties_list) == int(ties_flat)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_infinities_are_ordinary_values(backend, dtype):
    x = sample(50, dtype, seed=6)
    x[3], x[10], x[11] = float("inf"), float("-inf"), float("inf")
    t, ties = run_threshold(backend, [x], 2, "exact")
    assert float(t) == float("inf") and int(ties) == 2
    (mask,) = run_mask(backend, [x], t, ties, "exact")
    assert torch.nonzero(mask).flatten().tolist() == [3, 10]
    assert_same_selection(backend, [x], 3, "exact")
    assert_same_selection(backend, [x], 4, "geq")


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0, 5])
def test_nan_is_rejected(backend, dtype, k):
    x = sample(40, dtype, seed=7)
    x[17] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        run_threshold(backend, [sample(3, dtype), x], k, "exact")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(backend, dtype):
    base = sample(64 * 48, dtype, seed=8).reshape(64, 48)
    views = [base.t(), base[::3, 1::2], base[:, 5]]
    for view in views:
        assert not view.is_contiguous()
        for selection in SELECTIONS:
            k = view.numel() // 4
            got_t, got_ties = run_threshold(backend, [view], k, selection)
            want_t, want_ties = ref.magnitude_threshold([view.contiguous()], k, selection)
            assert torch.equal(got_t, want_t) and int(got_ties) == int(want_ties)
            (got_mask,) = run_mask(backend, [view], got_t, got_ties, selection)
            (want_mask,) = ref.threshold_mask([view.contiguous()], want_t, want_ties, selection)
            assert torch.equal(got_mask, want_mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_with_one_and_two_threads(dtype):
    x = sample(3 * 2**17 + 5, dtype, seed=9, kind="few_values")
    xs = [x[:1000], x[1000:]]
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t, ties = torch.ops.mtmerge.magnitude_threshold(xs=xs, k=x.numel() // 5, selection="exact")
        masks = torch.ops.mtmerge.threshold_mask(xs=xs, threshold=t, ties_kept=ties, selection="exact", packed=True)
        results.append((t, ties, masks))
    (t1, ties1, m1), (t2, ties2, m2) = results
    assert torch.equal(t1, t2) and int(ties1) == int(ties2)
    assert all(torch.equal(a, b) for a, b in zip(m1, m2, strict=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype, device):
    xs = [sample(37, dtype, seed=10).to(device), sample(5 * 7, dtype, seed=11).reshape(5, 7).to(device)]
    for selection in SELECTIONS:
        torch.library.opcheck(torch.ops.mtmerge.magnitude_threshold.default, (),
                              dict(xs=xs, k=20, selection=selection))
        t, ties = torch.ops.mtmerge.magnitude_threshold(xs=xs, k=20, selection=selection)
        for packed in (False, True):
            torch.library.opcheck(torch.ops.mtmerge.threshold_mask.default, (),
                                  dict(xs=xs, threshold=t, ties_kept=ties, selection=selection, packed=packed))


# ---- the public API ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_public_api(dtype):
    x = sample(1000, dtype, seed=12).reshape(10, 100)
    mask = mtmerge.topk_mask(x, 123)
    assert mask.shape == x.shape and mask.dtype == torch.bool and int(mask.sum()) == 123
    packed = mtmerge.topk_mask(x, 123, packed=True)
    assert packed.dtype == torch.uint8 and packed.shape == (125,)
    assert packed.numpy().tolist() == np.packbits(mask.numpy().ravel(), bitorder="little").tolist()
    masks = mtmerge.topk_mask([x, x[0]], 77, selection="geq")
    assert isinstance(masks, list) and [m.shape for m in masks] == [x.shape, x[0].shape]
    result = mtmerge.magnitude_threshold(x, 123)
    assert isinstance(result, mtmerge.MagnitudeThreshold)
    assert result.threshold.dtype == dtype and result.ties_kept.dtype == torch.int64


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x: mtmerge.magnitude_threshold(x, -1), ValueError, "k must be in"),
        (lambda x: mtmerge.magnitude_threshold(x, 11), ValueError, "k must be in"),
        (lambda x: mtmerge.magnitude_threshold(x, True), TypeError, "k must be an int"),
        (lambda x: mtmerge.magnitude_threshold(x, 2.0), TypeError, "k must be an int"),
        (lambda x: mtmerge.magnitude_threshold(x, 2, selection="top"), ValueError, "selection"),
        (lambda x: mtmerge.magnitude_threshold([], 0), ValueError, "x must be"),
        (lambda x: mtmerge.magnitude_threshold("abc", 0), TypeError, "x must be"),
        (lambda x: mtmerge.magnitude_threshold([x, 3], 0), TypeError, r"x\[1\] must be a tensor"),
        (lambda x: mtmerge.magnitude_threshold(x.long(), 1), TypeError, "x must be float32"),
        (lambda x: mtmerge.magnitude_threshold([x, x.half()], 1), TypeError, r"x\[1\] has dtype"),
        (lambda x: mtmerge.topk_mask(x, 12), ValueError, "k must be in"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(10))


def test_compiled_kernel_validates_too():
    """Direct torch.ops calls skip the wrapper; the C++ kernel still raises, never crashes."""
    x = torch.randn(10)
    op, mask_op = torch.ops.mtmerge.magnitude_threshold, torch.ops.mtmerge.threshold_mask
    with pytest.raises(ValueError, match="k must be in"):
        op(xs=[x], k=11, selection="exact")
    with pytest.raises(ValueError, match="selection"):
        op(xs=[x], k=1, selection="nope")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        op(xs=[x.double()], k=1, selection="exact")
    with pytest.raises(TypeError, match="share one dtype"):
        op(xs=[x, x.half()], k=1, selection="exact")
    with pytest.raises(ValueError, match="threshold"):
        mask_op(xs=[x], threshold=torch.tensor([1.0, 2.0]), ties_kept=torch.tensor(0), selection="exact", packed=False)
