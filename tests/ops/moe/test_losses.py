"""The auxiliary losses through the public API: ``load_balancing_loss`` against transformers'
``load_balancing_loss_func`` (real package: Mixtral's, the one the Mixtral/Qwen-MoE/OLMoE models
call), one layer and several, ids given or taken from the logits; ``router_z_loss`` against
ST-MoE's formula; unrouted ids, empty batches, dtypes."""

from __future__ import annotations

import pytest
import torch

import mtmerge
from tests.ops.moe.helpers import DEVICES, make_ids, make_logits

pytestmark = pytest.mark.usefixtures("cpp_kernels")


@pytest.fixture(scope="module")
def transformers_loss():
    """transformers' ``load_balancing_loss_func`` (real package)."""
    modeling = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    return modeling.load_balancing_loss_func


def _topk_ids(logits, k):
    return torch.topk(torch.softmax(logits.float(), -1), k, dim=-1).indices


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("experts, k", [(8, 2), (5, 1), (6, 6)])
def test_load_balancing_loss_equals_transformers(transformers_loss, device, experts, k):
    logits = make_logits(33, experts, seed=100).to(device)
    ids = _topk_ids(logits, k)
    want = transformers_loss((logits,), experts, k)
    got = mtmerge.load_balancing_loss(logits, ids, experts, k)
    assert got.dtype == torch.float32 and got.dim() == 0 and got.device.type == device
    torch.testing.assert_close(got, want.reshape(()).float(), rtol=1e-6, atol=1e-7)
    # ids=None: the top-k of the same logits
    torch.testing.assert_close(mtmerge.load_balancing_loss(logits, None, experts, k), got, rtol=0, atol=0)
    torch.testing.assert_close(mtmerge.load_balancing_loss(logits, ids.int(), experts, k), got, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_load_balancing_loss_over_layers_equals_transformers(transformers_loss, device):
    layers = tuple(make_logits(t, 8, seed=101 + t).to(device) for t in (17, 17, 9))
    want = transformers_loss(layers, 8, 2)
    ids = [_topk_ids(z, 2) for z in layers]
    got = mtmerge.load_balancing_loss(layers, ids, 8, 2)
    torch.testing.assert_close(got, want.reshape(()).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mtmerge.load_balancing_loss(list(layers), None, 8, 2), got, rtol=0, atol=0)
    concatenated = mtmerge.load_balancing_loss(torch.cat(layers), torch.cat(ids), 8, 2)
    torch.testing.assert_close(concatenated, got, rtol=0, atol=0)


def test_load_balancing_loss_bfloat16_logits(transformers_loss):
    """bf16 logits: softmax in float32 (transformers' softmax runs in bf16: within bf16 tolerance)."""
    logits = make_logits(40, 8, torch.bfloat16, seed=104)
    ids = _topk_ids(logits, 2)
    got = mtmerge.load_balancing_loss(logits, ids, 8, 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, transformers_loss((logits.float(),), 8, 2).reshape(()), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, transformers_loss((logits,), 8, 2).reshape(()).float(), rtol=2e-2, atol=2e-2)


def test_load_balancing_loss_ignores_unrouted_slots():
    logits = make_logits(12, 4, seed=105)
    ids = make_ids(12, 4, 2, seed=106, unrouted=0.4)
    p = torch.softmax(logits.double(), -1)
    counts = torch.stack([(ids == e).sum() for e in range(4)]).double()
    want = 4 * ((counts / 12) * p.mean(0)).sum()
    got = mtmerge.load_balancing_loss(logits, ids, 4, 2)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    # a token with every slot unrouted adds to T but to no count
    all_unrouted = torch.full_like(ids, -1)
    assert float(mtmerge.load_balancing_loss(logits, all_unrouted, 4, 2)) == 0.0


def test_load_balancing_loss_balanced_routing_is_one():
    """Uniform probabilities and uniform counts: the loss is exactly its minimum k (= 1 per slot)."""
    logits = torch.zeros(8, 4)
    ids = torch.tensor([[0], [1], [2], [3]] * 2)
    torch.testing.assert_close(mtmerge.load_balancing_loss(logits, ids, 4, 1), torch.tensor(1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_router_z_loss_formula(device, dtype):
    logits = (make_logits(21, 6, seed=107) * 4).to(dtype).to(device)
    rows = logits.double().cpu()
    want = sum(torch.log(torch.exp(r).sum()) ** 2 for r in rows) / rows.shape[0]
    got = mtmerge.router_z_loss(logits)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.dim() == 0
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-6, atol=1e-6)
    layers = mtmerge.router_z_loss([logits[:10], logits[10:]])
    torch.testing.assert_close(layers, got, rtol=1e-6, atol=0)


def test_router_z_loss_is_stable_for_large_logits():
    logits = torch.tensor([[1000.0, 999.0, -50.0]])
    want = (1000.0 + torch.log1p(torch.exp(torch.tensor(-1.0, dtype=torch.float64)))) ** 2
    torch.testing.assert_close(mtmerge.router_z_loss(logits).double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_losses_of_no_tokens_are_zero(device):
    logits = torch.empty((0, 5), device=device)
    ids = torch.empty((0, 2), dtype=torch.int64, device=device)
    assert float(mtmerge.load_balancing_loss(logits, ids, 5, 2)) == 0.0
    assert float(mtmerge.router_z_loss(logits)) == 0.0
