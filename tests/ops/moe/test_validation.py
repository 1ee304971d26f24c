"""Bad input through the public MoE API: a ValueError (TypeError for a wrong type) naming the
argument, raised before any kernel runs; and the kernels themselves, called directly with ids
the API would reject, never crash the process (they treat an id outside ``[0, E)`` as -1 or
raise a Python exception)."""

from __future__ import annotations

import pytest
import torch

import mtmerge
from tests.ops import family_checks as checks
from tests.ops.moe.helpers import make_experts, make_ids, make_logits, make_weights, make_x

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def _experts_args(tokens=5, hidden=8, ffn=4, experts=3, k=2):
    w = make_experts(experts, hidden, ffn, seed=120, bias=True)
    return dict(x=make_x(tokens, hidden, seed=121), gate_up=w["gate_up"], down=w["down"],
                weights=make_weights(tokens, k, seed=122), ids=make_ids(tokens, experts, k, seed=123),
                gate_up_bias=w["gate_up_bias"], down_bias=w["down_bias"])


def _experts(**changes):
    args = _experts_args()
    args.update(changes)
    x, gu, dn, w, ids = (args.pop(n) for n in ("x", "gate_up", "down", "weights", "ids"))
    return lambda: mtmerge.moe_experts(x, gu, dn, w, ids, **args)


def _task_gate(**changes):
    args = dict(x=make_x(6, 5, seed=124), router=torch.randn(2, 4, 5), task_ids=torch.tensor([0, 1, 1, 0, 1, 0]),
                k=2)
    args.update(changes)
    x, router, task_ids, k = (args.pop(n) for n in ("x", "router", "task_ids", "k"))
    return lambda: mtmerge.moe_task_gate(x, router, task_ids, k, **args)


def _bad_calls():
    logits = make_logits(6, 5, seed=125)
    nan_logits = logits.clone()
    nan_logits[2, 3] = float("nan")
    ids = make_ids(6, 5, 2, seed=126)
    meta = torch.empty(6, 5, device="meta")
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 1:] = False
    a = _experts_args()
    return [
        # moe_topk_gate
        (lambda: mtmerge.moe_topk_gate(logits, 6), ValueError, r"k must be in \[0, 5\]"),
        (lambda: mtmerge.moe_topk_gate(logits, -1), ValueError, "k must be"),
        (lambda: mtmerge.moe_topk_gate(logits, 2.0), TypeError, "k must be an int"),
        (lambda: mtmerge.moe_topk_gate(nan_logits, 2), ValueError, "logits contains NaN"),
        (lambda: mtmerge.moe_topk_gate(logits[0], 2), ValueError, r"logits must be \[T, E\]"),
        (lambda: mtmerge.moe_topk_gate(logits.long(), 2), ValueError, "logits must be float32"),
        (lambda: mtmerge.moe_topk_gate(logits, 2, scoring="softplus"), ValueError, "scoring must be one of"),
        (lambda: mtmerge.moe_topk_gate(logits, 2, renormalize=1), TypeError, "renormalize must be a bool"),
        (lambda: mtmerge.moe_topk_gate(logits, 2, bias=torch.zeros(4)), ValueError, r"bias must have shape \[E\]"),
        (lambda: mtmerge.moe_topk_gate(logits, 2, bias=torch.zeros(5, dtype=torch.int32)), ValueError,
         "bias must be float"),
        (lambda: mtmerge.moe_topk_gate(logits, 2, bias=torch.zeros(5, device="meta")), ValueError, "bias is on meta"),
        (lambda: mtmerge.moe_topk_gate([[1.0, 2.0]], 1), TypeError, "logits must be a tensor"),
        # moe_task_gate
        (_task_gate(k=5), ValueError, "k must be in"),
        (_task_gate(expert_mask=mask), ValueError, r"k must be in \[0, 1\].*fewest experts a task may use is 1"),
        (_task_gate(expert_mask=mask.int()), ValueError, "expert_mask must be bool"),
        (_task_gate(expert_mask=mask[:, :3]), ValueError, r"expert_mask must have shape \[n_tasks, E\]"),
        (_task_gate(task_ids=torch.tensor([0, 1, 2, 0, 1, 0])), ValueError, r"task_ids must be in \[0, 2\)"),
        (_task_gate(task_ids=torch.tensor([0, 1, -1, 0, 1, 0])), ValueError, r"task_ids must be in \[0, 2\)"),
        (_task_gate(task_ids=torch.tensor([0, 1, 1])), ValueError, r"task_ids must have shape \[T\]"),
        (_task_gate(task_ids=torch.zeros(6)), ValueError, "task_ids must be int32 or int64"),
        (_task_gate(router=torch.randn(2, 4, 5, dtype=torch.float64)), ValueError, "router has dtype"),
        (_task_gate(router=torch.randn(2, 4, 6)), ValueError, r"router must be \[n_tasks, E, H\]"),
        (_task_gate(router=torch.randn(0, 4, 5)), ValueError, "router must hold at least one task"),
        (_task_gate(x=torch.full((6, 5), float("nan"))), ValueError, "x contains NaN"),
        (_task_gate(scoring="max"), ValueError, "scoring must be one of"),
        # moe_align
        (lambda: mtmerge.moe_align(ids, 4), ValueError, r"ids must be in \[-1, 4\), got a value of 4"),
        (lambda: mtmerge.moe_align(ids - 3, 5), ValueError, r"ids must be in \[-1, 5\), got a value of -3"),
        (lambda: mtmerge.moe_align(ids.float(), 5), ValueError, "ids must be int32 or int64"),
        (lambda: mtmerge.moe_align(ids.reshape(-1), 5), ValueError, r"ids must be \[T, k\]"),
        (lambda: mtmerge.moe_align(ids, 0), ValueError, "num_experts must be >= 1"),
        (lambda: mtmerge.moe_align(ids, 5, capacity=-1), ValueError, "capacity must be >= 0"),
        (lambda: mtmerge.moe_align(ids, 5, capacity=1.5), TypeError, "capacity must be an int"),
        # moe_experts
        (_experts(ids=a["ids"] + 1), ValueError, r"ids must be in \[-1, 3\), got a value of 3"),
        (_experts(ids=torch.full((5, 2), -2)), ValueError, r"ids must be in \[-1, 3\), got a value of -2"),
        (_experts(ids=a["ids"].float()), ValueError, "ids must be int32 or int64"),
        (_experts(ids=a["ids"][:4]), ValueError, r"ids must be \[T, k\]"),
        (_experts(weights=a["weights"][:, :1]), ValueError, "weights has shape"),
        (_experts(weights=a["weights"].long()), ValueError, "weights must be float"),
        (_experts(x=a["x"].half()), ValueError, "gate_up has dtype"),
        (_experts(x=a["x"][:, :7]), ValueError, r"gate_up must be \[E, 2F, H\] with H = 7"),
        (_experts(gate_up=a["gate_up"][:, :7]), ValueError, "even 2F"),
        (_experts(down=a["down"][:, :, :3]), ValueError, r"down must have shape \[E, H, F\]"),
        (_experts(down=a["down"].double()), ValueError, "down has dtype"),
        (_experts(gate_up_bias=a["gate_up_bias"][:, :4]), ValueError, r"gate_up_bias must have shape \[E, 2F\]"),
        (_experts(down_bias=a["down_bias"].half()), ValueError, "down_bias has dtype"),
        (_experts(activation="swiglu"), ValueError, "activation must be one of"),
        (_experts(x=torch.empty(5, 8, device="meta")), ValueError, "gate_up is on cpu but x is on meta"),
        # losses
        (lambda: mtmerge.load_balancing_loss(logits, ids, 4, 2), ValueError, r"router_logits must be \[T, E\]"),
        (lambda: mtmerge.load_balancing_loss(logits, ids, 5, 3), ValueError, r"ids must be \[T, k\] with k = 3"),
        (lambda: mtmerge.load_balancing_loss(logits, ids, 5, 6), ValueError, "k must be in"),
        (lambda: mtmerge.load_balancing_loss(logits, ids[:3], 5, 2), ValueError, "ids has 3 rows"),
        (lambda: mtmerge.load_balancing_loss(logits, ids + 1, 5, 2), ValueError, r"ids must be in \[-1, 5\)"),
        (lambda: mtmerge.load_balancing_loss([logits, logits], ids, 5, 2), ValueError, "one tensor per layer"),
        (lambda: mtmerge.load_balancing_loss([], None, 5, 2), ValueError, "router_logits must hold at least one"),
        (lambda: mtmerge.load_balancing_loss([logits, logits.half()], None, 5, 2), ValueError,
         r"router_logits\[1\] has dtype"),
        (lambda: mtmerge.load_balancing_loss("logits", None, 5, 2), TypeError, "router_logits must be a tensor"),
        (lambda: mtmerge.router_z_loss(logits[0]), ValueError, r"router_logits must be \[T, E\]"),
        (lambda: mtmerge.router_z_loss(meta.long()), ValueError, "router_logits must be float"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_naming_the_argument(case):
    checks.check_rejected(*_bad_calls()[case])


def test_validation_runs_before_any_kernel(monkeypatch):
    """A rejected call never reaches the op (so no kernel sees an out-of-range id)."""
    checks.check_validation_runs_before_any_kernel(monkeypatch, _bad_calls())


def test_ids_of_minus_one_are_accepted():
    a = _experts_args()
    ids = torch.full_like(a["ids"], -1)
    y = mtmerge.moe_experts(a["x"], a["gate_up"], a["down"], a["weights"], ids)
    assert torch.equal(y, torch.zeros_like(a["x"]))
    out = mtmerge.moe_align(ids, 3, capacity=1)
    assert out.expert_offsets.tolist() == [0, 0, 0, 0] and int(out.dropped) == 0


# run after family_checks' prelude (faulthandler on, torch and mtmerge imported, op = sys.argv[1])
_DIRECT = """
    assert mtmerge._library.cpu_kernel_registered("moe_experts"), "no C++ kernel: nothing to test"
    bad = torch.tensor([[0, 1000], [-7, 2**40], [2, -1], [1, 3]], dtype=torch.int64)
    clean = torch.where((bad >= 0) & (bad < 3), bad, torch.full_like(bad, -1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g)
    gate_up, down = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 4, generator=g)
    w = torch.rand(4, 2, generator=g)
    for ids, like in ((bad, clean), (bad.clamp(-2**31, 2**31 - 1).int(), clean.int())):
        if op == "moe_experts":
            got = torch.ops.mtmerge.moe_experts(x, gate_up, down, w, ids, "silu", None, None)
            want = torch.ops.mtmerge.moe_experts(x, gate_up, down, w, like, "silu", None, None)
        elif op == "moe_experts_backward":
            got = torch.ops.mtmerge.moe_experts_backward(x, x, gate_up, down, w, ids, "silu", None, None)[:4]
            want = torch.ops.mtmerge.moe_experts_backward(x, x, gate_up, down, w, like, "silu", None, None)[:4]
        elif op == "moe_align":
            got = torch.ops.mtmerge.moe_align(ids, 3, -1)
            want = torch.ops.mtmerge.moe_align(like, 3, -1)
        else:
            got = torch.ops.mtmerge.moe_load_balancing_loss(torch.randn(4, 3, generator=g), ids, 3)
            want = None
        if want is not None:
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert torch.equal(a, b), "an out-of-range id was not treated as -1"
    print("TREATED_AS_UNROUTED")
"""


@pytest.mark.parametrize("op", ["moe_experts", "moe_align", "moe_experts_backward", "moe_load_balancing_loss"])
def test_kernels_survive_out_of_range_ids(op):
    """The C++ kernel called directly (no wrapper) with ids 1000, 2**40, -7: the process ends
    normally: the ids are treated as -1 (docs/moe.md) or a Python exception is raised, never a signal."""
    checks.check_kernel_survives_out_of_range_ids(_DIRECT, op, "TREATED_AS_UNROUTED")
