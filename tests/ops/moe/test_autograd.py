"""Gradients of the MoE family through the public API, ``torch.autograd.gradcheck`` in float64:
the gates wrt the logits (both scorings, renormalized or not) and wrt x / router, the experts wrt
x, gate_up, down, the routing weights and the biases (``silu`` and ``gpt_oss``, strided weights,
unrouted slots), and both auxiliary losses wrt the logits. On CPU this runs the C++ kernels
(forward and ``moe_experts_backward``), on CUDA the Triton ones."""

from __future__ import annotations

import pytest
import torch

import mtmerge
from mtmerge.reference import moe as ref
from tests.ops import family_checks as checks
from tests.ops.moe.helpers import (
    DEVICES,
    gen,
    make_experts,
    make_ids,
    make_logits,
    make_weights,
    make_x,
)

pytestmark = pytest.mark.usefixtures("cpp_kernels")
D = torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gradcheck_topk_gate(device, scoring, renormalize):
    logits = checks.leaf(make_logits(6, 7, D, seed=70), device)
    bias = torch.rand(7, generator=gen(71), dtype=D).to(device) * 0.2

    def fn(z):
        return mtmerge.moe_topk_gate(z, 3, scoring=scoring, renormalize=renormalize, bias=bias).weights

    checks.assert_gradcheck(fn, (logits,), atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gradcheck_task_gate(device, scoring):
    x = checks.leaf(make_x(7, 5, D, seed=72), device)
    router = checks.leaf(torch.randn((3, 6, 5), generator=gen(73), dtype=D), device)
    task_ids = torch.tensor([0, 1, 2, 2, 1, 0, 1]).to(device)
    mask = torch.ones((3, 6), dtype=torch.bool)
    mask[1, 4:] = False
    mask = mask.to(device)

    def fn(a, r):
        out = mtmerge.moe_task_gate(a, r, task_ids, 2, expert_mask=mask, scoring=scoring, renormalize=True)
        # masked logits are -inf constants: finite differences cannot see them
        return out.weights, torch.where(torch.isfinite(out.logits), out.logits, 0.0)

    checks.assert_gradcheck(fn, (x, router), atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation, bias", [("silu", False), ("silu", True), ("gpt_oss", True)])
def test_gradcheck_experts(device, activation, bias):
    w = make_experts(4, 6, 3, D, seed=74, bias=bias, transposed=activation == "gpt_oss",
                     scale=4.0 if activation == "gpt_oss" else 1.0)
    tensors = [make_x(5, 6, D, seed=75), w["gate_up"], w["down"], make_weights(5, 2, D, seed=76)]
    if bias:
        tensors += [w["gate_up_bias"], w["down_bias"]]
    leaves = [checks.leaf(t, device) for t in tensors]
    ids = make_ids(5, 4, 2, seed=77, unrouted=0.2).to(device)

    def fn(x, gate_up, down, weights, *biases):
        b1, b2 = biases if biases else (None, None)
        return mtmerge.moe_experts(x, gate_up, down, weights, ids, activation=activation, gate_up_bias=b1,
                                   down_bias=b2)

    checks.assert_gradcheck(fn, leaves, atol=1e-7)


def test_experts_backward_runs_the_backward_op():
    """The experts' autograd calls ``torch.ops.mtmerge.moe_experts_backward`` (the kernel), and
    float32 gradients agree with the reference's formulas."""
    x = make_x(6, 8, seed=78).requires_grad_()
    w = make_experts(3, 8, 4, seed=79)
    gate_up, down = w["gate_up"].requires_grad_(), w["down"].requires_grad_()
    weights = make_weights(6, 2, seed=80).requires_grad_()
    ids = make_ids(6, 3, 2, seed=81)
    y = mtmerge.moe_experts(x, gate_up, down, weights, ids)
    g = make_x(6, 8, seed=82)
    with checks.dispatches("moe_experts_backward"):
        y.backward(g)
    want = ref.moe_experts_backward(g, x.detach(), gate_up.detach(), down.detach(), weights.detach(), ids, "silu",
                                    None, None)
    for got, expect in zip((x.grad, gate_up.grad, down.grad, weights.grad), want[:4], strict=True):
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_losses(device):
    logits = checks.leaf(make_logits(8, 5, D, seed=83), device)
    ids = make_ids(8, 5, 2, seed=84, unrouted=0.2).to(device)
    checks.assert_gradcheck(lambda z: mtmerge.load_balancing_loss(z, ids, 5, 2), (logits,), atol=1e-8)
    checks.assert_gradcheck(lambda z: mtmerge.router_z_loss(z), (logits,), atol=1e-8)
    # per-layer sequences: the gradient reaches every layer
    other = checks.leaf(make_logits(4, 5, D, seed=85), device)
    ids2 = make_ids(4, 5, 2, seed=86).to(device)
    checks.assert_gradcheck(lambda a, b: mtmerge.load_balancing_loss([a, b], [ids, ids2], 5, 2), (logits, other),
                            atol=1e-8)


def test_losses_backward_with_no_tokens():
    logits = torch.empty((0, 4), dtype=D, requires_grad=True)
    loss = mtmerge.load_balancing_loss(logits, torch.empty((0, 2), dtype=torch.int64), 4, 2) + \
        mtmerge.router_z_loss(logits)
    loss.backward()
    assert float(loss.detach()) == 0.0 and logits.grad.shape == (0, 4)
