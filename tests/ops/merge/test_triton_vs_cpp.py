"""C++ against Triton, each pinned to its device: the C++ kernels always on CPU tensors (even
when a GPU is present), the Triton launchers on TRITON_DEVICE (the GPU, or the interpreter on
CPU). The same DARE masks and chunked streams, and the same answer to bad input: every backend
accepts exactly the same inputs (ValueError for a bad value, TypeError for a wrong type)."""

from __future__ import annotations

import pytest
import torch

from mtmerge import _rng
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import (
    INT64_MAX,
    TRITON_DEVICE,
    assert_same,
    keep_all,
    merge_scalars,
    rule,
    task_scalars,
    task_trim,
)
from tests.ops.merge.triton_cases import on, triton_merge

pytestmark = pytest.mark.usefixtures("cpp_kernels", "triton_kernels")


def cpp(name, **kwargs):
    """The C++ kernel: torch.ops on CPU tensors, whatever else is present."""
    kwargs = on(kwargs, "cpu")
    assert all(v.device.type == "cpu" for v in kwargs.values() if isinstance(v, torch.Tensor))
    return getattr(torch.ops.mtmerge, name)(**kwargs)


def triton(name, **kwargs):
    return getattr(triton_merge(), name)(**on(kwargs, TRITON_DEVICE))


def fused_pair(args):
    """(C++ out, Triton out) of merge_fused, both on CPU afterwards."""
    n = args["finetuned"][0].numel()
    got_cpp = torch.empty(n)
    got_triton = torch.empty(n, device=TRITON_DEVICE)
    cpp("merge_fused", out=got_cpp, **args)
    triton("merge_fused", out=got_triton, **args)
    return got_cpp, got_triton.cpu()


def test_dare_masks_identical_between_cpp_and_triton():
    n, count = 3001, 3
    ones = [torch.ones(n) for _ in range(count)]
    keep = [_rng.dare_keep_threshold(d) for d in (0.1, 0.5, 0.9)]
    for seed, offset in [(0, 0), (12345, 7), (2**63 - 1, 1)]:
        for t in range(count):
            weights = [1.0 if s == t else 0.0 for s in range(count)]  # output = task t's mask
            args = dict(base=None, finetuned=ones, task_scalars=task_scalars(weights),
                        task_trim=task_trim(*keep_all(count), seed=seed, keep=keep, task_offset=offset),
                        consensus=None, rule=rule("none", False, "sum"), merge_scalars=merge_scalars(1.0, 1.0),
                        index_offset=0)
            got_cpp, got_triton = fused_pair(args)
            assert_same(got_cpp, got_triton)
            assert torch.equal(got_cpp.bool(), ref.dare_keep_mask(n, seed, offset + t, keep[t]))


def test_dare_index_offset_matches_cpp():
    """A chunk merged with index_offset = its start draws the whole tensor's DARE stream, in
    Triton as in C++ (the pipeline merges huge tensors in chunks)."""
    n, count, start = 777, 2, 5000
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=gen)
    fts = [base + torch.randn(n, generator=gen) for _ in range(count)]
    trim = task_trim(*keep_all(count), seed=3, keep=[_rng.dare_keep_threshold(0.4)] * count)
    args = dict(base=base, finetuned=fts, task_scalars=task_scalars([1.0, 0.5], [2.5, 2.5]), task_trim=trim,
                consensus=None, rule=rule("sum", True, "sum", "count"), merge_scalars=merge_scalars(1.0, 1.0),
                index_offset=start)
    assert_same(*fused_pair(args))
    sums_cpp = cpp("dare_abs_sums", base=base, finetuned=fts, task_trim=trim, index_offset=start)
    sums_triton = triton("dare_abs_sums", base=base, finetuned=fts, task_trim=trim, index_offset=start).cpu()
    torch.testing.assert_close(sums_triton, sums_cpp, rtol=1e-12, atol=0)


def _bad_inputs():
    """name -> (op, keyword arguments, expected exception): each must be refused by every backend."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(100, generator=gen)
    fts = [base + torch.randn(100, generator=gen) for _ in range(3)]
    thr, cut = ref.delta_threshold(base, fts, [50, 20, 100], "exact")
    fused = dict(base=base, finetuned=fts, task_scalars=task_scalars([1.0] * 3), task_trim=task_trim(thr, cut),
                 consensus=None, rule=rule("sum"), merge_scalars=merge_scalars(1.0, 1.0), out=torch.empty(100),
                 index_offset=0)
    delta = dict(base=base, finetuned=fts, ks=[1, 2, 3], selection="exact", allow_nonfinite=False, consensus=None)
    bad_rule = rule("sum")
    return {
        "ks too short": ("delta_threshold", dict(delta, ks=[1, 2]), ValueError),
        "k above n": ("delta_threshold", dict(delta, ks=[1, 2, 101]), ValueError),
        "negative k": ("delta_threshold", dict(delta, ks=[1, -2, 3]), ValueError),
        "unknown selection": ("delta_threshold", dict(delta, selection="top"), ValueError),
        "no tasks": ("delta_threshold", dict(delta, finetuned=[], ks=[]), ValueError),
        "task of another size": ("delta_threshold", dict(delta, finetuned=[fts[0][:50]], ks=[1]), ValueError),
        "task of another dtype": ("delta_threshold", dict(delta, finetuned=[fts[0], fts[1].half(), fts[2]]),
                                  TypeError),
        "float64 inputs": ("delta_threshold", dict(delta, base=base.double(), finetuned=[f.double() for f in fts]),
                           TypeError),
        "consensus too short": ("delta_threshold", dict(delta, consensus=torch.zeros(3, dtype=torch.uint8)),
                                ValueError),
        "consensus too long": ("delta_threshold", dict(delta, consensus=torch.zeros(14, dtype=torch.uint8)),
                               ValueError),
        "consensus not uint8": ("delta_threshold", dict(delta, consensus=torch.zeros(13)), TypeError),
        "mixed input dtypes": ("merge_fused", dict(fused, finetuned=[fts[0].bfloat16(), fts[1].half(), fts[2]]),
                               TypeError),
        "base of another dtype": ("merge_fused", dict(fused, base=base.bfloat16()), TypeError),
        "consensus bool": ("merge_fused", dict(fused, consensus=torch.zeros(13, dtype=torch.bool)), TypeError),
        "unknown elect code": ("merge_fused", dict(fused, rule=[7, *bad_rule[1:]]), ValueError),
        "unknown merge code": ("merge_fused", dict(fused, rule=[*bad_rule[:2], 9, *bad_rule[3:]]), ValueError),
        "unknown divisor code": ("merge_fused", dict(fused, rule=[*bad_rule[:3], 5, *bad_rule[4:]]), ValueError),
        "short rule": ("merge_fused", dict(fused, rule=bad_rule[:4]), ValueError),
        "out of another size": ("merge_fused", dict(fused, out=torch.empty(10)), ValueError),
        "task_scalars of another shape": ("merge_fused", dict(fused, task_scalars=task_scalars([1.0] * 2)),
                                          ValueError),
        "task_trim not int64": ("merge_fused", dict(fused, task_trim=task_trim(thr, cut).float()), TypeError),
        "merge_scalars of another shape": ("merge_fused", dict(fused, merge_scalars=torch.ones(3)), ValueError),
        "elect none in elect_sign_total": ("elect_sign_total", dict(
            {k: v for k, v in fused.items() if k not in ("merge_scalars", "out")}, rule=rule("none", False, "sum")),
            ValueError),
        "merged of another size": ("tall_masks", dict(base=base, finetuned=fts, merged=torch.zeros(99),
                                                      lams=[1.0] * 3), ValueError),
        "no tasks for tall_masks": ("tall_masks", dict(base=base, finetuned=[], merged=torch.zeros(100), lams=[]),
                                    ValueError),
        "lams too short": ("tall_masks", dict(base=base, finetuned=fts, merged=torch.zeros(100), lams=[1.0]),
                           ValueError),
        "k = 0": ("consensus_mask", dict(masks=torch.zeros(2, 8, dtype=torch.uint8), k=0), ValueError),
        "1-D masks": ("consensus_mask", dict(masks=torch.zeros(8, dtype=torch.uint8), k=1), ValueError),
        "float masks": ("consensus_mask", dict(masks=torch.zeros(2, 8), k=1), TypeError),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_backends_refuse_the_same_inputs(case):
    """Validation lives in the public layer, but a backend called directly must still refuse bad
    input cleanly, with the same exception type as the other backend."""
    name, kwargs, error = _bad_inputs()[case]
    with pytest.raises(error) as cpp_error:
        cpp(name, **kwargs)
    with pytest.raises(error) as triton_error:
        triton(name, **kwargs)
    assert type(cpp_error.value) is type(triton_error.value), (cpp_error.value, triton_error.value)


def test_backends_accept_the_same_edge_inputs():
    """Inputs at the edges (k = 0 and n, an all-zero consensus, INT64_MAX cut-offs) give the same
    bits on both backends."""
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(64, generator=gen)
    fts = [base + torch.randn(64, generator=gen) for _ in range(2)]
    zero_cons = torch.zeros(8, dtype=torch.uint8)
    for ks, cons in [([0, 64], None), ([64, 0], zero_cons), ([3, 5], zero_cons)]:
        kwargs = dict(base=base, finetuned=fts, ks=ks, selection="exact", allow_nonfinite=False, consensus=cons)
        got_cpp = cpp("delta_threshold", **kwargs)
        got_triton = triton("delta_threshold", **kwargs)
        for a, b in zip(got_cpp, got_triton, strict=True):
            assert_same(a, b.cpu())
    cut = torch.full((2,), INT64_MAX, dtype=torch.int64)
    args = dict(base=base, finetuned=fts, task_scalars=task_scalars([1.0, 1.0]), task_trim=task_trim(torch.zeros(2),
                                                                                                      cut),
                consensus=zero_cons, rule=rule("sum"), merge_scalars=merge_scalars(1.0, 1.0), index_offset=0)
    got_cpp, got_triton = fused_pair(args)
    assert_same(got_cpp, got_triton)
    assert_same(got_cpp, base)  # nothing in the consensus: the base comes back
