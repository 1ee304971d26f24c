"""The merge pipeline's Triton launchers (``kernels/merge.py``) against the reference.

The launchers are called directly: on CPU tensors run by the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py when there is no GPU), else on CUDA tensors.
Keys, cutoffs, masks, DARE decisions and sign totals must equal the reference exactly; merged
outputs too (same fp32 operations in the same order), NaN compared as NaN. Shapes are small
and odd: the interpreter runs one program at a time.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl
from mtmerge.kernels import merge as triton_merge

import mtmerge
from mtmerge.reference import merge as ref

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 7, 1000, 4099]
DARE_30 = ref.dare_keep_threshold(0.3)
ONE = ref.DARE_KEEP_ONE


@pytest.fixture(autouse=True)
def _default_device():
    """Tensors made without a device (in the tests and the reference) land on DEVICE."""
    with torch.device(DEVICE):
        yield


def make_inputs(n, dtype, T=3, kind="normal", seed=0, with_base=True, shape=None):
    """(base or None, [finetuned]) of dtype. "ties": values from a small set (heavy ties in
    |tau|, exact in every dtype); "normal": continuous values."""
    gen = torch.Generator().manual_seed(seed)
    shape = shape or (n,)
    if kind == "ties":
        base = torch.randint(-8, 9, shape, generator=gen, device="cpu").float() * 0.5
        fts = [base + torch.randint(-3, 4, shape, generator=gen, device="cpu").float() * 0.25 for _ in range(T)]
    else:
        base = torch.randn(shape, generator=gen, device="cpu")
        fts = [base + 0.1 * torch.randn(shape, generator=gen, device="cpu") for _ in range(T)]
    fts = [f.to(DEVICE, dtype) for f in fts]
    return (base.to(DEVICE, dtype) if with_base else None), fts


def make_consensus(n, seed=1, p=0.6):
    gen = torch.Generator().manual_seed(seed)
    return ref.pack_bits(torch.rand(n, generator=gen, device="cpu") < p).to(DEVICE)


def assert_same(got, want):
    """Same dtype, shape and values (bit for bit apart from NaN payloads)."""
    assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def assert_same_pair(got, want):
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)


# cases covering sizes x dtypes, with base / consensus / tie-heavy data alternating
CASES = [
    (n, dtype, with_base, with_cons, kind)
    for i, (n, dtype) in enumerate(itertools.product(SIZES, DTYPES))
    for with_base, with_cons, kind in [[(True, False, "ties"), (False, True, "normal"), (True, True, "ties")][i % 3]]
]


def case_id(case):
    n, dtype, with_base, with_cons, kind = case
    return f"n{n}-{str(dtype)[6:]}-{'base' if with_base else 'nobase'}-{'cons' if with_cons else 'nocons'}-{kind}"


# ---- delta_threshold / tie_cutoffs ----------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_delta_threshold(case):
    n, dtype, with_base, with_cons, kind = case
    base, fts = make_inputs(n, dtype, kind=kind, with_base=with_base)
    cons = make_consensus(n) if with_cons else None
    for selection, ks in [("exact", [0, n // 3, max(n - 1, 0)]), ("geq", [min(1, n), n // 2, n])]:
        want = ref.delta_threshold(base, fts, ks, selection, False, cons)
        got = triton_merge.delta_threshold(base, fts, ks, selection, False, cons)
        assert_same_pair(got, want)


def test_delta_threshold_ties_in_later_blocks():
    """The kept ties end deep inside the data: the tie scan must find the right block."""
    n = 5000
    x = torch.zeros(n)
    x[::7] = 1.0
    x[4000:] = 2.0
    for k in (1000, 1001, 1500):  # 1000 entries are 2.0, the rest of the k are ties at 1.0
        want = ref.delta_threshold(None, [x, -x], [k, k + 3])
        assert_same_pair(triton_merge.delta_threshold(None, [x, -x], [k, k + 3]), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tie_cutoffs(dtype):
    n = 4099
    base, fts = make_inputs(n, dtype, kind="ties")
    cons = make_consensus(n)
    c = None if dtype == torch.float16 else cons
    thresholds = torch.tensor([0.25, 0.5, 0.0])  # magnitudes present many times
    for ties_kept in ([0, 1, 5], [-1, 400, 10**9], [1500, 2000, 17]):
        ties_kept = torch.tensor(ties_kept)
        want = ref.tie_cutoffs(base, fts, thresholds, ties_kept, c)
        assert_same(triton_merge.tie_cutoffs(base, fts, thresholds, ties_kept, c), want)
    # no tie at all: ties_kept <= 0 gives -1, else INT64_MAX ("all of them")
    none = torch.tensor([123.0, 123.0, 123.0])
    assert_same(triton_merge.tie_cutoffs(base, fts, none, torch.tensor([0, 1, -1])),
                ref.tie_cutoffs(base, fts, none, torch.tensor([0, 1, -1])))


def test_tie_cutoffs_empty():
    x = torch.zeros(0)
    for tk in ([0], [1], [-1]):
        assert_same(triton_merge.tie_cutoffs(None, [x], torch.tensor([0.0]), torch.tensor(tk)),
                    ref.tie_cutoffs(None, [x], torch.tensor([0.0]), torch.tensor(tk)))


# ---- DARE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 1000, 4099])
@pytest.mark.parametrize("with_base", [True, False])
def test_dare_abs_sums(n, with_base):
    base, fts = make_inputs(n, torch.bfloat16, with_base=with_base)
    for keep, offset in (([DARE_30, ONE, ref.dare_keep_threshold(0.9)], 0), ([ONE, ONE, ONE], 0),
                         ([DARE_30, DARE_30, DARE_30], 5)):
        want = ref.dare_abs_sums(base, fts, 1234, keep, offset)
        got = triton_merge.dare_abs_sums(base, fts, 1234, keep, offset)
        assert got.dtype == torch.float64 and got.shape == (3, 2)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_dare_abs_sums_empty():
    assert_same(triton_merge.dare_abs_sums(None, [torch.zeros(0)] * 2, 1, [DARE_30, ONE]),
                ref.dare_abs_sums(None, [torch.zeros(0)] * 2, 1, [DARE_30, ONE]))


@pytest.mark.parametrize("seed, task_offset", [(0, 0), (2**40 + 7, 0), (11, 5)])
def test_dare_keep_decisions_bit_for_bit(seed, task_offset):
    """Through merge_fused with no trim, elect="none", scales 1 and weights 1, 2, 4: out encodes
    each task's keep decision in one bit (task t draws the stream of task task_offset + t)."""
    n, T = 4099, 3
    ones = [torch.ones(n)] * T
    keep = [DARE_30, ref.dare_keep_threshold(0.5), DARE_30]
    thresholds = torch.zeros(T)
    cutoffs = torch.full((T,), ref.INT64_MAX)
    out = torch.empty(n)
    triton_merge.merge_fused(None, ones, [1.0, 2.0, 4.0], [1.0] * T, thresholds, cutoffs, seed, keep, None, "none",
                             False, 1, "sum", "count", 1.0, False, out, task_offset)
    code = out.to(torch.int64)
    for t in range(T):
        got = (code >> t) & 1 == 1
        assert torch.equal(got, ref.dare_keep_mask(n, seed, task_offset + t, keep[t]))
        assert 0.2 < got.float().mean() < 0.6


@triton.jit
def _dare_probe_kernel(out_ptr, start, keep, task_key, BLOCK: tl.constexpr):
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + tl.arange(0, BLOCK), triton_merge._dare_kept(offs, keep, task_key).to(tl.int8))


@pytest.mark.parametrize("start", [2**32 - 64, 2**40 + 3, 2**62])
def test_dare_hash_high_word(start):
    """Flat indices >= 2**32 (tensors of more than 4G entries) hash their high word too."""
    key = ref.dare_task_key(99, 2)
    out = torch.empty(128, dtype=torch.int8)
    _dare_probe_kernel[(1,)](out, start, DARE_30, key, BLOCK=128)
    index = torch.arange(start, start + 128, dtype=torch.int64)
    assert torch.equal(out.bool(), ref.dare_hash(index, key) < DARE_30)


# ---- elect_sign_total / merge_fused ---------------------------------------------------------

WEIGHTS = [0.7, 1.3, -0.4]
SCALES = [1.0, 1 / 0.3, 1.25]
ELECT_CASES = [("none", False), ("sum", False), ("sum", True), ("count", False), ("count", True)]


def trims(base, fts, selection, cons=None):
    n = fts[0].numel()
    return ref.delta_threshold(base, fts, [n // 2, n // 5, n], selection, False, cons)


def fused_args(case, selection="exact", dare=True):
    n, dtype, with_base, with_cons, kind = case
    base, fts = make_inputs(n, dtype, kind=kind, with_base=with_base)
    cons = make_consensus(n) if with_cons else None
    thresholds, cutoffs = trims(base, fts, selection, cons)
    keep = [DARE_30, ONE, ref.dare_keep_threshold(0.8)] if dare else [ONE] * 3
    return base, fts, thresholds, cutoffs, keep, cons


@pytest.mark.parametrize("case", CASES[1::2], ids=case_id)
def test_elect_sign_total(case):
    base, fts, thresholds, cutoffs, keep, cons = fused_args(case)
    for elect, weighted in ELECT_CASES:
        args = (base, fts, WEIGHTS, SCALES, thresholds, cutoffs, 77, keep, elect, weighted, cons)
        assert_same(triton_merge.elect_sign_total(*args), ref.elect_sign_total(*args))


def run_fused(impl, args, out_dtype, shape=None, **knobs):
    base, fts, thresholds, cutoffs, keep, cons = args
    n = fts[0].numel()
    out = torch.full(shape or (n,), 7.0, dtype=out_dtype)
    impl(base, fts, WEIGHTS, SCALES, thresholds, cutoffs, 77, keep, cons, knobs["elect"], knobs["elect_weighted"],
         knobs["zero_fill"], knobs["merge"], knobs["divisor"], knobs.get("lam", 0.9),
         knobs.get("allow_nonfinite", False), out, knobs.get("task_offset", 0), knobs.get("with_base", True))
    return out


def knob_grid(elect, weighted):
    if elect == "none":
        return [dict(elect=elect, elect_weighted=weighted, zero_fill=1, merge="mean", divisor="count")]
    return [dict(elect=elect, elect_weighted=weighted, zero_fill=z, merge=m, divisor=d)
            for m, d, z in itertools.product(ref.MERGES, ref.DIVISORS, (1, -1, 0)) if m == "mean" or d == "count"]


ALL_KNOBS = [knobs for elect, weighted in ELECT_CASES for knobs in knob_grid(elect, weighted)]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == 1000], ids=case_id)
@pytest.mark.parametrize("dare", [True, False])
def test_merge_fused_all_knobs(case, dare):
    """Every elect / weighted / merge / divisor / zero_fill combination, bit for bit."""
    dtype = case[1]
    args = fused_args(case, "exact" if dare else "geq", dare=dare)
    for knobs in ALL_KNOBS if dare else ALL_KNOBS[::3]:
        assert_same(run_fused(triton_merge.merge_fused, args, dtype, **knobs),
                    run_fused(ref.merge_fused, args, dtype, **knobs))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != 1000], ids=case_id)
def test_merge_fused_sizes(case):
    """Odd sizes (0, 1, 7, several blocks) with a rotating subset of the knobs."""
    n, dtype = case[0], case[1]
    args = fused_args(case, "exact" if n % 2 else "geq")
    for knobs in ALL_KNOBS[n % 5 :: 7]:
        assert_same(run_fused(triton_merge.merge_fused, args, dtype, **knobs),
                    run_fused(ref.merge_fused, args, dtype, **knobs))


@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                 (torch.float16, torch.bfloat16), (torch.float32, torch.float16)])
def test_merge_fused_output_dtypes(in_dtype, out_dtype):
    args = fused_args((1000, in_dtype, True, True, "normal"))
    for knobs in knob_grid("sum", True)[:3]:
        knobs["lam"] = 1.7
        assert_same(run_fused(triton_merge.merge_fused, args, out_dtype, **knobs),
                    run_fused(ref.merge_fused, args, out_dtype, **knobs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_fused_without_base_in_output_and_task_offset(dtype):
    args = fused_args((1000, dtype, True, False, "normal"))
    for knobs in ALL_KNOBS[::4]:
        knobs = dict(knobs, with_base=False, task_offset=3)
        assert_same(run_fused(triton_merge.merge_fused, args, dtype, **knobs),
                    run_fused(ref.merge_fused, args, dtype, **knobs))


def test_merge_fused_mixed_input_dtypes():
    base, fts = make_inputs(777, torch.float32)
    fts = [fts[0].bfloat16(), fts[1].half(), fts[2]]
    thresholds, cutoffs = trims(base, fts, "exact")
    args = (base.bfloat16(), fts, thresholds, cutoffs, [DARE_30] * 3, None)
    knobs = dict(elect="sum", elect_weighted=False, zero_fill=1, merge="mean", divisor="count")
    assert_same(run_fused(triton_merge.merge_fused, args, torch.float32, **knobs),
                run_fused(ref.merge_fused, args, torch.float32, **knobs))


def test_non_contiguous_inputs_and_output():
    n_rows, n_cols = 37, 29  # 1073 entries
    base, fts = make_inputs(0, torch.bfloat16, kind="ties", shape=(n_cols, n_rows))
    base, fts = base.T, [f.T for f in fts]  # row-major order of the views differs from storage
    assert not base.is_contiguous()
    contiguous = (base.contiguous(), [f.contiguous() for f in fts])
    n = base.numel()
    cons = make_consensus(n)
    for sel in ("exact", "geq"):
        ks = [n // 2, 3, n]
        assert_same_pair(triton_merge.delta_threshold(base, fts, ks, sel, False, cons),
                         ref.delta_threshold(*contiguous, ks, sel, False, cons))
    thresholds, cutoffs = ref.delta_threshold(base, fts, [n // 2, 3, n], "exact")
    assert_same(triton_merge.tie_cutoffs(base, fts, thresholds, torch.tensor([1, 2, 3])),
                ref.tie_cutoffs(*contiguous, thresholds, torch.tensor([1, 2, 3])))
    args = (base, fts, thresholds, cutoffs, [DARE_30, ONE, DARE_30], cons)
    knobs = dict(elect="sum", elect_weighted=True, zero_fill=1, merge="mean", divisor="weight")
    out = torch.full((n_cols, n_rows), 7.0, dtype=torch.float16).T  # non-contiguous output
    triton_merge.merge_fused(base, fts, WEIGHTS, SCALES, thresholds, cutoffs, 77, args[4], cons, "sum", True, 1,
                             "mean", "weight", 0.9, False, out)
    want = run_fused(ref.merge_fused, (*contiguous, *args[2:]), torch.float16, shape=(n_rows, n_cols), **knobs)
    assert_same(out, want)
    merged = torch.randn(n_cols, n_rows).T
    assert_same(triton_merge.tall_masks(base, fts, merged, [0.5, 1.0, 2.0]),
                ref.tall_masks(*contiguous, merged.contiguous(), [0.5, 1.0, 2.0]))


def test_merge_fused_in_place_into_base():
    base, fts = make_inputs(1000, torch.float32)
    thresholds, cutoffs = trims(base, fts, "exact")
    keep = [DARE_30] * 3
    want = torch.empty(1000)
    ref.merge_fused(base, fts, WEIGHTS, SCALES, thresholds, cutoffs, 5, keep, None, "sum", False, 1, "mean", "count",
                    0.5, False, want)
    triton_merge.merge_fused(base, fts, WEIGHTS, SCALES, thresholds, cutoffs, 5, keep, None, "sum", False, 1, "mean",
                             "count", 0.5, False, base)
    assert_same(base, want)


# ---- TALL masks / Consensus -----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_tall_masks_and_consensus(case):
    n, dtype, with_base, _, kind = case
    for T in (0, 1, 3):
        base, fts = make_inputs(n, dtype, T=T, kind=kind, with_base=with_base)
        merged = (torch.randn(n) * 0.1).to(dtype)
        lams = [0.2, 1.0, 3.0][:T]
        masks = triton_merge.tall_masks(base, fts, merged, lams)
        assert_same(masks, ref.tall_masks(base, fts, merged, lams))
        for k in (0, 1, 2, T + 1):
            assert_same(triton_merge.consensus_mask(masks, k), ref.consensus_mask(masks, k))


def test_consensus_mask_non_contiguous():
    gen = torch.Generator().manual_seed(3)
    masks = torch.randint(0, 256, (1030, 4), generator=gen, dtype=torch.uint8, device="cpu").to(DEVICE).T
    for k in (1, 2, 3):
        assert_same(triton_merge.consensus_mask(masks, k), ref.consensus_mask(masks.contiguous(), k))


# ---- NaN / Inf policy and bad input ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_task_vectors_in_delta_threshold(dtype):
    base, fts = make_inputs(1000, dtype)
    fts[1][10] = float("nan")
    for impl in (ref.delta_threshold, triton_merge.delta_threshold):
        with pytest.raises(ValueError, match=r"finetuned\[1\]: its task vector has 1 NaN"):
            impl(base, fts, [5, 5, 5])
        with pytest.raises(ValueError, match=r"finetuned\[1\]: its task vector has 1 NaN"):
            impl(base, fts, [5, 5, 5], allow_nonfinite=True)
        with pytest.raises(ValueError, match=r"finetuned\[1\]: .* NaN"):  # reported before a bad k
            impl(base, fts, [5000, 5, 5])
        with pytest.raises(ValueError, match=r"finetuned\[1\]: .* NaN"):
            impl(base, fts, [5, 5, 5], consensus=torch.full((125,), 255, dtype=torch.uint8))
    # NaN outside the consensus mask is not part of the task vector
    cons = torch.full((125,), 255, dtype=torch.uint8)
    cons[1] = 0  # entries 8..15
    assert_same_pair(triton_merge.delta_threshold(base, fts, [5, 500, 1000], consensus=cons),
                     ref.delta_threshold(base, fts, [5, 500, 1000], consensus=cons))
    fts[1][10] = float("-inf")
    for impl in (ref.delta_threshold, triton_merge.delta_threshold):
        with pytest.raises(ValueError, match=r"finetuned\[1\]: its task vector has 1 Inf .*allow_nonfinite=True"):
            impl(base, fts, [5, 5, 5])
    for sel in ("exact", "geq"):
        assert_same_pair(triton_merge.delta_threshold(base, fts, [1, 2, 1000], sel, True),
                         ref.delta_threshold(base, fts, [1, 2, 1000], sel, True))
    fts[1][10] = float("nan")
    for impl in (ref.tie_cutoffs, triton_merge.tie_cutoffs):
        with pytest.raises(ValueError, match=r"finetuned\[1\]: its task vector has 1 NaN"):
            impl(base, fts, torch.zeros(3), torch.ones(3, dtype=torch.int64))


def test_nonfinite_inputs_in_merge_fused():
    base, fts = make_inputs(1000, torch.float32)
    thresholds, cutoffs = trims(base, fts, "exact")
    knobs = dict(elect="sum", elect_weighted=False, zero_fill=1, merge="mean", divisor="count")
    for where, value, name in [(None, float("nan"), "base"), (2, float("inf"), r"finetuned\[2\]")]:
        b, f = base.clone(), [x.clone() for x in fts]
        (b if where is None else f[where])[999] = value
        args = (b, f, thresholds, cutoffs, [DARE_30] * 3, None)
        for impl in (ref.merge_fused, triton_merge.merge_fused):
            with pytest.raises(ValueError, match=rf"^{name} contains NaN or Inf; pass allow_nonfinite=True"):
                run_fused(impl, args, torch.float32, **knobs)
        for knobs in knob_grid("sum", False) + knob_grid("count", True) + knob_grid("none", False):
            assert_same(run_fused(triton_merge.merge_fused, args, torch.float32, allow_nonfinite=True, **knobs),
                        run_fused(ref.merge_fused, args, torch.float32, allow_nonfinite=True, **knobs))


def test_bad_arguments_raise_value_error():
    base, fts = make_inputs(100, torch.float32)
    thresholds, cutoffs = trims(base, fts, "exact")
    fused = (base, fts, WEIGHTS, SCALES, thresholds, cutoffs, 1, [ONE] * 3, None)
    out = torch.empty(100)
    cases = [
        (lambda: triton_merge.delta_threshold(base, fts, [1, 2]), "ks must hold one value per task"),
        (lambda: triton_merge.delta_threshold(base, fts, [1, 2, 101]), r"ks must be in \[0, 100\], got 101"),
        (lambda: triton_merge.delta_threshold(base, fts, [1, 2, 3], "top"), "selection must be"),
        (lambda: triton_merge.delta_threshold(base, [], []), "at least one tensor"),
        (lambda: triton_merge.delta_threshold(base, [fts[0][:50]], [1]), r"finetuned\[0\] has 50 elements"),
        (lambda: triton_merge.delta_threshold(base, fts, [1] * 3, consensus=torch.zeros(3, dtype=torch.uint8)),
         "consensus must hold"),
        (lambda: triton_merge.merge_fused(*fused, "vote", False, 1, "mean", "count", 1.0, False, out), "elect"),
        (lambda: triton_merge.merge_fused(*fused, "sum", False, 1, "median", "count", 1.0, False, out), "merge"),
        (lambda: triton_merge.merge_fused(*fused, "sum", False, 1, "mean", "tasks", 1.0, False, out), "divisor"),
        (lambda: triton_merge.merge_fused(*fused, "sum", False, 1, "mean", "count", 1.0, False, out[:10]), "out"),
        (lambda: triton_merge.elect_sign_total(base, fts, WEIGHTS[:2], SCALES, thresholds, cutoffs, 1, [ONE] * 3),
         "weights"),
        (lambda: triton_merge.tall_masks(base, fts, torch.zeros(99), [1.0] * 3), "merged"),
        (lambda: triton_merge.consensus_mask(torch.zeros(8, dtype=torch.uint8)), "2-D"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        triton_merge.delta_threshold(base.double(), fts, [1, 1, 1])


# ---- GPU code generation (no GPU needed) ----------------------------------------------------

_COMPILE_CHECK = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mtmerge.kernels import merge as K

    fn = K._merge_kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    sig = dict(base_ptr="*fp32", ft_ptrs=("*bf16", "*fp32", "*fp16"), cons_ptr="*u8", fparams_ptr="*fp32",
               iparams_ptr="*i64", out_ptr="*bf16", bad_ptr="*i32", partial_ptr="*i64", n="i64", lam="fp32",
               zero_fill="fp32", index_offset="i64")
    consts = dict(T=3, HAS_BASE=True, ADD_BASE=True, HAS_CONS=True, DARE=True, ELECT=1, WEIGHTED=True, MERGE=0,
                  DIV_WEIGHT=True, CHECK=True, SIGN_TOTAL=False, BLOCK=1024)
    signature = {a: "constexpr" if a in consts else sig[a] for a in fn.arg_names}
    ptx = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                         target=GPUTarget("cuda", 80, 32), options=K._EXACT).asm["ptx"]
    assert "fma.rn.f32" not in ptx, "fp contraction must be off"
    assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx, "division must be IEEE"
    print("ok")
""")


def test_merge_kernel_compiles_for_gpu_without_contraction():
    """The interpreter ignores fp contraction and approximate division; the compiled kernel
    must have neither (else GPU results would differ from the reference in the last bit)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MTMERGE_NO_EXTENSION"] = "1"  # only the Triton module is needed
    proc = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas to finish the CUDA compile")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_dare_masks_identical_between_cpp_and_triton():
    """The C++ kernel (torch.ops on CPU) and the Triton kernel draw the same DARE masks."""
    assert mtmerge._library.cpu_kernel_registered("merge_fused"), "the C++ extension must be built for this test"
    n, count = 3001, 3
    ones = [torch.ones(n) for _ in range(count)]
    keep = [ref.dare_keep_threshold(d) for d in (0.1, 0.5, 0.9)]
    thr = torch.zeros(count)
    cut = torch.full((count,), ref.INT64_MAX, dtype=torch.int64)
    for seed, offset in [(0, 0), (12345, 7), (2**63 - 1, 1)]:
        for t in range(count):
            weights = [1.0 if s == t else 0.0 for s in range(count)]  # output = task t's mask
            got_cpp = torch.empty(n)
            got_triton = torch.empty(n)
            args = (None, ones, weights, [1.0] * count, thr, cut, seed, keep, None, "none", False, 1, "sum", "count",
                    1.0, False)
            torch.ops.mtmerge.merge_fused(*args, got_cpp, offset)
            triton_merge.merge_fused(*args, got_triton, offset)
            assert torch.equal(got_cpp, got_triton)
            assert torch.equal(got_cpp.bool(), ref.dare_keep_mask(n, seed, offset + t, keep[t]))


def test_dare_index_offset_matches_cpp():
    """A chunk merged with index_offset = its start draws the whole tensor's DARE stream, in
    Triton as in C++ (the pipeline merges huge tensors in chunks)."""
    n, count, start = 777, 2, 5000
    base = torch.randn(n)
    fts = [base + torch.randn(n) for _ in range(count)]
    keep = [ref.dare_keep_threshold(0.4)] * count
    thr = torch.zeros(count)
    cut = torch.full((count,), ref.INT64_MAX, dtype=torch.int64)
    args = (base, fts, [1.0, 0.5], [2.5, 2.5], thr, cut, 3, keep, None, "sum", True, 1, "sum", "count", 1.0, False)
    got_cpp, got_triton = torch.empty(n), torch.empty(n)
    torch.ops.mtmerge.merge_fused(*args, got_cpp, 0, True, start)
    triton_merge.merge_fused(*args, got_triton, 0, True, start)
    assert torch.equal(got_cpp, got_triton)
    sums_cpp = torch.ops.mtmerge.dare_abs_sums(base, fts, 3, keep, 0, start)
    torch.testing.assert_close(triton_merge.dare_abs_sums(base, fts, 3, keep, 0, start), sums_cpp, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_histogram(dtype):
    n = 1003
    base = torch.randn(n).to(dtype)
    fts = [(base.float() + torch.randn(n) * 0.1).to(dtype) for _ in range(3)]
    cons = ref.pack_bits(torch.arange(n) % 5 != 0)
    for args in [(16, 15, [0, 0, 0], 31), (0, 16, [0x3C00, 0x3D00, 0x3E00], 16), (5, 11, [1, 2, 3], 31)]:
        for b, c in [(base, None), (None, cons), (base, cons)]:
            want = ref.magnitude_histogram(b, fts, *args, c)
            assert torch.equal(triton_merge.magnitude_histogram(b, fts, *args, c), want)
