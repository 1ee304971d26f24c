"""Plain-PyTorch reference for the MoE family: the math, written to be read.

These functions define what "correct" means for the compiled kernels (``csrc/moe``) and the
Triton kernels (``kernels/moe``); each is named like its op (``torch.ops.mtmerge.<name>``) and
takes the op's arguments. They favour clarity over speed.

Conventions
-----------
* Layouts (transformers 5 / vLLM): tokens ``x [T, H]``, ``gate_up [E, 2F, H]`` (gate rows
  ``0:F``, up rows ``F:2F``; gpt-oss interleaves them), ``down [E, H, F]``, biases
  ``gate_up_bias [E, 2F]`` and ``down_bias [E, H]``.
* Routing: ``ids [T, k]`` (int32 or int64) and ``weights [T, k]``; slot ``s = t * k + j``.
  An id of ``-1`` means "not here" (expert parallelism) and contributes nothing; every id
  outside ``[0, E)`` is treated like ``-1`` (the public API rejects them before any op runs).
* "fp32" is the compute dtype: float32, or float64 when the inputs are float64 (float64 exists
  so that ``torch.autograd.gradcheck`` can run).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812  (the usual alias)
from torch import Tensor

from mtmerge._constants import GPT_OSS_ALPHA, GPT_OSS_LIMIT

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "gpt_oss")
_GELU_TANH_C = math.sqrt(2.0 / math.pi)
_GELU_TANH_A = 0.044715


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _valid_ids(ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """``ids`` as int64 with anything outside ``[0, E)`` replaced by -1, and the validity mask."""
    ids = ids.to(torch.int64)
    valid = (ids >= 0) & (ids < num_experts)
    return torch.where(valid, ids, torch.full_like(ids, -1)), valid


# ---- gating ---------------------------------------------------------------------------------


def scores(logits: Tensor, scoring: str) -> Tensor:
    """``softmax(logits)`` or ``sigmoid(logits)`` over the last dimension, in fp32."""
    z = logits.to(compute_dtype(logits.dtype))
    if scoring == "softmax":
        return torch.softmax(z, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")


def topk_desc(choice: Tensor, k: int) -> Tensor:
    """int64 ``[T, k]``: the indices of the ``k`` largest entries per row, in descending order of
    value, equal values by lower index first (a stable descending sort)."""
    order = torch.sort(choice, dim=-1, descending=True, stable=True).indices
    return order[:, :k].contiguous()


def renormalized(weights: Tensor) -> Tensor:
    """``weights / weights.sum(-1)`` per row (rows of zero width stay empty)."""
    if weights.shape[-1] == 0:
        return weights
    return weights / weights.sum(dim=-1, keepdim=True)


def moe_topk_gate(logits: Tensor, k: int, scoring: str, renormalize: bool,
                  bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Top-k routing of ``T`` tokens over ``E`` experts.

    Parameters
    ----------
    logits : Tensor ``[T, E]``
        Router logits, any float dtype.
    k : int
        Experts per token, ``0 <= k <= E``.
    scoring : {"softmax", "sigmoid"}
        ``s = softmax(logits)`` over all E experts, or ``s = sigmoid(logits)``; in fp32.
    renormalize : bool
        Divide the k chosen scores by their sum.
    bias : Tensor ``[E]`` or None
        Added to ``s`` to choose the experts (DeepSeek-V3's load-balancing bias); the weights
        are ``s`` itself, without it.

    Returns
    -------
    weights : Tensor ``[T, k]``
        float32 (float64 for float64 logits): ``s[t, ids[t]]``, renormalized if asked.
    ids : Tensor ``[T, k]``
        int32: the k largest ``s + bias`` per row in descending order, ties by lower index.
    """
    s = scores(logits, scoring)
    choice = s if bias is None else s + bias.to(s.dtype)
    ids = topk_desc(choice, k)
    weights = s.gather(-1, ids)
    if renormalize:
        weights = renormalized(weights)
    return weights.contiguous(), ids.to(torch.int32)


def task_logits(x: Tensor, router: Tensor, task_ids: Tensor, expert_mask: Tensor | None) -> Tensor:
    """``logits[t, e] = <router[task_ids[t], e], x[t]>`` in fp32, ``-inf`` where the token's
    task may not use expert ``e`` (``expert_mask[task_ids[t], e]`` is False)."""
    cd = compute_dtype(x.dtype)
    tasks = task_ids.to(torch.int64)
    per_token_router = router.to(cd)[tasks]  # [T, E, H]
    logits = torch.einsum("teh,th->te", per_token_router, x.to(cd))
    if expert_mask is not None:
        allowed = expert_mask.to(torch.bool)[tasks]  # [T, E]
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.contiguous()


def moe_task_gate(x: Tensor, router: Tensor, task_ids: Tensor, k: int, expert_mask: Tensor | None, scoring: str,
                  renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Task-conditioned top-k routing (M³ViT): one router per task, mixed tasks in one batch.

    Parameters
    ----------
    x : Tensor ``[T, H]``
        Tokens, any float dtype.
    router : Tensor ``[n_tasks, E, H]``
        One router per task, ``x``'s dtype.
    task_ids : Tensor ``[T]``
        int32/int64 in ``[0, n_tasks)``: the task of each token.
    k : int
        Experts per token (at most the number of experts every task may use).
    expert_mask : Tensor ``[n_tasks, E]`` bool or None
        The experts each task may use (None: all).
    scoring, renormalize
        As in :func:`moe_topk_gate`.

    Returns
    -------
    weights : Tensor ``[T, k]`` fp32, ids : Tensor ``[T, k]`` int32, logits : Tensor ``[T, E]`` fp32
        ``moe_topk_gate(logits, k, scoring, renormalize, None)`` and the logits of
        :func:`task_logits`.
    """
    logits = task_logits(x, router, task_ids, expert_mask)
    weights, ids = moe_topk_gate(logits, k, scoring, renormalize, None)
    return weights, ids, logits


# ---- permutation ------------------------------------------------------------------------------


def moe_align(ids: Tensor, num_experts: int, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the ``T * k`` routed slots by expert, keeping at most ``capacity`` per expert.

    Parameters
    ----------
    ids : Tensor ``[T, k]``
        int32/int64 expert of each slot ``s = t * k + j``; ``-1`` (and anything outside
        ``[0, num_experts)``) is routed nowhere.
    num_experts : int
        E.
    capacity : int
        Slots kept per expert: an expert's first ``capacity`` slots in increasing ``s``;
        ``-1`` keeps all.

    Returns
    -------
    sorted_slots : Tensor ``[T * k]`` int64
        The kept slots of expert 0 (increasing ``s``), then expert 1, ..., expert E-1, then
        every other slot (dropped ones and unrouted ones) in increasing ``s``.
    expert_offsets : Tensor ``[E + 1]`` int64
        ``expert_offsets[e]:expert_offsets[e + 1]`` is expert e's range of ``sorted_slots``.
    dropped : Tensor ``[]`` int64
        Routed slots beyond an expert's capacity.
    """
    flat, valid = _valid_ids(ids.reshape(-1), num_experts)
    n = flat.numel()
    # position of each routed slot among its expert's slots (0, 1, 2, ... in increasing s)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    by_expert = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat)
    rank[by_expert] = torch.arange(n, device=flat.device) - starts[key[by_expert]]
    kept = valid if capacity < 0 else valid & (rank < capacity)
    # kept slots by expert, then every other slot; a stable sort keeps increasing s in each group
    final_key = torch.where(kept, flat, torch.full_like(flat, num_experts))
    sorted_slots = torch.sort(final_key, stable=True).indices
    kept_counts = torch.bincount(flat[kept], minlength=num_experts)[:num_experts]
    expert_offsets = torch.cat([kept_counts.new_zeros(1), torch.cumsum(kept_counts, 0)])
    dropped = valid.sum() - kept.sum()
    return sorted_slots, expert_offsets, dropped.reshape(())


# ---- experts ---------------------------------------------------------------------------------


def split_gate_up(h: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """``(gate, up)`` halves of ``h [..., 2F]``: rows ``0:F`` / ``F:2F``, or interleaved (gpt-oss)."""
    if activation == "gpt_oss":
        return h[..., 0::2], h[..., 1::2]
    half = h.shape[-1] // 2
    return h[..., :half], h[..., half:]


def join_gate_up(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """The inverse of :func:`split_gate_up`."""
    if activation == "gpt_oss":
        return torch.stack([gate, up], dim=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1])
    return torch.cat([gate, up], dim=-1)


def glu(h: Tensor, activation: str) -> Tensor:
    """``a [..., F]`` from ``h [..., 2F]``: ``act(gate) * up``, or gpt-oss's clamped GLU
    ``(clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g)`` with ``g = min(gate, 7)``."""
    gate, up = split_gate_up(h, activation)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if activation == "relu":
        return F.relu(gate) * up
    if activation == "gpt_oss":
        gate = gate.clamp(max=GPT_OSS_LIMIT)
        up = up.clamp(min=-GPT_OSS_LIMIT, max=GPT_OSS_LIMIT)
        return (up + 1) * (gate * torch.sigmoid(gate * GPT_OSS_ALPHA))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def glu_backward(h: Tensor, g_a: Tensor, activation: str) -> Tensor:
    """``g_h [..., 2F]``, the gradient of :func:`glu` at ``h`` given ``g_a [..., F]``.

    Clamps pass zero gradient outside their range and the full gradient on its boundary
    (``torch.clamp``'s convention); ``relu`` has zero gradient at 0.
    """
    gate, up = split_gate_up(h, activation)
    if activation == "gpt_oss":
        gate_c = gate.clamp(max=GPT_OSS_LIMIT)
        up_c = up.clamp(min=-GPT_OSS_LIMIT, max=GPT_OSS_LIMIT)
        sig = torch.sigmoid(gate_c * GPT_OSS_ALPHA)
        d_glu = sig + gate_c * GPT_OSS_ALPHA * sig * (1 - sig)
        g_gate = g_a * (up_c + 1) * d_glu * (gate <= GPT_OSS_LIMIT)
        g_up = g_a * gate_c * sig * ((up >= -GPT_OSS_LIMIT) & (up <= GPT_OSS_LIMIT))
        return join_gate_up(g_gate, g_up, activation)
    if activation == "silu":
        sig = torch.sigmoid(gate)
        act, d_act = gate * sig, sig * (1 + gate * (1 - sig))
    elif activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(gate / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * gate * gate) / math.sqrt(2.0 * math.pi)
        act, d_act = gate * cdf, cdf + gate * pdf
    elif activation == "gelu_tanh":
        th = torch.tanh(_GELU_TANH_C * (gate + _GELU_TANH_A * gate**3))
        act = 0.5 * gate * (1 + th)
        d_act = 0.5 * (1 + th) + 0.5 * gate * (1 - th * th) * _GELU_TANH_C * (1 + 3 * _GELU_TANH_A * gate * gate)
    elif activation == "relu":
        act, d_act = F.relu(gate), (gate > 0).to(gate.dtype)
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return join_gate_up(g_a * up * d_act, g_a * act, activation)


def _expert_forward(x_rows: Tensor, e: int, gate_up: Tensor, down: Tensor, activation: str,
                    gate_up_bias: Tensor | None, down_bias: Tensor | None, out_dtype: torch.dtype):
    """``(h, a, o)`` of expert ``e`` for the fp32 rows ``x_rows [n, H]``; ``a`` is rounded to
    ``out_dtype`` (x's dtype), as a GEMM in that dtype would take it."""
    cd = x_rows.dtype
    h = x_rows @ gate_up[e].to(cd).T
    if gate_up_bias is not None:
        h = h + gate_up_bias[e].to(cd)
    a = glu(h, activation).to(out_dtype).to(cd)
    o = a @ down[e].to(cd).T
    if down_bias is not None:
        o = o + down_bias[e].to(cd)
    return h, a, o


def moe_experts(x: Tensor, gate_up: Tensor, down: Tensor, weights: Tensor, ids: Tensor, activation: str,
                gate_up_bias: Tensor | None, down_bias: Tensor | None) -> Tensor:
    """The routed experts' feed-forward, weighted and combined per token.

    Parameters
    ----------
    x : Tensor ``[T, H]``
        Tokens, float32/bfloat16/float16/float64.
    gate_up : Tensor ``[E, 2F, H]``, down : Tensor ``[E, H, F]``
        Expert weights in ``x``'s dtype, any strides.
    weights : Tensor ``[T, k]``
        Routing weights, any float dtype (read in fp32).
    ids : Tensor ``[T, k]``
        int32/int64 experts; ``-1`` (or anything outside ``[0, E)``) contributes nothing.
    activation : {"silu", "gelu", "gelu_tanh", "relu", "gpt_oss"}
        See :func:`glu`.
    gate_up_bias : Tensor ``[E, 2F]`` or None, down_bias : Tensor ``[E, H]`` or None
        Biases in ``x``'s dtype.

    Returns
    -------
    Tensor ``[T, H]``, ``x``'s dtype
        ``y[t] = sum_j weights[t, j] * o[t, j]`` summed in ``j`` order in fp32, where
        ``o[t, j] = down[e] @ a + down_bias[e]``, ``a = glu(gate_up[e] @ x[t] + gate_up_bias[e])``
        rounded to x's dtype, ``e = ids[t, j]``.
    """
    cd = compute_dtype(x.dtype)
    num_tokens, k = ids.shape
    num_experts = gate_up.shape[0]
    flat_ids, valid = _valid_ids(ids, num_experts)
    xc = x.to(cd)
    w = weights.to(cd)
    outs = xc.new_zeros((num_tokens, k, x.shape[-1]))  # o[t, j], zero where the slot is unrouted
    for e in range(num_experts):
        tokens, slots = torch.nonzero(flat_ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        _, _, o = _expert_forward(xc[tokens], e, gate_up, down, activation, gate_up_bias, down_bias, x.dtype)
        outs[tokens, slots] = o
    y = xc.new_zeros((num_tokens, x.shape[-1]))
    for j in range(k):
        y = y + torch.where(valid[:, j, None], w[:, j, None] * outs[:, j], 0.0)
    return y.to(x.dtype)


def moe_experts_backward(grad_out: Tensor, x: Tensor, gate_up: Tensor, down: Tensor, weights: Tensor, ids: Tensor,
                         activation: str, gate_up_bias: Tensor | None, down_bias: Tensor | None):
    """Gradients of :func:`moe_experts` (``a``'s rounding is taken as the identity).

    Per routed slot ``(t, j)`` of expert ``e``, with ``h, a, o`` recomputed and
    ``g_o = weights[t, j] * grad_out[t]``:
    ``grad_weights[t, j] = <grad_out[t], o>``, ``grad_down[e] += g_o a^T``,
    ``grad_down_bias[e] += g_o``, ``g_a = down[e]^T g_o``, ``g_h = glu'(h) g_a``
    (:func:`glu_backward`), ``grad_gate_up[e] += g_h x[t]^T``, ``grad_gate_up_bias[e] += g_h``,
    ``grad_x[t] += gate_up[e]^T g_h``. Accumulated in fp32.

    Returns
    -------
    grad_x : ``[T, H]`` x's dtype; grad_gate_up : ``[E, 2F, H]``; grad_down : ``[E, H, F]``
    (contiguous, the weights' dtypes); grad_weights : ``[T, k]`` weights' dtype;
    grad_gate_up_bias : ``[E, 2F]``; grad_down_bias : ``[E, H]`` (empty ``[0]`` tensors of x's
    dtype when the bias is None). Experts without a slot get zero gradients.
    """
    cd = compute_dtype(x.dtype)
    num_experts = gate_up.shape[0]
    flat_ids, _ = _valid_ids(ids, num_experts)
    xc, go, w = x.to(cd), grad_out.to(cd), weights.to(cd)
    grad_x = torch.zeros_like(xc)
    grad_gate_up = torch.zeros(gate_up.shape, dtype=cd, device=x.device)
    grad_down = torch.zeros(down.shape, dtype=cd, device=x.device)
    grad_weights = torch.zeros(ids.shape, dtype=cd, device=x.device)
    grad_gu_bias = torch.zeros(gate_up.shape[:2], dtype=cd, device=x.device)
    grad_down_bias = torch.zeros(down.shape[:2], dtype=cd, device=x.device)
    for e in range(num_experts):
        tokens, slots = torch.nonzero(flat_ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        x_rows = xc[tokens]
        h, a, o = _expert_forward(x_rows, e, gate_up, down, activation, gate_up_bias, down_bias, x.dtype)
        grad_weights[tokens, slots] = (go[tokens] * o).sum(-1)
        g_o = w[tokens, slots, None] * go[tokens]  # [n, H]
        grad_down[e] = g_o.T @ a
        grad_down_bias[e] = g_o.sum(0)
        g_h = glu_backward(h, g_o @ down[e].to(cd), activation)  # [n, 2F]
        grad_gate_up[e] = g_h.T @ x_rows
        grad_gu_bias[e] = g_h.sum(0)
        grad_x.index_add_(0, tokens, g_h @ gate_up[e].to(cd))
    return (grad_x.to(x.dtype), grad_gate_up.to(gate_up.dtype), grad_down.to(down.dtype),
            grad_weights.to(weights.dtype),
            x.new_empty((0,)) if gate_up_bias is None else grad_gu_bias.to(gate_up_bias.dtype),
            x.new_empty((0,)) if down_bias is None else grad_down_bias.to(down_bias.dtype))  # two tensors: no alias


# ---- auxiliary losses ---------------------------------------------------------------------------


def expert_counts(ids: Tensor, num_experts: int, dtype: torch.dtype) -> Tensor:
    """``[E]``: how many slots of ``ids`` route to each expert (ids outside ``[0, E)`` ignored)."""
    flat, valid = _valid_ids(ids.reshape(-1), num_experts)
    return torch.bincount(flat[valid], minlength=num_experts)[:num_experts].to(dtype)


def moe_load_balancing_loss(router_logits: Tensor, ids: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer / Mixtral load-balancing loss, given the routed ids.

    ``num_experts * sum_e (count_e / T) * mean_t softmax(router_logits)[t, e]`` with ``count_e``
    the slots of ``ids [T, k]`` routed to ``e``; transformers' ``load_balancing_loss_func``
    when ``ids`` is the top-k of the same logits. 0-dim fp32; 0 for ``T = 0``.
    """
    cd = compute_dtype(router_logits.dtype)
    num_tokens = router_logits.shape[0]
    if num_tokens == 0:
        return router_logits.new_zeros((), dtype=cd)
    probs = torch.softmax(router_logits.to(cd), dim=-1)
    tokens_per_expert = expert_counts(ids, num_experts, cd) / num_tokens
    prob_per_expert = probs.mean(dim=0)
    return (tokens_per_expert * prob_per_expert).sum() * num_experts


def moe_router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE's router z-loss ``mean_t logsumexp(router_logits[t])^2``, 0-dim fp32; 0 for ``T = 0``."""
    cd = compute_dtype(router_logits.dtype)
    if router_logits.shape[0] == 0:
        return router_logits.new_zeros((), dtype=cd)
    lse = torch.logsumexp(router_logits.to(cd), dim=-1)
    return (lse * lse).mean()
