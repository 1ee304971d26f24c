"""The Triton TALL-mask and Consensus launchers against the reference, bit for bit."""

from __future__ import annotations

import pytest
import torch

from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import assert_same
from tests.ops.merge.triton_cases import CASES, case_id, make_inputs, on, triton_merge

pytestmark = pytest.mark.usefixtures("triton_kernels")


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_tall_masks_and_consensus(case):
    n, dtype, with_base, _, kind = case
    gen = torch.Generator().manual_seed(n)
    for T in (1, 3):  # T = 0 is refused by every backend: test_triton_vs_cpp.py
        base, fts = make_inputs(n, dtype, T=T, kind=kind, with_base=with_base)
        merged = (torch.randn(n, generator=gen) * 0.1).to(dtype)
        lams = [0.2, 1.0, 3.0][:T]
        kwargs = dict(base=base, finetuned=fts, merged=merged, lams=lams)
        masks = ref.tall_masks(**kwargs)
        assert_same(triton_merge().tall_masks(**on(kwargs)), masks)
        for k in (1, 2, T + 1):  # k = 0 is refused by every backend: test_triton_vs_cpp.py
            assert_same(triton_merge().consensus_mask(**on(dict(masks=masks, k=k))), ref.consensus_mask(masks, k))


def test_consensus_mask_non_contiguous():
    gen = torch.Generator().manual_seed(3)
    masks = torch.randint(0, 256, (1030, 4), generator=gen, dtype=torch.uint8).T
    for k in (1, 2, 3):
        got = triton_merge().consensus_mask(**on(dict(masks=masks, k=k)))
        assert_same(got, ref.consensus_mask(masks.contiguous(), k))
