"""The public merge ops against the peers people use (``tests/peers/``): peft's merge_utils,
mergekit's ties (the package, and our local copy checked against it), the TIES paper's code.

Peers compute in their own order of operations, so these comparisons use the dtype tolerance;
pure selections (magnitude pruning) and picks (merge="max") are compared bit for bit.
"""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mtmerge
from tests.ops.merge.helpers import assert_close, flat_task_vectors, make_models, sample
from tests.peers import MODULES, mergekit_ties, mergekit_ties_copy, peft_merge_utils, ties_paper

pytestmark = pytest.mark.usefixtures("cpp_kernels")

needs_peft = pytest.mark.skipif(peft_merge_utils.MERGE_UTILS is None, reason=peft_merge_utils.UNAVAILABLE)
needs_mergekit = pytest.mark.skipif(not mergekit_ties.AVAILABLE, reason=mergekit_ties.UNAVAILABLE)


def run_mergekit(impl, base, fts, weights, densities, lam):
    if impl == "local":
        return mergekit_ties_copy.ties_merge(base, fts, weights, densities, lam)
    return mergekit_ties.ties_merge(base, fts, weights, densities, lam)


MERGEKIT_IMPLS = ["local", pytest.param("mergekit", marks=needs_mergekit)]

PEER_CASES = [  # (shape, densities to try, weights)
    ((1,), (0.0, 0.5, 1.0), [1.0, 2.0]),
    ((7,), (0.0, 0.29, 0.5, 0.57, 1.0), [1.0, 0.5, -0.7]),
    ((100,), (0.1, 0.2, 0.29, 0.9), [0.3, 1.0, 0.0, 2.0]),
    ((31, 33), (0.05, 0.2, 0.5, 1.0), [1.0, 1.0, 1.0]),
    ((4099,), (0.01, 0.2, 0.7), [0.5, -0.25, 1.5, 1.0, 0.75]),
]


# ---- the peers themselves -------------------------------------------------------------------


@pytest.mark.parametrize("name", MODULES)
def test_every_peer_is_labelled(name):
    """Each module of tests/peers/ starts with "Real package" or "Local copy"; a local copy
    names the source file it transcribes."""
    module = importlib.import_module(f"tests.peers.{name}")
    doc = ast.get_docstring(ast.parse(Path(module.__file__).read_text()))
    assert doc, name
    assert doc.lower().startswith(("real package:", "local copy")), doc[:80]
    if doc.lower().startswith("local copy"):
        assert "source file" in doc.lower() and ".py" in doc, f"{name} must name the file it transcribes"


def test_peers_are_kept_once():
    """No test or benchmark module defines its own copy of a peer: they import tests/peers/."""
    root = Path(__file__).resolve().parents[3]
    markers = ("def mergekit_ties_local", "def mergekit_inline", "def paper_ties", "def paper_code",
               "def _load_peft_merge_utils", "def load_peft_merge_utils", "def _paper_topk_values_mask")
    offenders = []
    for path in [*root.joinpath("tests").rglob("*.py"), *root.joinpath("benchmarks").rglob("*.py")]:
        if "peers" in path.parts or path.resolve() == Path(__file__).resolve():
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(root)}: {m}" for m in markers if m in text]
    assert not offenders, offenders


@needs_mergekit
def test_local_mergekit_copy_matches_the_package():
    base, fts = make_models(1000, 3, seed=301)
    for densities, weights, lam in [([0.2, 0.5, 1.0], [1.0, 0.5, 2.0], 0.8), ([0.0, 0.3, 0.001], [1.0, -1.0, 1.0], 1)]:
        want = mergekit_ties.ties_merge(base, fts, weights, densities, lam)
        assert torch.equal(mergekit_ties_copy.ties_merge(base, fts, weights, densities, lam), want)
    for dtype in (torch.bfloat16, torch.float16):
        b, f = make_models(333, 2, dtype, seed=302)
        want = mergekit_ties.ties_merge(b, f, [1.0, 0.5], [0.3, 0.6], 1.0, normalize=False)
        assert torch.equal(mergekit_ties_copy.ties_merge(b, f, [1.0, 0.5], [0.3, 0.6], 1.0, normalize=False), want)


# ---- peft -----------------------------------------------------------------------------------


@needs_peft
@pytest.mark.parametrize(("shape", "densities", "weights"), PEER_CASES)
def test_ties_matches_peft(shape, densities, weights):
    numel = int(np.prod(shape))
    tvs = [sample(numel, seed=100 + t, scale=1 + t).reshape(shape) for t in range(len(weights))]
    for density in densities:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns that density >= 1 does not prune
            want = peft_merge_utils.ties(torch.stack(tvs), torch.tensor(weights), density)
        got = mtmerge.ties(tvs, density, weights, flavor="peft")
        assert got.shape == want.shape and got.dtype == torch.float32
        assert_close(got, want)
        # the default knobs are peft's, and a stacked [T, *S] tensor is a list of tasks
        assert_close(mtmerge.ties(torch.stack(tvs), density, weights), want)


@needs_peft
@pytest.mark.parametrize(("shape", "densities", "weights"), PEER_CASES)
def test_magnitude_prune_matches_peft(shape, densities, weights):
    numel = int(np.prod(shape))
    for t in range(len(weights)):
        tv = sample(numel, seed=200 + t).reshape(shape)
        for density in (*densities, 0.33):
            want = peft_merge_utils.magnitude_based_pruning(tv, density)
            got = mtmerge.magnitude_prune(tv, density)
            assert got.shape == tv.shape
            assert torch.equal(got, want), density  # a pure selection: bit for bit


# ---- mergekit -------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", MERGEKIT_IMPLS)
@pytest.mark.parametrize(("shape", "densities", "weights"), PEER_CASES)
@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_ties_merge_matches_mergekit(impl, shape, densities, weights, lam):
    """Densities in (0, 1] (k = max(1, int(d n))), weights with no agreeing subset summing to 0."""
    numel = int(np.prod(shape))
    base, fts = make_models(numel, len(weights), seed=300, shape=shape)
    for density in densities:
        if density <= 0:
            continue  # see test_mergekit_flavor_density_zero_keeps_nothing
        per_task = [min(1.0, density * (1 + 0.5 * t)) for t in range(len(weights))]
        want = run_mergekit(impl, base, fts, weights, per_task, lam)
        got = mtmerge.ties_merge(base, fts, density=per_task, weights=weights, lam=lam, flavor="mergekit")
        assert_close(got, want)


@pytest.mark.parametrize("impl", MERGEKIT_IMPLS)
def test_mergekit_flavor_density_zero_keeps_nothing(impl):
    """mergekit's sparsify.magnitude returns zeros for density <= 0, so the merge is the base."""
    base, fts = make_models(50, 2, seed=302)
    want = run_mergekit(impl, base, fts, [1.0, 1.0], [0.0, 0.0], 1.0)
    assert torch.equal(want, base)
    assert torch.equal(mtmerge.ties_merge(base, fts, density=0.0, weights=[1.0, 1.0], flavor="mergekit"), want)


@pytest.mark.parametrize("impl", MERGEKIT_IMPLS)
def test_mergekit_flavor_with_cancelling_weights(impl):
    """Agreeing weights summing to 0 (task negation): mergekit divides by 1, not by 0."""
    base = torch.zeros(4)
    fts = [torch.tensor([1.0, 2.0, -1.0, 0.5]), torch.tensor([-3.0, -1.0, 2.0, 0.25])]
    want = run_mergekit(impl, base, fts, [1.0, -1.0], [1.0, 1.0], 1.0)
    assert want.tolist() == [4.0, 3.0, -3.0, 0.5]
    assert_close(mtmerge.ties_merge(base, fts, density=1.0, weights=[1.0, -1.0], flavor="mergekit"), want)


def test_dare_ties_with_merge_sum_matches_mergekit_dare_ties_math():
    """mergekit's dare_ties (normalize=False by default) on the same DARE'd task vectors: the
    recipe in dare_ties' docstring (flavor="mergekit", merge="sum", rescale="l1")."""
    base, fts = make_models(2000, 3, seed=640)
    tvs = flat_task_vectors(base, fts)
    dropped = mtmerge.dare(tvs, 0.5, seed=9, rescale="l1")
    want = mergekit_ties_copy.ties_merge(base, fts, [1.0, 0.5, 2.0], None, 1, normalize=False,
                                         sparsified=dropped) - base
    got = mtmerge.dare_ties(tvs, 0.5, [1.0, 0.5, 2.0], seed=9, rescale="l1", flavor="mergekit", merge="sum")
    assert_close(got, want)


# ---- the TIES paper's code ------------------------------------------------------------------


@pytest.mark.parametrize("merge", ["mean", "sum", "max"])
@pytest.mark.parametrize("numel", [7, 100, 1023])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.2, 0.5, 1.0])
def test_paper_flavor_matches_the_paper_code(merge, numel, density):
    tvs = [sample(numel, seed=400 + t, scale=1 + t) for t in range(4)]
    want = ties_paper.ties(tvs, density, merge)
    got = mtmerge.ties(tvs, density, flavor="paper", merge=merge)
    assert_close(got, want)
    base, fts = make_models(numel, 4, seed=401)
    want = ties_paper.ties_merge(base, fts, density, lam=0.3, merge_func=merge)
    assert_close(mtmerge.ties_merge(base, fts, density, lam=0.3, flavor="paper", merge=merge), want)


@pytest.mark.parametrize("merge", ["mean", "sum", "max"])
def test_paper_flavor_when_the_sign_total_is_zero(merge):
    """S = [0, 2, -4]: the signs sum to 0, so the paper's majority sign is 0 and sign_to_mult
    stays 0 at entry 0: disjoint_merge then selects the negative entries there (mean, sum), and
    "max" multiplies by sign_to_mult = 0."""
    tvs = [torch.tensor([1.0, 3.0, -1.0]), torch.tensor([-1.0, -1.0, -3.0])]
    want = ties_paper.ties(tvs, 0.67, merge)  # int(3 * 0.67) = 2: kthvalue(1), every entry kept
    assert want.tolist() == {"mean": [-1.0, 3.0, -2.0], "sum": [-1.0, 3.0, -4.0], "max": [0.0, 3.0, -3.0]}[merge]
    assert_close(mtmerge.ties(tvs, 0.67, flavor="paper", merge=merge), want)


@pytest.mark.parametrize("flavor", ["peft", "paper"])
def test_density_zero_against_the_paper(flavor):
    """Density 0: peft's k = 0 keeps nothing (the base comes back); the paper's >= kthvalue(n)
    keeps each task's largest entry (the paper has no weights)."""
    base, fts = make_models(257, 3, seed=504)
    if flavor == "peft":
        assert torch.equal(mtmerge.ties_merge(base, fts, 0.0, [1.0, 0.0, 2.0], flavor=flavor), base)
    else:
        want = base + ties_paper.ties(flat_task_vectors(base, fts), 0.0, "mean")
        assert_close(mtmerge.ties_merge(base, fts, 0.0, flavor=flavor), want)
