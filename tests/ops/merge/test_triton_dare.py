"""The Triton DARE decisions and L1 sums against the reference: the same keep decisions bit for
bit (the hash of the flat index under the task key in ``task_trim``), high words included."""

from __future__ import annotations

import pytest
import torch

from mtmerge import _rng
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import TRITON_DEVICE, assert_same, keep_all, rule, task_scalars, task_trim
from tests.ops.merge.triton_cases import DARE_30, make_inputs, on, run_fused, triton_merge

pytestmark = pytest.mark.usefixtures("triton_kernels")
ONE = _rng.dare_keep_threshold(1.0)


def dare_abs_sums(**kwargs):
    return triton_merge().dare_abs_sums(**on(kwargs)).cpu()


@pytest.mark.parametrize("n", [1, 1000, 4099])
@pytest.mark.parametrize("with_base", [True, False])
def test_dare_abs_sums(n, with_base):
    base, fts = make_inputs(n, torch.bfloat16, with_base=with_base)
    for keep, offset in (([DARE_30, ONE, _rng.dare_keep_threshold(0.9)], 0), ([ONE, ONE, ONE], 0),
                         ([DARE_30, DARE_30, DARE_30], 5)):
        trim = task_trim(*keep_all(3), seed=1234, keep=keep, task_offset=offset)
        want = ref.dare_abs_sums(base, fts, trim)
        got = dare_abs_sums(base=base, finetuned=fts, task_trim=trim, index_offset=0)
        assert got.dtype == torch.float64 and got.shape == (3, 2)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_dare_abs_sums_empty():
    trim = task_trim(*keep_all(2), seed=1, keep=[DARE_30, ONE])
    assert_same(dare_abs_sums(base=None, finetuned=[torch.zeros(0)] * 2, task_trim=trim, index_offset=0),
                ref.dare_abs_sums(None, [torch.zeros(0)] * 2, trim))


def keep_codes(seed, keep, task_offset=0, n=4099, start=0):
    """Through merge_fused with no trim, elect "none", scales 1 and weights 1, 2, 4: the output
    encodes each task's keep decision in one bit."""
    T = len(keep)
    args = dict(base=None, finetuned=[torch.ones(n)] * T, task_scalars=task_scalars([1.0, 2.0, 4.0][:T]),
                task_trim=task_trim(*keep_all(T), seed=seed, keep=keep, task_offset=task_offset), consensus=None)
    out = run_fused(triton_merge().merge_fused, args, torch.float32, rule("none", False, "sum"), lam=1.0,
                    index_offset=start, device=TRITON_DEVICE)
    return out.to(torch.int64)


@pytest.mark.parametrize(("seed", "task_offset"), [(0, 0), (2**40 + 7, 0), (11, 5)])
def test_dare_keep_decisions_bit_for_bit(seed, task_offset):
    """Task t draws the stream of task task_offset + t."""
    n = 4099
    keep = [DARE_30, _rng.dare_keep_threshold(0.5), DARE_30]
    code = keep_codes(seed, keep, task_offset, n)
    for t in range(3):
        got = (code >> t) & 1 == 1
        assert torch.equal(got, ref.dare_keep_mask(n, seed, task_offset + t, keep[t]))
        assert 0.2 < got.float().mean() < 0.6


@pytest.mark.parametrize("start", [2**32 - 64, 2**40 + 3, 2**62])
def test_dare_hash_high_word(start):
    """Flat indices >= 2**32 (tensors of more than 4G entries) hash their high word too: a chunk
    at index_offset = start draws the decisions of indices start .. start + 127."""
    code = keep_codes(99, [DARE_30], task_offset=2, n=128, start=start)
    index = torch.arange(start, start + 128, dtype=torch.int64)
    assert torch.equal(code == 1, ref.dare_hash(index, _rng.dare_task_key(99, 2)) < DARE_30)
