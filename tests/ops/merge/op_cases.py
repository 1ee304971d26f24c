"""Small argument sets, by keyword, for every op of the merge family (opcheck, and each op
against its reference function). Built on CPU and moved to ``device``."""

from __future__ import annotations

import torch

from mtmerge import _constants as constants
from mtmerge import _rng
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import (
    flat_task_vectors,
    keep_all,
    make_models,
    merge_scalars,
    rule,
    sample,
    task_scalars,
    task_trim,
)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [v.to(device) for v in value]
    return value


def op_cases(device="cpu") -> dict[str, list[dict]]:
    """op name -> list of keyword-argument dicts."""
    base, fts = make_models(37, 3, seed=800, kind="few_values")
    tvs = flat_task_vectors(base, fts)
    cons = ref.pack_bits(torch.arange(37) % 3 != 0)
    thr, cut = ref.delta_threshold(base, fts, [10, 20, 5], "exact")
    keep = [_rng.dare_keep_threshold(0.5)] * 3
    trim = task_trim(thr, cut)
    dare_trim = task_trim(thr, cut, seed=7, keep=keep, task_offset=1)
    dare_only = task_trim(*keep_all(3), seed=7, keep=keep)
    scalars = task_scalars([1.0, 0.5, 2.0], [1.0, 2.0, 1.0])
    masks = ref.tall_masks(base, fts, sum(tvs), [0.4] * 3)
    xs = [sample(37, seed=10), sample(5 * 7, seed=11).reshape(5, 7)]
    t_exact, ties_exact = ref.magnitude_threshold(xs, 20, "exact")
    t_geq, ties_geq = ref.magnitude_threshold(xs, 20, "geq")
    cases = {
        "magnitude_threshold": [dict(xs=xs, k=20, selection="exact"), dict(xs=xs, k=0, selection="geq"),
                                dict(xs=[x.bfloat16() for x in xs], k=72, selection="exact")],
        "threshold_mask": [dict(xs=xs, threshold=t_exact, ties_kept=ties_exact, selection="exact", packed=False),
                           dict(xs=xs, threshold=t_geq, ties_kept=ties_geq, selection="geq", packed=True)],
        "delta_threshold": [dict(base=base, finetuned=fts, ks=[10, 20, 5], selection="exact", allow_nonfinite=False,
                                 consensus=None),
                            dict(base=None, finetuned=tvs, ks=[0, 37, 3], selection="geq", allow_nonfinite=False,
                                 consensus=cons)],
        "tie_cutoffs": [dict(base=base, finetuned=fts, thresholds=thr, ties_kept=torch.tensor([1, 0, 2]),
                             consensus=None),
                        dict(base=None, finetuned=tvs, thresholds=thr, ties_kept=torch.tensor([3, 1, 1]),
                             consensus=cons)],
        "dare_abs_sums": [dict(base=base, finetuned=fts, task_trim=dare_only, index_offset=0),
                          dict(base=None, finetuned=tvs, task_trim=dare_trim, index_offset=2)],
        "elect_sign_total": [dict(base=base, finetuned=fts, task_scalars=scalars, task_trim=trim, consensus=None,
                                  rule=rule("sum", False), index_offset=0),
                             dict(base=None, finetuned=tvs, task_scalars=scalars, task_trim=dare_trim,
                                  consensus=cons, rule=rule("count", True), index_offset=5)],
        "merge_fused": [dict(base=base, finetuned=fts, task_scalars=scalars, task_trim=trim, consensus=None,
                             rule=rule("sum", False, "mean", "count"), merge_scalars=merge_scalars(0.5, 1.0),
                             out=torch.empty(37), index_offset=0),
                        dict(base=None, finetuned=tvs, task_scalars=scalars, task_trim=dare_trim, consensus=cons,
                             rule=rule("count", True, "max", "weight", check_finite=True),
                             merge_scalars=merge_scalars(1.0, -1.0), out=torch.empty(37), index_offset=1),
                        dict(base=base, finetuned=fts, task_scalars=scalars, task_trim=trim, consensus=None,
                             rule=rule("none", False, "sum", "count", with_base=False),
                             merge_scalars=merge_scalars(1.0, 0.0), out=torch.empty(37, dtype=torch.bfloat16),
                             index_offset=0)],
        "task_arithmetic": [dict(base=base, finetuned=fts, weights=torch.tensor([1.0, 0.5, -2.0]),
                                 lam=torch.tensor(0.7)),
                            dict(base=base.bfloat16(), finetuned=[f.bfloat16() for f in fts],
                                 weights=torch.tensor([0.3, 0.3, 0.4]), lam=torch.tensor(1.0)),
                            # float64, everything requiring grad: opcheck checks the autograd registration
                            dict(base=base.double().requires_grad_(),
                                 finetuned=[f.double().requires_grad_() for f in fts],
                                 weights=torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64, requires_grad=True),
                                 lam=torch.tensor(0.7, dtype=torch.float64, requires_grad=True))],
        "tall_masks": [dict(base=base, finetuned=fts, merged=sum(tvs), lams=[0.4, 0.3, 0.2]),
                       dict(base=None, finetuned=tvs, merged=sum(tvs), lams=[0.4] * 3)],
        "consensus_mask": [dict(masks=masks, k=2), dict(masks=masks, k=1)],
        "magnitude_histogram": [dict(base=base, finetuned=fts, shift=16, bits=15, prefixes=[0, 0, 0], prefix_shift=31,
                                     consensus=None),
                                dict(base=None, finetuned=tvs, shift=0, bits=16, prefixes=[0x3E80, 0x3F00, 0x3E00],
                                     prefix_shift=16, consensus=cons)],
    }
    assert constants.TRIM_COLUMNS == 4  # the packing above follows PLAN.md's layout
    return {name: [{k: _to(v, device) for k, v in kwargs.items()} for kwargs in per_op] for name, per_op in
            cases.items()}
