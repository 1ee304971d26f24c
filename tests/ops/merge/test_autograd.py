"""The autograd slot of the merge family: ``task_arithmetic`` is differentiable with respect to
``base``, ``finetuned``, ``weights`` and ``lam`` (AdaMerging learns the weights and lam).
``torch.autograd.gradcheck`` in float64, on the public function and on the op itself."""

from __future__ import annotations

import pytest
import torch

import mtmerge
from mtmerge.reference import merge as ref
from tests.ops.merge.helpers import DEVICES, assert_same, make_models

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def _inputs(device, n=23, tasks=3, seed=960):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    fts = [base + torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(tasks)]
    weights = torch.tensor([0.7, -0.3, 1.2][:tasks], dtype=torch.float64)
    lam = torch.tensor(0.8, dtype=torch.float64)
    return [x.to(device).requires_grad_() for x in (base, *fts, weights, lam)]


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_public_task_arithmetic(device):
    base, f0, f1, f2, weights, lam = _inputs(device)

    def fn(b, a0, a1, a2, w, s):
        return mtmerge.task_arithmetic(b, [a0, a1, a2], w, s)

    assert torch.autograd.gradcheck(fn, (base, f0, f1, f2, weights, lam), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_op(device):
    base, f0, f1, f2, weights, lam = _inputs(device, n=11)

    def fn(b, a0, a1, a2, w, s):
        return torch.ops.mtmerge.task_arithmetic(base=b, finetuned=[a0, a1, a2], weights=w, lam=s)

    assert torch.autograd.gradcheck(fn, (base, f0, f1, f2, weights, lam), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(fn, (base, f0, f1, f2, weights, lam), eps=1e-6, atol=1e-8)


def test_learning_the_coefficients_in_float32():
    """AdaMerging's use: float32 weights, a loss, one backward; the gradients are the closed forms
    d/dw_t = lam <g, tau_t>, d/dlam = sum_t w_t <g, tau_t>, and the forward equals the
    fused (non-differentiable) path bit for bit."""
    base, fts = make_models(1000, 3, seed=961)
    weights = torch.tensor([0.5, 0.25, 1.0], requires_grad=True)
    lam = torch.tensor(0.9, requires_grad=True)
    merged = mtmerge.task_arithmetic(base, fts, weights, lam)
    assert_same(merged.detach(), mtmerge.task_arithmetic(base, fts, [0.5, 0.25, 1.0], lam=0.9))
    assert_same(merged.detach(), ref.task_arithmetic(base, fts, weights.detach(), lam.detach()))
    g = torch.randn(1000, generator=torch.Generator().manual_seed(962))
    (merged * g).sum().backward()
    dots = torch.stack([(g.double() * (f.double() - base.double())).sum() for f in fts])
    torch.testing.assert_close(weights.grad.double(), 0.9 * dots, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lam.grad.double(), (torch.tensor([0.5, 0.25, 1.0]).double() * dots).sum(), rtol=1e-4,
                               atol=1e-4)


def test_out_is_refused_on_the_differentiable_path():
    base, fts = make_models(10, 2, seed=963)
    with pytest.raises(ValueError, match="out"):
        mtmerge.task_arithmetic(base, fts, torch.tensor([1.0, 1.0], requires_grad=True), out=torch.empty(10))
