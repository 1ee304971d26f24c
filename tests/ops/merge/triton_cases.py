"""Inputs and calls shared by the Triton tests (``test_triton_*.py``).

Inputs are built on CPU; the Triton launchers (``mtmerge.kernels.merge``, called directly by
keyword with the op schemas' arguments) get copies on ``TRITON_DEVICE`` (the GPU, or CPU under
the interpreter) and the reference runs on the CPU originals; results are compared on CPU, bit
for bit. Shapes are small and odd: the interpreter runs one program at a time.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mtmerge import _rng
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import DTYPES, TRITON_DEVICE, merge_scalars, rule, task_scalars, task_trim

SIZES = [0, 1, 7, 1000, 4099]
DARE_30 = _rng.dare_keep_threshold(0.3)
WEIGHTS = [0.7, 1.3, -0.4]
SCALES = [1.0, 1 / 0.3, 1.25]
ELECT_CASES = [("none", False), ("sum", False), ("sum", True), ("count", False), ("count", True)]

# cases covering sizes x dtypes, with base / consensus / tie-heavy data alternating
CASES = [
    (n, dtype, with_base, with_cons, kind)
    for i, (n, dtype) in enumerate(itertools.product(SIZES, DTYPES))
    for with_base, with_cons, kind in [[(True, False, "ties"), (False, True, "normal"), (True, True, "ties")][i % 3]]
]


def case_id(case):
    n, dtype, with_base, with_cons, kind = case
    return f"n{n}-{str(dtype)[6:]}-{'base' if with_base else 'nobase'}-{'cons' if with_cons else 'nocons'}-{kind}"


def triton_merge():
    pytest.importorskip("triton")
    from mtmerge.kernels import merge

    return merge


def dev(x, device=TRITON_DEVICE):
    """``x`` (a tensor, a list of tensors, None or anything else) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        return [t.to(device) for t in x]
    return x


def on(kwargs, device=TRITON_DEVICE):
    return {k: dev(v, device) for k, v in kwargs.items()}


def cpu(result):
    if isinstance(result, torch.Tensor):
        return result.cpu()
    return type(result)(cpu(r) for r in result)


def make_inputs(n, dtype, T=3, kind="normal", seed=0, with_base=True, shape=None):
    """CPU (base or None, [finetuned]) of dtype. "ties": values from a small set (heavy ties in
    |tau|, exact in every dtype); "normal": continuous values."""
    gen = torch.Generator().manual_seed(seed)
    shape = shape or (n,)
    if kind == "ties":
        base = torch.randint(-8, 9, shape, generator=gen).float() * 0.5
        fts = [base + torch.randint(-3, 4, shape, generator=gen).float() * 0.25 for _ in range(T)]
    else:
        base = torch.randn(shape, generator=gen)
        fts = [base + 0.1 * torch.randn(shape, generator=gen) for _ in range(T)]
    return (base.to(dtype) if with_base else None), [f.to(dtype) for f in fts]


def make_consensus(n, seed=1, p=0.6):
    gen = torch.Generator().manual_seed(seed)
    return ref.pack_bits(torch.rand(n, generator=gen) < p)


def trims(base, fts, selection, cons=None):
    n = fts[0].numel()
    return ref.delta_threshold(base, fts, [n // 2, n // 5, n], selection, False, cons)


def fused_args(case, selection="exact", dare=True, task_offset=0):
    """Keyword arguments of merge_fused / elect_sign_total but rule, merge_scalars and out (CPU)."""
    n, dtype, with_base, with_cons, kind = case
    base, fts = make_inputs(n, dtype, kind=kind, with_base=with_base)
    cons = make_consensus(n) if with_cons else None
    thresholds, cutoffs = trims(base, fts, selection, cons)
    keep = [DARE_30, _rng.dare_keep_threshold(1.0), _rng.dare_keep_threshold(0.8)] if dare else None
    return dict(base=base, finetuned=fts, task_scalars=task_scalars(WEIGHTS, SCALES),
                task_trim=task_trim(thresholds, cutoffs, seed=77, keep=keep, task_offset=task_offset),
                consensus=cons)


def knob_grid(elect, weighted):
    """(rule, zero fill) pairs: every merge / divisor / zero fill for an election."""
    if elect == "none":
        return [(rule("none", weighted, "sum", "count"), 1.0)]
    return [(rule(elect, weighted, m, d), z) for m, d, z in itertools.product(("mean", "sum", "max"),
                                                                             ("count", "weight"), (1.0, -1.0, 0.0))
            if m == "mean" or d == "count"]


ALL_KNOBS = [knobs for elect, weighted in ELECT_CASES for knobs in knob_grid(elect, weighted)]


def run_fused(impl, args, out_dtype, packed_rule, zero_fill=1.0, *, lam=0.9, shape=None, index_offset=0,
              device="cpu"):
    """``impl`` (a launcher, an op or the reference) into a fresh out filled with 7s on ``device``."""
    n = args["finetuned"][0].numel()
    out = torch.full(shape or (n,), 7.0, dtype=out_dtype, device=device)
    impl(**on(args, device), rule=packed_rule, merge_scalars=merge_scalars(lam, zero_fill, device), out=out,
         index_offset=index_offset)
    return out.cpu()


def both_fused(args, out_dtype, packed_rule, zero_fill=1.0, **kwargs):
    """(Triton on TRITON_DEVICE, reference on CPU)."""
    return (run_fused(triton_merge().merge_fused, args, out_dtype, packed_rule, zero_fill, device=TRITON_DEVICE,
                      **kwargs),
            run_fused(ref.merge_fused, args, out_dtype, packed_rule, zero_fill, **kwargs))
