"""The C++ selection's fast path and its fall-backs, each checked to have really run.

Inputs of 2^18+ entries take a sampled-window fast path (csrc/merge/select.h,
``select_with_window``; one shared window pass for every task in ``delta_threshold``, trim.cpp);
the inputs below make it miss its bracket, overflow its copy or collapse the bracket to one key,
so the plain radix passes (or the bracket-only path) run. Which path ran is read from the
extension's selection counters, and the window pass's ISA from ``window_isa()``:

* ``mtmerge._C.reset_selection_stats()`` zeroes them;
* ``mtmerge._C.selection_stats()`` -> dict of ints since the reset: ``window_hits`` (a selection
  finished from the window copy), ``bracket_misses`` (the k-th key fell outside the sampled
  bracket: radix fall-back), ``window_overflows`` (the window copy overflowed: radix fall-back),
  ``single_key_brackets`` (the bracket was one key, lo == hi), ``traced_cutoffs`` (tie cut-offs
  placed from the window pass's trace);
* ``mtmerge._C.window_isa()`` -> "avx512f" | "avx2" | "default": the window pass in use, capped
  by ``MTMERGE_MAX_ISA``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mtmerge
from mtmerge import _library
from mtmerge.ops.recipe import TiesKnobs
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import DTYPES, INT64_MAX, assert_same, make_models, ref_ties_merge

pytestmark = pytest.mark.usefixtures("cpp_kernels")
SELECTIONS = ["exact", "geq"]
HOOKS = ("reset_selection_stats", "selection_stats", "window_isa")


def extension():
    missing = [name for name in HOOKS if not hasattr(_library._C, name)]
    assert not missing, (f"mtmerge._C lacks {missing}: the C++ selection must expose its counters and ISA "
                         "(see this file's docstring) so these tests can check which path ran")
    return _library._C


class Stats:
    """Counters of the C++ selection paths taken inside a ``with`` block."""

    def __enter__(self):
        extension().reset_selection_stats()
        return self

    def __exit__(self, *exc):
        self.counts = dict(extension().selection_stats())
        return False

    def __getitem__(self, name):
        assert name in self.counts, f"selection_stats() has no {name!r}: {sorted(self.counts)}"
        return self.counts[name]


def expected_isa(cap: str | None = None) -> str:
    features = extension().build_info()["cpu_features"]
    order = [isa for isa, ok in [("avx512f", features.get("avx512f")), ("avx2", features.get("avx2")),
                                 ("default", True)] if ok]
    if cap == "avx2":
        order = [isa for isa in order if isa != "avx512f"]
    elif cap == "default":
        order = ["default"]
    return order[0]


def assert_same_selection(xs, k, selection):
    want_t, want_ties = ref.magnitude_threshold(xs, k, selection)
    got_t, got_ties = torch.ops.mtmerge.magnitude_threshold(xs=xs, k=k, selection=selection)
    assert torch.equal(got_t, want_t) and int(got_ties) == int(want_ties), (k, selection)
    (want_mask,) = ref.threshold_mask(xs, want_t, want_ties, selection, True)
    (got_mask,) = torch.ops.mtmerge.threshold_mask(xs=xs, threshold=got_t, ties_kept=got_ties, selection=selection,
                                                   packed=True)
    assert torch.equal(got_mask, want_mask)


def test_the_window_pass_uses_the_best_isa():
    """Without MTMERGE_MAX_ISA the window pass is the best this CPU has (the rest of the suite
    runs it; the other ISAs run in test_window_pass_on_every_isa)."""
    if os.environ.get("MTMERGE_MAX_ISA"):
        pytest.skip("MTMERGE_MAX_ISA is set for this run")
    assert extension().window_isa() == expected_isa()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("selection", SELECTIONS)
def test_cpu_matches_reference_large(dtype, selection):
    """The fast path itself: finished from the window copy, same bits as the reference."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2**20 + 3, generator=gen).to(dtype)
    n = x.numel()
    with Stats() as stats:
        assert_same_selection([x], n // 5, selection)
    assert stats["window_hits"] >= 1, stats.counts
    for k in (0, 1, n - 1, n):  # the extremes, by whichever path the kernel picks
        assert_same_selection([x], k, selection)


def test_cpu_window_bracket_miss_falls_back():
    n = 2**20
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(n, generator=gen) * 100 + 500
    # The kernel samples flat indices j*stride + stride/2 with stride = n / 2^m; for n = 2^20
    # and any sample size up to 2^16 those are multiples of 8: make them all tiny, so the
    # sample's bracket lies far below the true threshold.
    x[::8] = torch.randn(n // 8, generator=gen) * 1e-3
    for selection in SELECTIONS:
        with Stats() as stats:
            assert_same_selection([x], n // 5, selection)
        assert stats["bracket_misses"] >= 1, (selection, stats.counts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_window_overflow_falls_back(dtype):
    n = 2**19 + 1
    gen = torch.Generator().manual_seed(14)
    x = torch.where(torch.rand(n, generator=gen) < 0.5, torch.ones(n), torch.randn(n, generator=gen)).to(dtype)
    for selection in SELECTIONS:
        with Stats() as stats:
            assert_same_selection([x], n // 5, selection)
        assert stats["window_overflows"] >= 1, (selection, stats.counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_shared_window_selection_on_large_inputs(dtype, selection):
    """Above 2**18 entries delta_threshold selects every task in one shared sampled-window pass
    and places the threshold's ties from that pass's trace: same bits as the reference, for
    any thread count, with heavy ties (bf16 deltas take few values), a consensus mask and a
    task whose k is 0."""
    n = 2**18 + 4099
    base, fts = make_models(n, 3, dtype, seed=900)
    if dtype == torch.bfloat16:  # deltas on a coarse grid: thousands of ties at each threshold
        fts = [(base.float() + torch.round(f.float() - base.float(), decimals=2)).to(dtype) for f in fts]
    ks = [int(0.2 * n), 0, int(0.55 * n)] if selection == "exact" else [int(0.2 * n), n, int(0.55 * n)]
    tvs = [f.float() - base.float() for f in fts]
    masks = ref.tall_masks(base, fts, sum(tvs), [0.3, 0.3, 0.3])
    consensus = ref.consensus_mask(masks, 1)
    with Stats() as stats:
        for cons in (None, consensus):
            want = ref.delta_threshold(base, fts, ks, selection, False, cons)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                got = torch.ops.mtmerge.delta_threshold(base=base, finetuned=fts, ks=ks, selection=selection,
                                                        allow_nonfinite=False, consensus=cons)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (threads, cons is None)
    assert stats["window_hits"] >= 1, stats.counts
    if selection == "exact" and dtype == torch.bfloat16:
        # partial ties really occur here, so the traced cut-off path ran
        assert int((want[1] != INT64_MAX).sum()) >= 1
        assert stats["traced_cutoffs"] >= 1, stats.counts


@pytest.mark.parametrize("selection", SELECTIONS)
def test_shared_window_with_a_single_key_in_the_bracket(selection):
    """Task vectors taking 3 values: the sampled bracket collapses to one key (lo == hi), so
    every radix level is settled by the bracket alone; results still match the reference."""
    n = 2**18 + 77
    g = torch.Generator().manual_seed(930)
    base = torch.zeros(n)
    values = torch.tensor([0.5, -1.0, 2.0])
    fts = [values[torch.randint(0, 3, (n,), generator=g)] for _ in range(2)]
    ks = [n // 2, n // 3]
    want = ref.delta_threshold(base, fts, ks, selection, False, None)
    with Stats() as stats:
        got = torch.ops.mtmerge.delta_threshold(base=base, finetuned=fts, ks=ks, selection=selection,
                                                allow_nonfinite=False, consensus=None)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert stats["single_key_brackets"] >= 1, stats.counts
    out = mtmerge.ties_merge(base, fts, [0.5, 1 / 3], selection=selection)
    assert_same(out, ref_ties_merge(base, fts, [0.5, 1 / 3], [1.0, 1.0], 1.0, TiesKnobs(selection=selection)))


_ISA_CHECK = textwrap.dedent("""
    import sys
    import torch
    from mtmerge import _library
    from mtmerge.reference import merge as ref

    C = _library._C
    assert C is not None, _library.EXTENSION_ERROR
    assert C.window_isa() == sys.argv[1], (C.window_isa(), sys.argv[1])
    C.reset_selection_stats()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gen = torch.Generator().manual_seed(15)
        x = torch.randn(2**20 + 7, generator=gen).to(dtype)
        for k in (1, 1000, x.numel() // 5, x.numel() - 3):
            for selection in ("exact", "geq"):
                print(dtype, k, selection, file=sys.stderr, flush=True)  # where a crash happened
                got = torch.ops.mtmerge.magnitude_threshold(xs=[x[:5], x[5:]], k=k, selection=selection)
                want = ref.magnitude_threshold([x], k, selection)
                assert torch.equal(got[0], want[0]) and int(got[1]) == int(want[1]), (dtype, k, selection)
        x[12345] = float("nan")
        for k in (0, 7):
            try:
                torch.ops.mtmerge.magnitude_threshold(xs=[x], k=k, selection="exact")
            except ValueError as e:
                assert "NaN" in str(e)
            else:
                raise AssertionError("NaN not rejected")
    assert C.selection_stats()["window_hits"] > 0, C.selection_stats()
    print("ok")
""")


@pytest.mark.parametrize("isa", ["avx512f", "avx2", "default"])
def test_window_pass_on_every_isa(isa):
    """The AVX-512, AVX2 and scalar window passes give the same selections (each run in a
    subprocess with MTMERGE_MAX_ISA capping the choice, which window_isa() confirms)."""
    extension()
    want = expected_isa(isa)
    if want != isa:
        pytest.skip(f"this CPU has no {isa}")
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _ISA_CHECK, want], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MTMERGE_MAX_ISA": isa})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
