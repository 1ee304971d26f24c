"""Op specs of the MoE family: schema, reference, validating fake, GPU launcher, autograd.

Walk: public API in ``mtmerge/ops/moe.py`` -> these specs -> CPU kernels in ``csrc/moe/``
(registered by ``csrc/moe/bindings.cpp``), GPU kernels in ``kernels/moe/``, the math in
``mtmerge/reference/moe.py``. The schemas are the contract of docs/moe.md; every backend
accepts exactly what the fakes accept (the public wrappers check the data, e.g. id ranges).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtmerge._library import Autograd, OpSpec
from mtmerge.reference import moe as ref

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _triton(name: str) -> str:
    return f"triton:mtmerge.kernels.moe:{name}"


# ---- fakes: check what the kernels rely on, return output metadata ---------------------------


def _check_float(t: Tensor, name: str) -> None:
    torch._check(t.dtype in FLOATS, lambda: f"{name} must be a float tensor, got {t.dtype}")


def _check_shape(t: Tensor, name: str, shape: tuple) -> None:
    torch._check(tuple(t.shape) == tuple(shape), lambda: f"{name} must have shape {tuple(shape)}, "
                                                         f"got {tuple(t.shape)}")


def _check_routing(weights: Tensor, ids: Tensor, num_tokens) -> None:
    torch._check(ids.dim() == 2, lambda: f"ids must be [T, k], got {ids.dim()}-D")
    torch._check(ids.dtype in INDEX_DTYPES, lambda: f"ids must be int32 or int64, got {ids.dtype}")
    torch._check(ids.shape[0] == num_tokens, lambda: f"ids must have {num_tokens} rows, got {ids.shape[0]}")
    _check_float(weights, "weights")
    _check_shape(weights, "weights", tuple(ids.shape))


def _check_gate(logits: Tensor, k: int, scoring: str, bias: Tensor | None) -> None:
    torch._check(logits.dim() == 2, lambda: f"logits must be [T, E], got {logits.dim()}-D")
    _check_float(logits, "logits")
    torch._check(0 <= k <= logits.shape[1], lambda: f"k must be in [0, E={logits.shape[1]}], got {k}")
    torch._check(scoring in ref.SCORINGS, lambda: f"scoring must be one of {ref.SCORINGS}, got {scoring!r}")
    if bias is not None:
        _check_float(bias, "bias")
        _check_shape(bias, "bias", (logits.shape[1],))


def _topk_gate_fake(logits, k, scoring, renormalize, bias):
    _check_gate(logits, k, scoring, bias)
    cd = ref.compute_dtype(logits.dtype)
    num_tokens = logits.shape[0]
    return logits.new_empty((num_tokens, k), dtype=cd), logits.new_empty((num_tokens, k), dtype=torch.int32)


def _task_gate_fake(x, router, task_ids, k, expert_mask, scoring, renormalize):
    torch._check(x.dim() == 2, lambda: f"x must be [T, H], got {x.dim()}-D")
    _check_float(x, "x")
    torch._check(router.dim() == 3, lambda: f"router must be [n_tasks, E, H], got {router.dim()}-D")
    torch._check(router.dtype == x.dtype, lambda: f"router must have x's dtype {x.dtype}, got {router.dtype}")
    torch._check(router.shape[2] == x.shape[1], lambda: f"router must be [n_tasks, E, {x.shape[1]}], "
                                                        f"got {tuple(router.shape)}")
    torch._check(task_ids.dtype in INDEX_DTYPES, lambda: f"task_ids must be int32 or int64, got {task_ids.dtype}")
    _check_shape(task_ids, "task_ids", (x.shape[0],))
    num_experts = router.shape[1]
    torch._check(0 <= k <= num_experts, lambda: f"k must be in [0, E={num_experts}], got {k}")
    torch._check(scoring in ref.SCORINGS, lambda: f"scoring must be one of {ref.SCORINGS}, got {scoring!r}")
    if expert_mask is not None:
        torch._check(expert_mask.dtype == torch.bool, lambda: f"expert_mask must be bool, got {expert_mask.dtype}")
        _check_shape(expert_mask, "expert_mask", tuple(router.shape[:2]))
    cd = ref.compute_dtype(x.dtype)
    num_tokens = x.shape[0]
    return (x.new_empty((num_tokens, k), dtype=cd), x.new_empty((num_tokens, k), dtype=torch.int32),
            x.new_empty((num_tokens, num_experts), dtype=cd))


def _align_fake(ids, num_experts, capacity):
    torch._check(ids.dim() == 2, lambda: f"ids must be [T, k], got {ids.dim()}-D")
    torch._check(ids.dtype in INDEX_DTYPES, lambda: f"ids must be int32 or int64, got {ids.dtype}")
    torch._check(num_experts >= 0, lambda: f"num_experts must be >= 0, got {num_experts}")
    torch._check(capacity >= -1, lambda: f"capacity must be -1 (unlimited) or >= 0, got {capacity}")
    return (ids.new_empty((ids.numel(),), dtype=torch.int64), ids.new_empty((num_experts + 1,), dtype=torch.int64),
            ids.new_empty((), dtype=torch.int64))


def _check_experts(x, gate_up, down, weights, ids, activation, gate_up_bias, down_bias) -> None:
    torch._check(x.dim() == 2, lambda: f"x must be [T, H], got {x.dim()}-D")
    _check_float(x, "x")
    torch._check(gate_up.dim() == 3 and down.dim() == 3, lambda: "gate_up must be [E, 2F, H] and down [E, H, F]")
    num_experts, two_f, hidden = gate_up.shape
    torch._check(two_f % 2 == 0, lambda: f"gate_up must have an even number of rows (2F), got {two_f}")
    torch._check(hidden == x.shape[1], lambda: f"gate_up must be [E, 2F, {x.shape[1]}], got {tuple(gate_up.shape)}")
    _check_shape(down, "down", (num_experts, hidden, two_f // 2))
    for name, t in (("gate_up", gate_up), ("down", down)):
        torch._check(t.dtype == x.dtype, lambda name=name, t=t: f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    _check_routing(weights, ids, x.shape[0])
    torch._check(activation in ref.ACTIVATIONS,
                 lambda: f"activation must be one of {ref.ACTIVATIONS}, got {activation!r}")
    for name, t, shape in (("gate_up_bias", gate_up_bias, (num_experts, two_f)),
                           ("down_bias", down_bias, (num_experts, hidden))):
        if t is not None:
            torch._check(t.dtype == x.dtype,
                         lambda name=name, t=t: f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
            _check_shape(t, name, shape)


def _experts_fake(x, gate_up, down, weights, ids, activation, gate_up_bias, down_bias):
    _check_experts(x, gate_up, down, weights, ids, activation, gate_up_bias, down_bias)
    return x.new_empty(x.shape)


def _experts_backward_fake(grad_out, x, gate_up, down, weights, ids, activation, gate_up_bias, down_bias):
    _check_experts(x, gate_up, down, weights, ids, activation, gate_up_bias, down_bias)
    _check_shape(grad_out, "grad_out", tuple(x.shape))
    torch._check(grad_out.dtype == x.dtype, lambda: f"grad_out must have x's dtype {x.dtype}, got {grad_out.dtype}")

    def bias_grad(bias):
        return x.new_empty((0,)) if bias is None else bias.new_empty(bias.shape)

    return (x.new_empty(x.shape), gate_up.new_empty(gate_up.shape), down.new_empty(down.shape),
            weights.new_empty(weights.shape), bias_grad(gate_up_bias), bias_grad(down_bias))


def _load_balancing_fake(router_logits, ids, num_experts):
    torch._check(router_logits.dim() == 2, lambda: f"router_logits must be [T, E], got {router_logits.dim()}-D")
    _check_float(router_logits, "router_logits")
    torch._check(router_logits.shape[1] == num_experts,
                 lambda: f"router_logits must have num_experts={num_experts} columns, got {router_logits.shape[1]}")
    torch._check(ids.dim() == 2, lambda: f"ids must be [T, k], got {ids.dim()}-D")
    torch._check(ids.dtype in INDEX_DTYPES, lambda: f"ids must be int32 or int64, got {ids.dtype}")
    torch._check(ids.shape[0] == router_logits.shape[0],
                 lambda: f"ids must have {router_logits.shape[0]} rows, got {ids.shape[0]}")
    return router_logits.new_empty((), dtype=ref.compute_dtype(router_logits.dtype))


def _z_loss_fake(router_logits):
    torch._check(router_logits.dim() == 2, lambda: f"router_logits must be [T, E], got {router_logits.dim()}-D")
    _check_float(router_logits, "router_logits")
    return router_logits.new_empty((), dtype=ref.compute_dtype(router_logits.dtype))


# ---- autograd (backwards built from torch ops and mtmerge ops) ---------------------------------


def _scores_backward(s: Tensor, grad_s: Tensor, scoring: str) -> Tensor:
    """d/dlogits of ``s = softmax(logits)`` (rows) or ``sigmoid(logits)``, given d/ds."""
    if scoring == "softmax":
        return s * (grad_s - (grad_s * s).sum(dim=-1, keepdim=True))
    return grad_s * s * (1 - s)


def _gate_logits_grad(logits: Tensor, ids: Tensor, grad_weights: Tensor, scoring: str,
                      renormalize: bool) -> Tensor:
    """d/dlogits of ``weights = s[ids]`` (``/ sum``, when renormalized), in fp32."""
    s = ref.scores(logits, scoring)
    g = grad_weights.to(s.dtype)
    index = ids.to(torch.int64)
    if renormalize and index.shape[-1] > 0:
        picked = s.gather(-1, index)
        total = picked.sum(dim=-1, keepdim=True)
        g = (g - (g * picked).sum(dim=-1, keepdim=True) / total) / total
    grad_s = torch.zeros_like(s).scatter_add(-1, index, g)  # ids of a row are distinct
    return _scores_backward(s, grad_s, scoring)


def _topk_gate_setup_context(ctx, inputs, output) -> None:
    logits, _, scoring, renormalize, _ = inputs
    _, ids = output
    ctx.scoring, ctx.renormalize = scoring, renormalize
    ctx.save_for_backward(logits, ids)


def _topk_gate_backward(ctx, grad_weights, _grad_ids):
    logits, ids = ctx.saved_tensors
    if grad_weights is None:
        return None, None, None, None, None
    grad = _gate_logits_grad(logits, ids, grad_weights, ctx.scoring, ctx.renormalize)
    return grad.to(logits.dtype), None, None, None, None


def _task_gate_setup_context(ctx, inputs, output) -> None:
    x, router, task_ids, _, _, scoring, renormalize = inputs
    _, ids, logits = output
    ctx.scoring, ctx.renormalize = scoring, renormalize
    ctx.save_for_backward(x, router, task_ids, ids, logits)


def _task_gate_backward(ctx, grad_weights, _grad_ids, grad_logits):
    """``logits[t] = router[task_ids[t]] x[t]`` (masked entries are constants):
    ``grad_x[t] = router[task_ids[t]]^T gl[t]``, ``grad_router[n] = sum_{t: task n} gl[t] x[t]^T``."""
    x, router, task_ids, ids, logits = ctx.saved_tensors
    cd = logits.dtype
    gl = torch.zeros_like(logits) if grad_logits is None else grad_logits.to(cd)
    if grad_weights is not None:
        gl = gl + _gate_logits_grad(logits, ids, grad_weights, ctx.scoring, ctx.renormalize)
    gl = torch.where(torch.isfinite(logits), gl, torch.zeros_like(gl))  # masked experts: -inf constants
    # gl spread over the tasks' blocks of rows ([T, n_tasks * E], zero outside a token's task): two
    # GEMMs give both grads without materializing router[task_ids] or per-token outer products.
    n_tasks, num_experts, hidden = router.shape
    one_hot = torch.nn.functional.one_hot(task_ids.to(torch.int64), n_tasks).to(cd)
    spread = (one_hot[:, :, None] * gl[:, None, :]).reshape(-1, n_tasks * num_experts)
    grad_x = spread @ router.to(cd).reshape(n_tasks * num_experts, hidden)
    grad_router = (spread.t() @ x.to(cd)).reshape(n_tasks, num_experts, hidden)
    return grad_x.to(x.dtype), grad_router.to(router.dtype), None, None, None, None, None


def _experts_setup_context(ctx, inputs, output) -> None:
    x, gate_up, down, weights, ids, activation, gate_up_bias, down_bias = inputs
    ctx.activation = activation
    ctx.has_biases = (gate_up_bias is not None, down_bias is not None)
    ctx.save_for_backward(x, gate_up, down, weights, ids, gate_up_bias, down_bias)


def _experts_backward(ctx, grad):
    x, gate_up, down, weights, ids, gate_up_bias, down_bias = ctx.saved_tensors
    grads = torch.ops.mtmerge.moe_experts_backward(
        grad_out=grad.contiguous(), x=x, gate_up=gate_up, down=down, weights=weights, ids=ids,
        activation=ctx.activation, gate_up_bias=gate_up_bias, down_bias=down_bias)
    grad_x, grad_gate_up, grad_down, grad_weights, grad_gu_bias, grad_down_bias = grads
    return (grad_x, grad_gate_up, grad_down, grad_weights, None, None,
            grad_gu_bias if ctx.has_biases[0] else None, grad_down_bias if ctx.has_biases[1] else None)


def _load_balancing_setup_context(ctx, inputs, output) -> None:
    router_logits, ids, num_experts = inputs
    ctx.num_experts = num_experts
    ctx.save_for_backward(router_logits, ids)


def _load_balancing_backward(ctx, grad):
    """``loss = E / T^2 * sum_e count_e sum_t p[t, e]``: d/dp[t, e] = E count_e / T^2."""
    router_logits, ids = ctx.saved_tensors
    num_tokens = router_logits.shape[0]
    if num_tokens == 0:
        return torch.zeros_like(router_logits), None, None
    cd = ref.compute_dtype(router_logits.dtype)
    p = torch.softmax(router_logits.to(cd), dim=-1)
    counts = ref.expert_counts(ids, ctx.num_experts, cd)
    grad_p = (grad.to(cd) * ctx.num_experts / (num_tokens * num_tokens)) * counts.expand_as(p)
    return _scores_backward(p, grad_p, "softmax").to(router_logits.dtype), None, None


def _z_loss_setup_context(ctx, inputs, output) -> None:
    (router_logits,) = inputs
    ctx.save_for_backward(router_logits)


def _z_loss_backward(ctx, grad):
    """``loss = mean_t lse_t^2``: d/dlogits[t] = 2 lse_t softmax(logits[t]) / T."""
    (router_logits,) = ctx.saved_tensors
    num_tokens = router_logits.shape[0]
    if num_tokens == 0:
        return torch.zeros_like(router_logits)
    z = router_logits.to(ref.compute_dtype(router_logits.dtype))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    return (grad.to(z.dtype) * 2 / num_tokens * lse * torch.softmax(z, dim=-1)).to(router_logits.dtype)


# ---- the family -------------------------------------------------------------------------------

MOE_OPS: list[OpSpec] = [
    OpSpec("moe_topk_gate(Tensor logits, int k, str scoring, bool renormalize, Tensor? bias) "
           "-> (Tensor weights, Tensor ids)",
           ref.moe_topk_gate, _topk_gate_fake, _triton("moe_topk_gate"),
           Autograd(_topk_gate_setup_context, _topk_gate_backward)),
    OpSpec("moe_task_gate(Tensor x, Tensor router, Tensor task_ids, int k, Tensor? expert_mask, str scoring, "
           "bool renormalize) -> (Tensor weights, Tensor ids, Tensor logits)",
           ref.moe_task_gate, _task_gate_fake, _triton("moe_task_gate"),
           Autograd(_task_gate_setup_context, _task_gate_backward)),
    OpSpec("moe_align(Tensor ids, int num_experts, int capacity) "
           "-> (Tensor sorted_slots, Tensor expert_offsets, Tensor dropped)",
           ref.moe_align, _align_fake, _triton("moe_align")),
    OpSpec("moe_experts(Tensor x, Tensor gate_up, Tensor down, Tensor weights, Tensor ids, str activation, "
           "Tensor? gate_up_bias, Tensor? down_bias) -> Tensor",
           ref.moe_experts, _experts_fake, _triton("moe_experts"),
           Autograd(_experts_setup_context, _experts_backward)),
    OpSpec("moe_experts_backward(Tensor grad_out, Tensor x, Tensor gate_up, Tensor down, Tensor weights, "
           "Tensor ids, str activation, Tensor? gate_up_bias, Tensor? down_bias) -> (Tensor grad_x, "
           "Tensor grad_gate_up, Tensor grad_down, Tensor grad_weights, Tensor grad_gate_up_bias, "
           "Tensor grad_down_bias)",
           ref.moe_experts_backward, _experts_backward_fake, _triton("moe_experts_backward")),
    OpSpec("moe_load_balancing_loss(Tensor router_logits, Tensor ids, int num_experts) -> Tensor",
           ref.moe_load_balancing_loss, _load_balancing_fake, _triton("moe_load_balancing_loss"),
           Autograd(_load_balancing_setup_context, _load_balancing_backward)),
    OpSpec("moe_router_z_loss(Tensor router_logits) -> Tensor",
           ref.moe_router_z_loss, _z_loss_fake, _triton("moe_router_z_loss"),
           Autograd(_z_loss_setup_context, _z_loss_backward)),
]
