"""Typed public API of the MoE family: validation once, then the ops.

Walk: ``mtmerge.moe_experts`` -> here -> specs in ``mtmerge/ops/_moe_ops.py`` -> ``csrc/moe/``
(CPU), ``kernels/moe/`` (GPU), ``mtmerge/reference/moe.py`` (truth) -> ``tests/ops/moe/`` ->
``benchmarks/bench_moe.py``.

Every function checks its arguments here, naming them, before any kernel runs: wrong types are
``TypeError``; shapes, dtypes, devices, ranges and NaN router logits are ``ValueError``. Expert
ids must lie in ``[-1, E)`` (``-1``: the slot is routed nowhere, as under expert parallelism);
that check and the NaN check read one small reduction back to the host. Every op is
differentiable where MoE training needs it (gates wrt logits / x / router, experts wrt x, the
weights, the routing weights and the biases, both auxiliary losses wrt the logits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mtmerge.ops._validation import (
    ANY_FLOAT_DTYPES,
    INDEX_DTYPES,
    choice,
    flag_arg,
    float_arg,
    ids_in_range,
    index_arg,
    int_arg,
    no_nan,
    same_device,
    same_dtype,
    shape_is,
    tensor_arg,
)
from mtmerge.reference.moe import ACTIVATIONS, SCORINGS

__all__ = [
    "ACTIVATIONS",
    "SCORINGS",
    "AlignOutput",
    "GateOutput",
    "TaskGateOutput",
    "load_balancing_loss",
    "moe_align",
    "moe_experts",
    "moe_task_gate",
    "moe_topk_gate",
    "router_z_loss",
]


class GateOutput(NamedTuple):
    """``weights [T, k]`` float32 (float64 for float64 logits) and ``ids [T, k]`` int32."""

    weights: Tensor
    ids: Tensor


class TaskGateOutput(NamedTuple):
    """``weights [T, k]``, ``ids [T, k]`` int32 and the task router's ``logits [T, E]`` (fp32)."""

    weights: Tensor
    ids: Tensor
    logits: Tensor


class AlignOutput(NamedTuple):
    """``sorted_slots [T*k]``, ``expert_offsets [E+1]`` and ``dropped []``, all int64."""

    sorted_slots: Tensor
    expert_offsets: Tensor
    dropped: Tensor


# ---- checks -------------------------------------------------------------------------------------


# ---- gating -------------------------------------------------------------------------------------


def moe_topk_gate(logits: Tensor, k: int, *, scoring: str = "softmax", renormalize: bool = True,
                  bias: Tensor | None = None) -> GateOutput:
    """Top-k routing: the ``k`` experts of each token and their weights.

    Parameters
    ----------
    logits : Tensor ``[T, E]``
        Router logits, float32/bfloat16/float16 (float64 for gradcheck); no NaN.
    k : int
        Experts per token, ``0 <= k <= E``.
    scoring : {"softmax", "sigmoid"}
        Scores ``s = softmax(logits)`` over all E experts (Mixtral, Qwen-MoE) or
        ``sigmoid(logits)`` (DeepSeek-V3), computed in float32.
    renormalize : bool
        Divide the chosen weights by their sum (``norm_topk_prob``).
    bias : Tensor ``[E]``, optional
        Float bias added to the scores to choose the experts only (DeepSeek-V3's
        ``e_score_correction_bias``); the weights are the unbiased scores.

    Returns
    -------
    GateOutput
        ``weights [T, k]`` float32 (float64 for float64 logits) and ``ids [T, k]`` int32: the
        k largest ``s + bias`` per token in descending order, ties by lower expert index.
        Differentiable with respect to ``logits``.
    """
    logits = float_arg(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    num_experts = logits.shape[1]
    k = int_arg(k, "k", 0, num_experts, f" (E = {num_experts} experts)")
    scoring = choice(scoring, SCORINGS, "scoring")
    renormalize = flag_arg(renormalize, "renormalize")
    if bias is not None:
        bias = float_arg(bias, "bias")
        shape_is(bias, "bias", (num_experts,), "[E]")
        same_device(bias, "bias", logits, "logits")
        no_nan(bias, "bias")
    no_nan(logits, "logits")
    weights, ids = torch.ops.mtmerge.moe_topk_gate(logits=logits, k=k, scoring=scoring, renormalize=renormalize,
                                                   bias=bias)
    return GateOutput(weights, ids)


def moe_task_gate(x: Tensor, router: Tensor, task_ids: Tensor, k: int, *, expert_mask: Tensor | None = None,
                  scoring: str = "softmax", renormalize: bool = True) -> TaskGateOutput:
    """Task-conditioned top-k routing (M³ViT): each token is routed by its task's router.

    Parameters
    ----------
    x : Tensor ``[T, H]``
        Tokens, float32/bfloat16/float16 (float64 for gradcheck); no NaN.
    router : Tensor ``[n_tasks, E, H]``
        One router per task, ``x``'s dtype and device; no NaN.
    task_ids : Tensor ``[T]``
        int32/int64 task of each token, in ``[0, n_tasks)``; tasks may be mixed in a batch.
    k : int
        Experts per token; at most the number of experts every task may use.
    expert_mask : Tensor ``[n_tasks, E]`` bool, optional
        The experts each task may use (M³ViT's per-task expert subsets); default all.
    scoring, renormalize
        As in :func:`moe_topk_gate`; softmax runs over all E experts with the masked ones at
        ``-inf`` (probability 0).

    Returns
    -------
    TaskGateOutput
        ``weights [T, k]``, ``ids [T, k]`` int32 and ``logits [T, E]`` (float32; float64 for
        float64 x) with ``-inf`` at masked experts. Differentiable with respect to ``x`` and
        ``router``.
    """
    x = float_arg(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    router = float_arg(router, "router")
    if router.dim() != 3 or router.shape[2] != x.shape[1]:
        raise ValueError(f"router must be [n_tasks, E, H] with H = {x.shape[1]}, got shape {tuple(router.shape)}")
    same_dtype(router, "router", x, "x")
    same_device(router, "router", x, "x")
    num_tasks, num_experts = router.shape[:2]
    if num_tasks == 0:
        raise ValueError("router must hold at least one task (n_tasks >= 1)")
    task_ids = index_arg(task_ids, "task_ids")
    shape_is(task_ids, "task_ids", (x.shape[0],), "[T]")
    same_device(task_ids, "task_ids", x, "x")
    allowed = num_experts
    if expert_mask is not None:
        expert_mask = tensor_arg(expert_mask, "expert_mask", (torch.bool,), "bool")
        shape_is(expert_mask, "expert_mask", (num_tasks, num_experts), "[n_tasks, E]")
        same_device(expert_mask, "expert_mask", x, "x")
        allowed = int(expert_mask.sum(dim=1).min())
    k = int_arg(k, "k", 0, allowed, f" (the fewest experts a task may use is {allowed})")
    scoring = choice(scoring, SCORINGS, "scoring")
    renormalize = flag_arg(renormalize, "renormalize")
    ids_in_range(task_ids, "task_ids", 0, num_tasks)
    no_nan(x, "x")
    no_nan(router, "router")
    weights, ids, logits = torch.ops.mtmerge.moe_task_gate(x=x, router=router, task_ids=task_ids, k=k,
                                                           expert_mask=expert_mask, scoring=scoring,
                                                           renormalize=renormalize)
    return TaskGateOutput(weights, ids, logits)


# ---- permutation ----------------------------------------------------------------------------------


def moe_align(ids: Tensor, num_experts: int, *, capacity: int | None = None) -> AlignOutput:
    """Group routed slots by expert (the permutation of a grouped-GEMM MoE), with a capacity.

    Parameters
    ----------
    ids : Tensor ``[T, k]``
        int32/int64 expert of each slot ``s = t * k + j``, in ``[-1, E)``; ``-1`` is unrouted.
    num_experts : int
        E >= 1.
    capacity : int, optional
        Keep at most this many slots per expert (its first ones, in increasing ``s``); None
        keeps all.

    Returns
    -------
    AlignOutput
        ``sorted_slots [T*k]`` int64: expert 0's kept slots, expert 1's, ..., then every other
        slot, each group in increasing ``s``; ``expert_offsets [E+1]`` int64 (expert e owns
        ``sorted_slots[offsets[e]:offsets[e+1]]``); ``dropped`` 0-dim int64, the routed slots
        beyond capacity. Bit-identical on every backend.
    """
    ids = index_arg(ids, "ids")
    if ids.dim() != 2:
        raise ValueError(f"ids must be [T, k], got shape {tuple(ids.shape)}")
    num_experts = int_arg(num_experts, "num_experts", 1)
    capacity = -1 if capacity is None else int_arg(capacity, "capacity", 0)
    ids_in_range(ids, "ids", -1, num_experts)
    sorted_slots, offsets, dropped = torch.ops.mtmerge.moe_align(ids=ids, num_experts=num_experts, capacity=capacity)
    return AlignOutput(sorted_slots, offsets, dropped)


# ---- experts ------------------------------------------------------------------------------------


def moe_experts(x: Tensor, gate_up: Tensor, down: Tensor, weights: Tensor, ids: Tensor, *, activation: str = "silu",
                gate_up_bias: Tensor | None = None, down_bias: Tensor | None = None) -> Tensor:
    """The routed experts' gated feed-forward, weighted and summed per token (fused MoE).

    Parameters
    ----------
    x : Tensor ``[..., H]``
        Tokens (``T`` = the product of the leading dimensions), float32/bfloat16/float16
        (float64 for gradcheck).
    gate_up : Tensor ``[E, 2F, H]``
        Gate rows ``0:F`` and up rows ``F:2F`` (interleaved for ``activation="gpt_oss"``),
        ``x``'s dtype and device; any strides (transposed views are fine).
    down : Tensor ``[E, H, F]``
        ``x``'s dtype and device; any strides.
    weights : Tensor ``[T, k]`` or ``[..., k]``
        Routing weights, any float dtype (read as float32).
    ids : Tensor, ``weights``' shape
        int32/int64 experts in ``[-1, E)``; ``-1`` contributes nothing.
    activation : {"silu", "gelu", "gelu_tanh", "relu", "gpt_oss"}
        ``act(gate) * up``; ``"gpt_oss"`` is gpt-oss's clamped GLU on interleaved rows.
    gate_up_bias : Tensor ``[E, 2F]``, optional
    down_bias : Tensor ``[E, H]``, optional
        Biases in ``x``'s dtype.

    Returns
    -------
    Tensor, ``x``'s shape and dtype
        ``y[t] = sum_j weights[t, j] * down[e] @ (act(gate_up[e] @ x[t] + b) ...)`` with
        ``e = ids[t, j]``, accumulated in float32, summed in ``j`` order. Differentiable with
        respect to ``x``, ``gate_up``, ``down``, ``weights`` and the biases.
    """
    x = float_arg(x, "x")
    if x.dim() < 1:
        raise ValueError("x must be [..., H], got a 0-d tensor")
    hidden = x.shape[-1]
    gate_up = float_arg(gate_up, "gate_up")
    down = float_arg(down, "down")
    if gate_up.dim() != 3 or gate_up.shape[2] != hidden or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [E, 2F, H] with H = {hidden} and an even 2F, "
                         f"got shape {tuple(gate_up.shape)}")
    num_experts, two_f = gate_up.shape[:2]
    shape_is(down, "down", (num_experts, hidden, two_f // 2), "[E, H, F]")
    for name, t in (("gate_up", gate_up), ("down", down)):
        same_dtype(t, name, x, "x")
        same_device(t, name, x, "x")
    weights = float_arg(weights, "weights")
    ids = index_arg(ids, "ids")
    num_tokens = math.prod(x.shape[:-1])
    if ids.dim() < 1 or ids.shape[:-1] not in (torch.Size([num_tokens]), x.shape[:-1]):
        raise ValueError(f"ids must be [T, k] or [..., k] with x's leading shape {tuple(x.shape[:-1])}, "
                         f"got shape {tuple(ids.shape)}")
    if weights.shape != ids.shape:
        raise ValueError(f"weights has shape {tuple(weights.shape)} but ids has {tuple(ids.shape)}: they must match")
    same_device(weights, "weights", x, "x")
    same_device(ids, "ids", x, "x")
    activation = choice(activation, ACTIVATIONS, "activation")
    for name, t, shape, layout in (("gate_up_bias", gate_up_bias, (num_experts, two_f), "[E, 2F]"),
                                   ("down_bias", down_bias, (num_experts, hidden), "[E, H]")):
        if t is not None:
            float_arg(t, name)
            shape_is(t, name, shape, layout)
            same_dtype(t, name, x, "x")
            same_device(t, name, x, "x")
    ids_in_range(ids, "ids", -1, num_experts)
    k = ids.shape[-1]
    y = torch.ops.mtmerge.moe_experts(x=x.reshape(num_tokens, hidden), gate_up=gate_up, down=down,
                                      weights=weights.reshape(num_tokens, k), ids=ids.reshape(num_tokens, k),
                                      activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias)
    return y.reshape(x.shape)


# ---- auxiliary losses -------------------------------------------------------------------------------


def _layers(value, name: str, dtypes, what: str) -> list[Tensor]:
    """A tensor or a non-empty sequence of tensors (one per layer), as a list."""
    if isinstance(value, Tensor):
        return [tensor_arg(value, name, dtypes, what)]
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a tensor or a sequence of tensors (one per layer), "
                        f"got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must hold at least one tensor, got an empty sequence")
    return [tensor_arg(t, f"{name}[{i}]", dtypes, what) for i, t in enumerate(value)]


def _router_logits(router_logits, num_experts: int | None = None) -> Tensor:
    """Per-layer ``[T_l, E]`` logits concatenated into ``[sum T_l, E]`` on the first's device."""
    layers = _layers(router_logits, "router_logits", ANY_FLOAT_DTYPES, "float32, bfloat16, float16 or float64")
    for i, t in enumerate(layers):
        label = "router_logits" if len(layers) == 1 else f"router_logits[{i}]"
        columns = layers[0].shape[-1] if num_experts is None else num_experts
        if t.dim() != 2 or t.shape[1] != columns:
            raise ValueError(f"{label} must be [T, E] with E = {columns}, got shape {tuple(t.shape)}")
        same_dtype(t, label, layers[0], "router_logits[0]")
    device = layers[0].device
    return torch.cat([t.to(device) for t in layers]) if len(layers) > 1 else layers[0]


def load_balancing_loss(router_logits: Tensor | Sequence[Tensor], ids: Tensor | Sequence[Tensor] | None,
                        num_experts: int, k: int) -> Tensor:
    """Switch Transformer / Mixtral auxiliary load-balancing loss.

    Equals ``transformers``' ``load_balancing_loss_func(router_logits, num_experts, k)`` (without
    an attention mask) when ``ids`` is the top-k of the same logits.

    Parameters
    ----------
    router_logits : Tensor ``[T, E]`` or sequence of ``[T_l, E]`` (one per layer)
        Router logits; layers are concatenated along tokens (on the first one's device).
    ids : Tensor ``[T, k]``, sequence of ``[T_l, k]``, or None
        The experts each token was routed to, int32/int64 in ``[-1, E)`` (``-1`` ignored); None
        takes the top-k of ``softmax(router_logits)`` per token (:func:`moe_topk_gate`).
    num_experts : int
        E, the logits' last dimension.
    k : int
        Experts per token: the number of columns of ``ids``.

    Returns
    -------
    Tensor, 0-dim float32 (float64 for float64 logits)
        ``E * sum_e (count_e / T) * mean_t softmax(logits)[t, e]``; 0 when there are no tokens.
        Differentiable with respect to ``router_logits``.
    """
    num_experts = int_arg(num_experts, "num_experts", 1)
    k = int_arg(k, "k", 0, num_experts, f" (num_experts = {num_experts})")
    logits = _router_logits(router_logits, num_experts)
    if ids is None:
        no_nan(logits, "router_logits")
        chosen = torch.ops.mtmerge.moe_topk_gate(logits=logits.detach(), k=k, scoring="softmax", renormalize=False,
                                                 bias=None)[1]
    else:
        id_layers = _layers(ids, "ids", INDEX_DTYPES, "int32 or int64")
        if len(id_layers) != (1 if isinstance(router_logits, Tensor) else len(router_logits)):
            raise ValueError(f"ids must have one tensor per layer of router_logits, got {len(id_layers)}")
        for i, t in enumerate(id_layers):
            label = "ids" if len(id_layers) == 1 else f"ids[{i}]"
            if t.dim() != 2 or t.shape[1] != k:
                raise ValueError(f"{label} must be [T, k] with k = {k}, got shape {tuple(t.shape)}")
        chosen = torch.cat([t.to(logits.device, torch.int64) for t in id_layers]) if len(id_layers) > 1 \
            else id_layers[0].to(logits.device)
        if chosen.shape[0] != logits.shape[0]:
            raise ValueError(f"ids has {chosen.shape[0]} rows but router_logits has {logits.shape[0]}: one per token")
        ids_in_range(chosen, "ids", -1, num_experts)
    return torch.ops.mtmerge.moe_load_balancing_loss(router_logits=logits, ids=chosen, num_experts=num_experts)


def router_z_loss(router_logits: Tensor | Sequence[Tensor]) -> Tensor:
    """ST-MoE's router z-loss ``mean_t logsumexp(router_logits[t])^2``.

    Parameters
    ----------
    router_logits : Tensor ``[T, E]`` or sequence of ``[T_l, E]`` (one per layer, concatenated)

    Returns
    -------
    Tensor, 0-dim float32 (float64 for float64 logits)
        0 when there are no tokens. Differentiable with respect to ``router_logits``.
    """
    logits = _router_logits(router_logits)
    return torch.ops.mtmerge.moe_router_z_loss(router_logits=logits)
