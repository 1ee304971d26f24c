"""TIES through the public API (``mtmerge.ties`` / ``ties_merge`` / ``magnitude_prune``) on
hand-computed cases with the expected numbers written out, and the flavor presets.

The inputs are small and exact in float32, so every expectation is an exact list.
"""

from __future__ import annotations

import pytest
import torch

import mtmerge
from mtmerge.ops.recipe import FLAVORS, TiesKnobs, resolve_knobs
from tests.ops.merge.helpers import flat_task_vectors

pytestmark = pytest.mark.usefixtures("cpp_kernels")

TRIM_TVS = [
    torch.tensor([1.0, -2.0, 2.0, 3.0, -2.0, 0.5]),
    torch.tensor([2.0, 2.0, -1.0, 1.0, 1.0, -1.0]),
    torch.tensor([-0.5, 0.5, 0.5, -0.5, 0.5, 0.5]),
]


def test_hand_trim_ties_at_the_threshold():
    # k = int(0.5 * 6) = 3. exact: |.| > t plus the first ties in flat order; geq: >= the 3rd smallest.
    expected = {
        "exact": [[0, -2, 2, 3, 0, 0], [2, 2, -1, 0, 0, 0], [-0.5, 0.5, 0.5, 0, 0, 0]],
        "geq": [[0, -2, 2, 3, -2, 0], [2, 2, -1, 1, 1, -1], [-0.5, 0.5, 0.5, -0.5, 0.5, 0.5]],
    }
    for selection, rows in expected.items():
        for tv, row in zip(TRIM_TVS, rows, strict=True):
            assert mtmerge.magnitude_prune(tv, 0.5, selection).tolist() == row
    # one task: the trim is the result
    assert mtmerge.ties([TRIM_TVS[1]], 0.5).tolist() == [2, 2, -1, 0, 0, 0]
    # three tasks, peft's knobs with each tie rule; the paper flavor is geq + majority
    assert mtmerge.ties(TRIM_TVS, 0.5).tolist() == [2, 1.25, 1.25, 3, 0, 0]
    assert mtmerge.ties(TRIM_TVS, 0.5, selection="geq").tolist() == [2, 1.25, 1.25, 2, -2, -1]
    assert mtmerge.ties(TRIM_TVS, 0.5, flavor="paper").tolist() == [2, 1.25, 1.25, 2, -2, -1]
    # k_rule: int(0.1 * 6) = 0 keeps nothing, mergekit's rule keeps the largest
    assert mtmerge.magnitude_prune(TRIM_TVS[0], 0.1).tolist() == [0] * 6
    assert mtmerge.magnitude_prune(TRIM_TVS[0], 0.1, k_rule="at_least_one").tolist() == [0, 0, 0, 3, 0, 0]


ELECT_TVS = [  # columns: S = [1, 3, -2, 2, 0, 0]; sign counts = [-1, -1, 1, 1, -1, 1]
    torch.tensor([3.0, -1.0, 1.0, 0.0, 2.0, -2.0]),
    torch.tensor([-1.0, -1.0, 1.0, 0.0, -1.0, 1.0]),
    torch.tensor([-1.0, 5.0, -4.0, 2.0, -1.0, 1.0]),
]


def test_hand_elect_sum_vs_count():
    assert mtmerge.ties(ELECT_TVS, 1.0, elect="sum").tolist() == [3, 5, -4, 2, 2, 1]
    assert mtmerge.ties(ELECT_TVS, 1.0, elect="count").tolist() == [-1, -1, 1, 2, -1, 1]


ZERO_TVS = [  # S = [0, -3, -1, 0, 1, 0]: sign total -1
    torch.tensor([1.0, -1.0, -1.0, 2.0, 1.0, 0.0]),
    torch.tensor([-1.0, -2.0, 0.0, 0.0, 0.0, 0.0]),
    torch.tensor([0.0, 0.0, 0.0, -2.0, 0.0, 0.0]),
]


def test_hand_zero_sign_positive_vs_majority():
    assert mtmerge.ties(ZERO_TVS, 1.0, zero_sign="positive").tolist() == [1, -1.5, -1, 2, 1, 0]
    assert mtmerge.ties(ZERO_TVS, 1.0, zero_sign="majority").tolist() == [-1, -1.5, -1, -2, 1, 0]
    # a positive sign total fills with +1: negate every task
    neg = [-tv for tv in ZERO_TVS]
    assert mtmerge.ties(neg, 1.0, zero_sign="majority").tolist() == [1, 1.5, 1, 2, -1, 0]


WEIGHT_TVS = [
    torch.tensor([2.0, -1.0, 1.0, 0.5, 3.0, -1.0]),
    torch.tensor([-1.5, 2.0, -3.0, 1.0, -1.5, 1.0]),
    torch.tensor([1.0, 0.0, 1.0, -1.0, 0.0, 0.0]),
]
WEIGHTS = [1.0, 3.0, 2.0]
# unweighted S = [1.5, 1, -1, 0.5, 1.5, 0]; weighted S = [-0.5, 5, -6, 1.5, -1.5, 2]


def test_hand_weighted_vs_unweighted_election_merge_and_divisor():
    def run(**knobs):
        return mtmerge.ties(WEIGHT_TVS, 1.0, WEIGHTS, **knobs).tolist()

    assert run() == [2, 6, -9, 1.75, 3, 3]
    assert run(elect_weighted=True) == [-4.5, 6, -9, 1.75, -4.5, 3]
    assert run(merge="sum") == [4, 6, -9, 3.5, 3, 3]
    assert run(merge="max") == [2, 6, -9, 3, 3, 3]
    assert run(merge="max", elect_weighted=True) == [-4.5, 6, -9, 3, -4.5, 3]
    got = run(divisor="weight")
    assert got == pytest.approx([4 / 3, 2, -3, 0.875, 3, 1], rel=1e-6)
    assert run(flavor="peft") == [2, 6, -9, 1.75, 3, 3]
    assert run(flavor="mergekit") == pytest.approx([-1.5, 2, -3, 0.875, -1.5, 1], rel=1e-6)
    # ties_merge: base + lam * merged
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    got = mtmerge.ties_merge(base, [base + tv for tv in WEIGHT_TVS], 1.0, WEIGHTS, lam=0.5)
    assert got.tolist() == [2, 5, -1.5, 4.875, 6.5, 7.5]


def test_hand_task_arithmetic_and_dare_linear_without_drop():
    base = torch.tensor([1.0, -1.0, 0.5])
    fts = [torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, 1.0, 1.5])]
    assert mtmerge.task_arithmetic(base, fts, [1.0, 0.5], lam=2.0).tolist() == [3, 1, 0.5]
    tvs = flat_task_vectors(base, fts)
    assert mtmerge.dare_linear(tvs, 1.0, [1.0, 0.5], seed=0).tolist() == [1, 1, 0]
    assert mtmerge.dare_linear(tvs, 1.0, [1.0, 3.0], seed=0, normalize=True).tolist() == [0.25, 1.5, 0.625]


def test_flavors_and_resolve_knobs():
    assert set(FLAVORS) == {"peft", "mergekit", "paper"}
    assert mtmerge.FLAVORS is FLAVORS and mtmerge.TiesKnobs is TiesKnobs
    assert resolve_knobs() == FLAVORS["peft"] == TiesKnobs()
    assert FLAVORS["mergekit"] == TiesKnobs(elect_weighted=True, divisor="weight", k_rule="at_least_one")
    assert FLAVORS["paper"] == TiesKnobs(selection="geq", zero_sign="majority")
    assert resolve_knobs("paper", merge="max", selection=None) == TiesKnobs(selection="geq", zero_sign="majority",
                                                                           merge="max")
    assert resolve_knobs("mergekit", divisor="count").divisor == "count"
    with pytest.raises(ValueError, match="flavor"):
        resolve_knobs("ties")
    with pytest.raises(TypeError, match="unknown TIES knob 'density'"):
        resolve_knobs(density=0.5)
    with pytest.raises(ValueError, match="elect_weighted"):
        resolve_knobs(elect_weighted=1)
