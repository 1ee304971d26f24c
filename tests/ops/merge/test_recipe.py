"""``MergeRecipe`` (mtmerge/ops/recipe.py) packs the op arguments exactly as PLAN.md lays them
out (compared with the tests' own packing in helpers.py, written from the layout, not the recipe)."""

from __future__ import annotations

import pytest
import torch

from mtmerge import _constants as constants
from mtmerge import _rng
from mtmerge.ops.recipe import FLAVORS, MergeRecipe, TiesKnobs
from tests.ops.merge.helpers import keep_all, knob_rule, merge_scalars, task_scalars, task_trim


def test_task_trim_layout():
    thr = torch.tensor([0.0, 0.25, float("inf")])
    cut = torch.tensor([-1, 7, constants.INT64_MAX])
    plain = MergeRecipe(weights=(1.0, 1.0, 1.0), densities=(0.2, 0.5, 1.0), knobs=TiesKnobs())
    assert torch.equal(plain.task_trim(thr, cut), task_trim(thr, cut))
    dare = MergeRecipe(weights=(1.0, 1.0, 1.0), densities=(0.2, 0.5, 1.0), sparsify="dare", seed=2**40 + 9,
                       task_offset=4, knobs=TiesKnobs())
    want = task_trim(thr, cut, seed=2**40 + 9, keep=[_rng.dare_keep_threshold(d) for d in (0.2, 0.5, 1.0)],
                     task_offset=4)
    assert torch.equal(dare.task_trim(thr, cut), want)
    assert int(want[1, constants.TRIM_THRESHOLD_KEY]) == 0x3E800000  # 0.25f
    assert int(want[2, constants.TRIM_THRESHOLD_KEY]) == constants.F32_INF_KEY
    got_thr, got_cut = plain.keep_all("cpu")
    want_thr, want_cut = keep_all(3)
    assert torch.equal(got_thr, want_thr) and torch.equal(got_cut, want_cut)


@pytest.mark.parametrize("flavor", [*FLAVORS, None])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("check_finite", [True, False])
def test_rule_and_scalars(flavor, with_base, check_finite):
    knobs = FLAVORS[flavor] if flavor else None
    recipe = MergeRecipe(weights=(1.0, 0.5), lam=0.7, knobs=knobs, densities=(0.3, 0.3))
    assert recipe.rule(with_base=with_base, check_finite=check_finite) == knob_rule(
        knobs, with_base=with_base, check_finite=check_finite)
    assert torch.equal(recipe.task_scalars("cpu"), task_scalars([1.0, 0.5]))
    assert torch.equal(recipe.merge_scalars("cpu"), merge_scalars(0.7, 1.0))
    for total, fill in [(5, 1.0), (-2, -1.0), (0, 0.0)]:
        assert torch.equal(recipe.merge_scalars("cpu", torch.tensor(total)), merge_scalars(0.7, fill))
    nonfinite_ok = MergeRecipe(weights=(1.0, 0.5), knobs=knobs, densities=(0.3, 0.3), allow_nonfinite=True)
    assert nonfinite_ok.rule(check_finite=True)[constants.RULE_CHECK_FINITE] == 0


def test_dare_scales():
    recipe = MergeRecipe(weights=(1.0, 1.0), densities=(0.25, 0.0), sparsify="dare", rescale="inverse")
    assert recipe.static_scales() == [4.0, 0.0]
    sums = torch.tensor([[8.0, 2.0], [1e-9, 0.0]], dtype=torch.float64)
    assert torch.equal(MergeRecipe.l1_scales(sums), torch.tensor([4.0, 1.0]))
