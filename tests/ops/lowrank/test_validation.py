"""Bad input through the public low-rank API: a ValueError (TypeError for a wrong type) naming the
argument, raised before any kernel runs; and the LoRA kernels themselves, called directly with
adapter ids the API would reject, never crash the process (they treat an id outside ``[0, L)`` as
-1 or raise a Python exception)."""

from __future__ import annotations

import pytest
import torch

import mtmerge
from tests.ops import family_checks as checks
from tests.ops.lowrank.helpers import make_lama, make_linformer, make_lora

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def _lama(**changes):
    args = make_lama(2, 5, 4, 3, seed=200, masked=True, context=True)
    args.update(changes)
    h, P, Q = (args.pop(n) for n in ("h", "P", "Q"))
    return lambda: mtmerge.lama_pool(h, P, Q, **args)


def _linformer(**changes):
    args = make_linformer(2, 2, 3, 5, 4, 3, 6, seed=201, masked=True)
    args.update(changes)
    q, k, v, E, F = (args.pop(n) for n in ("q", "k", "v", "E", "F"))
    return lambda: mtmerge.linformer_attention(q, k, v, E, F, **args)


def _lora(**changes):
    args = make_lora(6, 5, 4, 2, 3, seed=202)
    args.update(changes)
    x, A, B, ids = (args.pop(n) for n in ("x", "A", "B", "adapter_ids"))
    return lambda: mtmerge.multi_lora(x, A, B, ids, **args)


def _bad_calls():
    lama = make_lama(2, 5, 4, 3, seed=200)
    lin = make_linformer(2, 2, 3, 5, 4, 3, 6, seed=201)
    lora = make_lora(6, 5, 4, 2, 3, seed=202)
    meta = torch.device("meta")
    return [
        # lama_pool
        (_lama(h=lama["h"].tolist()), TypeError, "h must be a tensor"),
        (_lama(h=lama["h"][0]), ValueError, r"h must be \[B, T, D\]"),
        (_lama(h=lama["h"].long()), ValueError, "h must be float32, bfloat16, float16 or float64"),
        (_lama(P=lama["P"][:3]), ValueError, r"P must be \[D, m\] with D = 4"),
        (_lama(P=lama["P"][:, :0], Q=lama["Q"][:, :0]), ValueError, "m >= 1"),
        (_lama(P=lama["P"][None]), ValueError, r"P must be \[D, m\]"),
        (_lama(P=lama["P"].double()), ValueError, "P has dtype torch.float64 but h has torch.float32"),
        (_lama(Q=lama["Q"][:, :2]), ValueError, "Q must have shape"),
        (_lama(Q=lama["Q"].half()), ValueError, "Q has dtype"),
        (_lama(mask=torch.ones(2, 5)), ValueError, "mask must be bool"),
        (_lama(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"mask must have shape \[B, T\]"),
        (_lama(context=torch.zeros(2, 5)), ValueError, r"context must have shape \[B, D\]"),
        (_lama(context=torch.zeros(2, 4, dtype=torch.bfloat16)), ValueError, "context has dtype"),
        (_lama(context=torch.zeros(2, 4, device=meta)), ValueError, "context is on meta"),
        # linformer_attention
        (_linformer(q=lin["q"][0]), ValueError, r"q must be \[B, Hh, Nq, d\]"),
        (_linformer(q=lin["q"].int()), ValueError, "q must be float"),
        (_linformer(k=lin["k"][:, :1], v=lin["v"][:, :1]), ValueError, "k must be .* Hh = 2"),
        (_linformer(k=lin["k"][..., :3], v=lin["v"][..., :3]), ValueError, "k must be .* d = 4"),
        (_linformer(k=lin["k"].double()), ValueError, "k has dtype"),
        (_linformer(v=lin["v"][:, :, :4]), ValueError, "v must have shape"),
        (_linformer(E=lin["E"][:, :4], F=lin["F"][:, :4]), ValueError, "E is 4 columns wide .* N = 5"),
        (_linformer(E=lin["E"][:0], F=lin["F"][:0]), ValueError, r"E must have at least one row"),
        (_linformer(E=lin["E"][0]), ValueError, r"E must be \[r, Nmax\]"),
        (_linformer(F=lin["F"][:2]), ValueError, "F must have shape"),
        (_linformer(F=lin["F"].half()), ValueError, "F has dtype"),
        (_linformer(key_padding_mask=torch.zeros(2, 5)), ValueError, "key_padding_mask must be bool"),
        (_linformer(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \[B, N\]"),
        (_linformer(scale="0.5"), TypeError, "scale must be a real number"),
        (_linformer(scale=float("nan")), ValueError, "scale must be finite"),
        (_linformer(k=lin["k"].to(meta)), ValueError, "k is on meta"),
        # multi_lora
        (_lora(x=torch.tensor(1.0)), ValueError, r"x must be \[\.\.\., in\]"),
        (_lora(x=lora["x"].int()), ValueError, "x must be float"),
        (_lora(A=lora["A"][..., :4]), ValueError, r"A must be \[L, r, in\] with in = 5"),
        (_lora(A=lora["A"][:, :0], B=lora["B"][..., :0]), ValueError, "r >= 1"),
        (_lora(A=lora["A"][0]), ValueError, r"A must be \[L, r, in\]"),
        (_lora(A=lora["A"].double()), ValueError, "A has dtype"),
        (_lora(B=lora["B"][..., :1]), ValueError, r"B must be \[L, out, r\] with L = 3 and r = 2"),
        (_lora(B=lora["B"][:2]), ValueError, "B must be .* L = 3"),
        (_lora(B=lora["B"].bfloat16()), ValueError, "B has dtype"),
        (_lora(adapter_ids=lora["adapter_ids"].float()), ValueError, "adapter_ids must be int32 or int64"),
        (_lora(adapter_ids=lora["adapter_ids"][:5]), ValueError, "adapter_ids must have x's leading shape"),
        (_lora(adapter_ids=torch.tensor([0, 1, 2, 3, 0, 1])), ValueError,
         r"adapter_ids must be in \[-1, 3\), got a value of 3"),
        (_lora(adapter_ids=torch.tensor([0, -2, 2, 1, 0, 1], dtype=torch.int32)), ValueError,
         r"adapter_ids must be in \[-1, 3\), got a value of -2"),
        (_lora(adapter_ids=lora["adapter_ids"].to(meta)), ValueError, "adapter_ids is on meta"),
        (_lora(scale=torch.ones(2)), ValueError, r"scale must have shape \[L\]"),
        (_lora(scale=torch.ones(3, dtype=torch.int64)), ValueError, "scale must be float"),
        (_lora(scale="1"), TypeError, "scale must be a real number"),
        (_lora(scale=True), TypeError, "scale must be a real number"),
        (_lora(scale=float("inf")), ValueError, "scale must be finite"),
        (_lora(base=lora["base"][:, :3]), ValueError, r"base must be \[\.\.\., out\]"),
        (_lora(base=lora["base"].half()), ValueError, "base has dtype"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_naming_the_argument(case):
    checks.check_rejected(*_bad_calls()[case])


def test_validation_runs_before_any_kernel(monkeypatch):
    """A rejected call never reaches the op (so no kernel sees an out-of-range id)."""
    checks.check_validation_runs_before_any_kernel(monkeypatch, _bad_calls())


def test_good_edge_cases_are_accepted():
    """ids of -1 only, one scale for all adapters as a 0-d tensor, N equal to E's width, no mask."""
    lora = make_lora(6, 5, 4, 2, 3, seed=203)
    y = mtmerge.multi_lora(lora["x"], lora["A"], lora["B"], torch.full((6,), -1), scale=torch.tensor(2.0),
                           base=lora["base"])
    assert torch.equal(y, lora["base"])
    lin = make_linformer(1, 1, 2, 6, 3, 2, 6, seed=204)
    assert mtmerge.linformer_attention(lin["q"], lin["k"], lin["v"], lin["E"], lin["F"]).shape == (1, 1, 2, 3)
    lama = make_lama(1, 3, 2, 1, seed=205)
    assert mtmerge.lama_pool(lama["h"], lama["P"], lama["Q"]).attn.shape == (1, 1, 3)


# run after family_checks' prelude (faulthandler on, torch and mtmerge imported, op = sys.argv[1])
_DIRECT = """
    assert mtmerge._library.cpu_kernel_registered(op), "no C++ kernel: nothing to test"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    A, B = torch.randn(3, 4, 8, generator=g), torch.randn(3, 5, 4, generator=g)
    scale, base, grad = torch.ones(3), torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    bad = torch.tensor([0, 1000, -7, 2**40, 2, 3], dtype=torch.int64)
    clean = torch.where((bad >= 0) & (bad < 3), bad, torch.full_like(bad, -1))
    for ids, like in ((bad, clean), (bad.clamp(-2**31, 2**31 - 1).int(), clean.int())):
        if op == "multi_lora":
            got = (torch.ops.mtmerge.multi_lora(x, A, B, ids, scale, base),)
            want = (torch.ops.mtmerge.multi_lora(x, A, B, like, scale, base),)
        else:
            got = torch.ops.mtmerge.multi_lora_backward(grad, x, A, B, ids, scale)
            want = torch.ops.mtmerge.multi_lora_backward(grad, x, A, B, like, scale)
        for a, b in zip(got, want):
            assert torch.equal(a, b), "an out-of-range id was not treated as -1"
    print("TREATED_AS_MINUS_ONE")
"""


@pytest.mark.parametrize("op", ["multi_lora", "multi_lora_backward"])
def test_kernels_survive_out_of_range_ids(op):
    """The C++ kernel called directly (no wrapper) with adapter ids 1000, 2**40, -7 and L = 3: the
    process ends normally: the ids are treated as -1 (docs/lowrank.md) or a Python exception is raised,
    never a signal."""
    checks.check_kernel_survives_out_of_range_ids(_DIRECT, op, "TREATED_AS_MINUS_ONE")
