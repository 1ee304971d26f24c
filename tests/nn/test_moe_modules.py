"""``mtmerge.nn.MoEFeedForward`` and ``mtmerge.nn.TaskMoE``: outputs, auxiliary losses and gradients
equal a plain PyTorch reimplementation of the same layer; initialization is deterministic; a few
SGD steps train them; a ``TaskMoE`` batch of one task touches only that task's experts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from mtmerge.nn import MoEFeedForward, MoEOutput, TaskMoE, default_task_experts
from mtmerge.nn import moe as nn_moe
from tests.ops.moe.helpers import record_moe_experts

TOL = {torch.float64: {"atol": 1e-10, "rtol": 1e-9}, torch.float32: {"atol": 1e-4, "rtol": 1e-4}}


# ---- a plain PyTorch reimplementation (DESIGN.md "MoE semantics", written from the text) ----------


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gpt_oss":
        gate, up = h[..., 0::2].clamp(max=7.0), h[..., 1::2].clamp(-7.0, 7.0)
        return (up + 1) * gate * torch.sigmoid(1.702 * gate)
    gate, up = h.chunk(2, dim=-1)
    fn = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
          "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[activation]
    return fn(gate) * up


def plain_moe(x, logits, layer, task_ids=None):
    """(output [T, H], logits, load-balancing loss, z-loss) of ``layer`` from its parameters."""
    num_experts, k = layer.num_experts, layer.top_k
    if task_ids is not None and layer.expert_mask is not None:
        logits = logits.masked_fill(~layer.expert_mask[task_ids], -math.inf)
    scores = torch.softmax(logits, -1) if layer.scoring == "softmax" else torch.sigmoid(logits)
    ids = torch.topk(scores, k, dim=-1).indices
    weights = scores.gather(1, ids)
    if layer.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    h = torch.einsum("tkfh,th->tkf", layer.gate_up[ids], x)
    if layer.gate_up_bias is not None:
        h = h + layer.gate_up_bias[ids]
    o = torch.einsum("tkhf,tkf->tkh", layer.down[ids], _act(h, layer.activation))
    if layer.down_bias is not None:
        o = o + layer.down_bias[ids]
    out = (weights.unsqueeze(-1).to(o.dtype) * o).sum(1)
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts).to(logits.dtype)
    lb = num_experts * ((counts / x.shape[0]) * torch.softmax(logits, -1).mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    return out, logits, lb, z


def plain_ffn(layer: MoEFeedForward, x: torch.Tensor):
    return plain_moe(x, x @ layer.router.T, layer)


def plain_task(layer: TaskMoE, x: torch.Tensor, task_ids: torch.Tensor):
    logits = torch.einsum("teh,th->te", layer.router[task_ids], x)
    return plain_moe(x, logits, layer, task_ids)


def _grads(module, x):
    return [x.grad, *[p.grad for p in module.parameters()]]


def _zero(module, x):
    x.grad = None
    module.zero_grad(set_to_none=True)


def _backward(result, probe):
    out, _, lb, z = result
    ((out * probe).sum() + 0.3 * lb + 0.1 * z).backward()


def _compare(module, x, ours, plain, dtype):
    probe = torch.randn(ours[0].shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    for got, want in zip(ours, plain, strict=True):
        torch.testing.assert_close(got.reshape(want.shape), want, **TOL[dtype])
    _backward(ours, probe.reshape(ours[0].shape))
    got = _grads(module, x)
    _zero(module, x)
    _backward(plain, probe.reshape(plain[0].shape))
    want = _grads(module, x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


def _x(shape, dtype, seed=3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


# ---- MoEFeedForward ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("activation", "scoring", "renormalize", "bias"), [
    ("silu", "softmax", True, False),
    ("gelu", "sigmoid", False, True),
    ("gelu_tanh", "softmax", False, False),
    ("relu", "sigmoid", True, False),
    ("gpt_oss", "softmax", True, True),
])
def test_feed_forward_matches_plain_pytorch(dtype, activation, scoring, renormalize, bias):
    layer = MoEFeedForward(12, 10, 6, 2, activation=activation, scoring=scoring, renormalize=renormalize,
                           bias=bias, seed=11, dtype=dtype)
    if activation == "gpt_oss":  # push some pre-activations past the clamps
        with torch.no_grad():
            layer.gate_up.mul_(12.0)
    x = _x((3, 5, 12), dtype)
    result = layer(x)
    assert isinstance(result, MoEOutput)
    assert result.output.shape == x.shape and result.output.dtype == dtype
    assert result.router_logits.shape == (15, 6) and result.router_logits.dtype == dtype
    assert result.load_balancing_loss.shape == () and result.router_z_loss.shape == ()
    _compare(layer, x, result, plain_ffn(layer, x.reshape(15, 12)), dtype)


def test_feed_forward_bfloat16():
    layer = MoEFeedForward(16, 8, 4, 2, seed=1, dtype=torch.bfloat16)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    out = layer(x)
    assert out.output.dtype == torch.bfloat16 and out.router_logits.dtype == torch.float32
    exact = MoEFeedForward(16, 8, 4, 2, dtype=torch.float64)
    exact.load_state_dict(layer.state_dict())  # the same (bf16-representable) values in float64
    ref = plain_ffn(exact, x.double())[0]
    torch.testing.assert_close(out.output.double(), ref.detach(), atol=3e-2, rtol=3e-2)


def test_top_k_zero_and_empty_batch():
    layer = MoEFeedForward(8, 4, 3, 0, seed=0)
    out = layer(torch.randn(4, 8))
    assert torch.equal(out.output, torch.zeros(4, 8))
    layer = MoEFeedForward(8, 4, 3, 2, seed=0)
    empty = layer(torch.randn(0, 8))
    assert empty.output.shape == (0, 8) and empty.router_logits.shape == (0, 3)


def test_initialization_is_deterministic():
    a = MoEFeedForward(8, 6, 4, 2, bias=True, seed=5)
    b = MoEFeedForward(8, 6, 4, 2, bias=True, seed=5)
    c = MoEFeedForward(8, 6, 4, 2, bias=True, seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name
    assert a.router.abs().max() <= 1 / math.sqrt(8) and a.down.abs().max() <= 1 / math.sqrt(6)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    a.reset_parameters()
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    a.reset_parameters(torch.Generator().manual_seed(6))
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    d64 = MoEFeedForward(8, 6, 4, 2, bias=True, seed=5, dtype=torch.float64)
    assert all(torch.equal(v.float(), before[k]) for k, v in d64.state_dict().items())
    meta = MoEFeedForward(8, 6, 4, 2, seed=5, device="meta")
    assert meta.gate_up.is_meta


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(8, 4, 3, 4)
    with pytest.raises(ValueError, match="activation"):
        MoEFeedForward(8, 4, 3, 2, activation="tanh")
    with pytest.raises(ValueError, match="scoring"):
        MoEFeedForward(8, 4, 3, 2, scoring="sparsemax")
    with pytest.raises(ValueError, match="hidden"):
        MoEFeedForward(0, 4, 3, 2)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., hidden=8\]"):
        MoEFeedForward(8, 4, 3, 2)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="experts_per_task or expert_mask"):
        TaskMoE(8, 4, 4, 1, 2, experts_per_task=2, expert_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="task 1 may use 1 experts"):
        TaskMoE(8, 4, 4, 2, 2, expert_mask=torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="expert_mask must be bool"):
        TaskMoE(8, 4, 4, 2, 2, expert_mask=torch.ones(3, 4, dtype=torch.bool))
    layer = TaskMoE(8, 4, 4, 2, 2, seed=0)
    with pytest.raises(ValueError, match="task_ids"):
        layer(torch.randn(3, 8), 2)
    with pytest.raises(ValueError, match="task_ids"):
        layer(torch.randn(3, 8), torch.zeros(4, dtype=torch.int64))


# ---- TaskMoE -----------------------------------------------------------------------------------


def test_default_task_experts():
    mask = default_task_experts(3, 5, 2)
    assert mask.tolist() == [[True, True, False, False, False], [False, False, True, True, False],
                             [True, False, False, False, True]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("experts_per_task", "bias", "scoring"), [(None, False, "softmax"), (3, True, "softmax"),
                                                                   (3, False, "sigmoid")])
def test_task_moe_mixed_batch_matches_plain_pytorch(dtype, experts_per_task, bias, scoring):
    layer = TaskMoE(10, 6, 6, 2, 3, experts_per_task=experts_per_task, bias=bias, scoring=scoring, seed=4,
                    dtype=dtype)
    x = _x((4, 5, 10), dtype)
    task_ids = torch.randint(0, 3, (4, 5), generator=torch.Generator().manual_seed(9))
    result = layer(x, task_ids)
    assert result.output.shape == x.shape
    if experts_per_task is not None:
        allowed = layer.expert_mask[task_ids.reshape(-1)]
        assert torch.isinf(result.router_logits[~allowed]).all()
    _compare(layer, x, result, plain_task(layer, x.reshape(20, 10), task_ids.reshape(-1)), dtype)


@pytest.mark.parametrize("expert_mask", [None, "block", "scattered"])
def test_task_moe_one_task_equals_the_mixed_path(expert_mask):
    """``task_ids=t`` (the one-task path) and a tensor of ``t`` give the same outputs, logits,
    losses and gradients."""
    mask = {None: None, "block": default_task_experts(2, 6, 3),
            "scattered": torch.tensor([[1, 0, 1, 0, 1, 0], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)}[expert_mask]
    layer = TaskMoE(10, 6, 6, 2, 2, expert_mask=mask, bias=True, seed=8, dtype=torch.float64)
    x = _x((7, 10), torch.float64)
    probe = torch.randn(7, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one = layer(x, 1)
    _backward(one, probe)
    got = _grads(layer, x)
    _zero(layer, x)
    mixed = layer(x, torch.ones(7, dtype=torch.int64))
    _backward(mixed, probe)
    for a, b in zip(one, mixed, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    for a, b in zip(got, _grads(layer, x), strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    assert torch.equal(layer(x.detach(), torch.tensor(1)).output, one.output.detach())


@pytest.mark.parametrize("scattered", [False, True])
def test_task_moe_one_task_touches_only_its_experts(monkeypatch, scattered):
    """With per-task expert subsets, a batch of one task hands the kernels only that task's
    experts (views of a contiguous block; a gather of a scattered subset), and every other
    expert and router gets exactly zero gradient."""
    mask = (torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 1, 1]], dtype=torch.bool) if scattered
            else default_task_experts(2, 6, 3))
    layer = TaskMoE(10, 6, 6, 2, 2, expert_mask=mask, bias=True, seed=8)
    seen = record_moe_experts(monkeypatch, nn_moe)
    task = 1
    allowed = layer.task_experts(task)
    assert allowed == ([2, 4, 5] if scattered else [3, 4, 5])
    x = _x((9, 10), torch.float32)
    result = layer(x, task)
    (result.output.square().sum() + result.load_balancing_loss + result.router_z_loss).backward()
    assert len(seen) == 1
    gate_up, down, ids, kwargs = seen[0]
    assert gate_up.shape[0] == down.shape[0] == kwargs["gate_up_bias"].shape[0] == len(allowed)
    assert ids.min() >= 0 and ids.max() < len(allowed)
    if not scattered:  # views of the block: the same memory, nothing copied
        assert gate_up.data_ptr() == layer.gate_up[allowed[0]].data_ptr()
        assert down.data_ptr() == layer.down[allowed[0]].data_ptr()
    for e in range(6):
        for grad in (layer.gate_up.grad[e], layer.down.grad[e], layer.gate_up_bias.grad[e], layer.down_bias.grad[e]):
            assert (e in allowed) == bool(grad.abs().sum() > 0), e
        assert (e in allowed) == bool(layer.router.grad[task, e].abs().sum() > 0), e
    assert torch.equal(layer.router.grad[0], torch.zeros_like(layer.router.grad[0]))
    used = {allowed[i] for i in ids.flatten().tolist()}
    assert used <= set(allowed)
    assert set(torch.nonzero(torch.isfinite(result.router_logits[0])).flatten().tolist()) == set(allowed)


def test_task_moe_state_dict_round_trip():
    a = TaskMoE(8, 4, 4, 1, 2, experts_per_task=2, seed=1)
    assert "expert_mask" not in a.state_dict()
    b = TaskMoE(8, 4, 4, 1, 2, experts_per_task=2, seed=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 8)
    ids = torch.tensor([0, 1, 1, 0, 1])
    assert torch.equal(a(x, ids).output, b(x, ids).output)


# ---- training ----------------------------------------------------------------------------------


def _train(layer, x, y, task_ids=None, steps=40, lr=2.0):
    """Plain SGD on an MSE to ``y`` plus the auxiliary losses; the per-step losses."""
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        result = layer(x) if task_ids is None else layer(x, task_ids[step % len(task_ids)])
        loss = F.mse_loss(result.output, y) + 0.01 * result.load_balancing_loss + 1e-3 * result.router_z_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _teacher(hidden, tokens=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden, hidden, generator=gen) / math.sqrt(hidden)
    x = torch.randn(tokens, hidden, generator=gen)
    return x, torch.tanh(x @ w)


def test_feed_forward_trains():
    layer = MoEFeedForward(16, 32, 4, 2, seed=0)
    losses = _train(layer, *_teacher(16))
    assert losses[-1] < 0.5 * losses[0]


def test_task_moe_trains():
    layer = TaskMoE(16, 32, 6, 2, 2, experts_per_task=3, seed=0)
    mixed = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(1))
    losses = _train(layer, *_teacher(16), task_ids=[mixed, 0, 1], steps=45, lr=4.0)
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3])


# ---- CUDA (the Triton kernels; skipped without a GPU) ----------------------------------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cpu_and_cuda(layer, x, *task_ids):
    """Outputs and gradients of ``layer`` on the CPU and of a copy on CUDA (same parameters)."""
    results = []
    for device in ("cpu", "cuda"):
        twin = layer.to(device)
        xd = x.detach().to(device).requires_grad_()
        result = twin(xd, *[t.to(device) if isinstance(t, torch.Tensor) else t for t in task_ids])
        probe = torch.randn(result.output.shape, generator=torch.Generator().manual_seed(7)).to(device, x.dtype)
        twin.zero_grad(set_to_none=True)
        _backward(result, probe)
        results.append(([r.detach().cpu() for r in result], [g.cpu() for g in _grads(twin, xd)]))
    return results


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feed_forward_on_cuda(dtype):
    layer = MoEFeedForward(32, 24, 8, 2, bias=True, seed=3, dtype=dtype)
    (cpu_out, cpu_grads), (gpu_out, gpu_grads) = _cpu_and_cuda(layer, _x((4, 9, 32), torch.float32).to(dtype))
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    for a, b in zip(gpu_out + gpu_grads, cpu_out + cpu_grads, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@CUDA
@pytest.mark.parametrize("task_ids", ["one", "mixed"])
def test_task_moe_on_cuda(task_ids):
    layer = TaskMoE(32, 24, 8, 2, 3, experts_per_task=4, bias=True, seed=3)
    tasks = 2 if task_ids == "one" else torch.randint(0, 3, (4, 9), generator=torch.Generator().manual_seed(1))
    (cpu_out, cpu_grads), (gpu_out, gpu_grads) = _cpu_and_cuda(layer, _x((4, 9, 32), torch.float32), tasks)
    for a, b in zip(gpu_out + gpu_grads, cpu_out + cpu_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
