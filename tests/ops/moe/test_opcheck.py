"""``torch.library.opcheck`` on every op of the MoE family (schema, fake/meta, autograd
registration), on CPU (the C++ kernels) and on CUDA (Triton) when a GPU is present; each op on
the same argument sets against its reference; the public wrappers as thin layers over the ops."""

from __future__ import annotations

import pytest
import torch

import mtmerge
from mtmerge.reference import moe as ref
from tests.ops import family_checks as checks
from tests.ops.moe.helpers import (
    DEVICES,
    assert_experts_close,
    assert_same,
    make_experts,
    make_logits,
    make_x,
    moe_op_names,
    op_cases,
)

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def test_every_op_of_the_family_has_cases():
    assert set(op_cases()) == set(moe_op_names())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(moe_op_names()))
def test_opcheck(name, device):
    checks.check_opcheck(name, op_cases(device)[name])


@pytest.mark.parametrize("name", sorted(moe_op_names()))
def test_fake_matches_the_cpu_output(name):
    """The fake's output metadata (shape, dtype) is what the kernel returns, case by case."""
    checks.check_fake_matches_the_real_output(name, op_cases()[name])


def _assert_matches_reference(name, got, want, dtype):
    """ids and permutations bit for bit; gate weights within 1e-6; GEMM-like results within the
    per-dtype tolerance of docs/moe.md."""
    for g, w in zip(got, want, strict=True):
        assert (g.dtype, tuple(g.shape)) == (w.dtype, tuple(w.shape)), name
        if not g.dtype.is_floating_point:
            assert_same(g, w)
        elif name in ("moe_topk_gate", "moe_task_gate", "moe_load_balancing_loss", "moe_router_z_loss"):
            torch.testing.assert_close(g.cpu(), w.cpu(), rtol=1e-6, atol=1e-6)
        else:
            assert_experts_close(g, w, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(moe_op_names()))
def test_op_matches_the_reference(name, device):
    for kwargs, got, want in checks.op_and_reference_outputs(name, ref, op_cases(device)[name]):
        dtype = next(v.dtype for k, v in kwargs.items() if k in ("x", "logits", "router_logits", "ids"))
        _assert_matches_reference(name, got, want, dtype if dtype.is_floating_point else torch.float32)


def test_public_api_wraps_the_ops():
    """NamedTuples out, ``x [..., H]`` flattened and reshaped back, defaults as documented."""
    logits = make_logits(6, 5, seed=930)
    gate = mtmerge.moe_topk_gate(logits, 2)
    assert isinstance(gate, mtmerge.GateOutput)
    assert_same(gate.ids, torch.ops.mtmerge.moe_topk_gate(logits, 2, "softmax", True, None)[1])
    align = mtmerge.moe_align(gate.ids, 5)
    assert isinstance(align, mtmerge.AlignOutput)
    assert_same(align.sorted_slots, ref.moe_align(gate.ids, 5, -1)[0])
    x = make_x(6, 8, seed=931)
    w = make_experts(5, 8, 4, seed=932)
    flat = mtmerge.moe_experts(x, w["gate_up"], w["down"], gate.weights, gate.ids)
    batched = mtmerge.moe_experts(x.reshape(2, 3, 8), w["gate_up"], w["down"], gate.weights.reshape(2, 3, 2),
                                  gate.ids.reshape(2, 3, 2))
    assert batched.shape == (2, 3, 8)
    assert_same(batched.reshape(6, 8), flat)
    assert_same(mtmerge.moe_experts(x.reshape(2, 3, 8), w["gate_up"], w["down"], gate.weights, gate.ids), batched)
    task = mtmerge.moe_task_gate(x, torch.randn(2, 5, 8), torch.tensor([0, 1, 0, 1, 1, 0]), 2)
    assert isinstance(task, mtmerge.TaskGateOutput) and task.logits.shape == (6, 5)
