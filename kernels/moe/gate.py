"""Gates: ``moe_topk_gate`` (scores + top-k + renormalize) and ``moe_task_gate`` (a per-task
router matvec, then the top-k gate).

:func:`_topk_kernel`: one program per block of rows holds the whole row of E scores (E is small:
a few hundred at most) in fp32 (fp64 for fp64 logits), and picks the top k by repeated argmax,
the lower expert index winning ties. Only the choice (scores + bias) decides; the weights are
the scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import EXACT, block, check_float, pow2, sigmoid

SCORINGS = ("softmax", "sigmoid")


@triton.jit
def _topk_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, E, k, stride_t,
                 SIGMOID: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_T: tl.constexpr, E_P2: tl.constexpr, K_P2: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ex = tl.arange(0, E_P2)
    live = (rows[:, None] < T) & (ex[None, :] < E)
    x = tl.load(logits_ptr + rows[:, None] * stride_t + ex[None, :], mask=live, other=float("-inf"))
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    x = tl.where(rows[:, None] < T, x, 0.0)  # rows past T: finite, unused
    if SIGMOID:
        s = tl.where(live, sigmoid(tl.where(live, x, 0.0)), 0.0)
    else:
        z = tl.exp(x - tl.max(x, axis=1)[:, None])  # padding: exp(-inf) = 0
        s = z / tl.sum(z, axis=1)[:, None]
    choice = s
    if HAS_BIAS:
        choice = s + tl.load(bias_ptr + ex, mask=ex < E, other=0).to(s.dtype)[None, :]
    cols = tl.arange(0, K_P2)
    weights = tl.zeros([BLOCK_T, K_P2], dtype=s.dtype)
    picks = tl.zeros([BLOCK_T, K_P2], dtype=tl.int32)
    free = live
    for j in range(k):
        best = tl.max(tl.where(free, choice, float("-inf")), axis=1)
        # the lowest free expert reaching the maximum
        pick = tl.min(tl.where(free & (choice == best[:, None]), ex[None, :], E_P2), axis=1)
        chosen = ex[None, :] == pick[:, None]
        free = free & ~chosen
        weights = tl.where(cols[None, :] == j, tl.sum(tl.where(chosen, s, 0.0), axis=1)[:, None], weights)
        picks = tl.where(cols[None, :] == j, pick[:, None], picks)
    if RENORM:
        total = tl.sum(weights, axis=1)
        weights = weights / tl.where(total > 0, total, 1.0)[:, None]  # (rows past T: 0)
    out = (rows[:, None] < T) & (cols[None, :] < k)
    tl.store(w_ptr + rows[:, None] * k + cols[None, :], weights, mask=out)
    tl.store(ids_ptr + rows[:, None] * k + cols[None, :], picks, mask=out)


@triton.jit
def _router_kernel(x_ptr, router_ptr, task_ptr, mask_ptr, out_ptr, E, H, stride_xt, stride_rn, stride_re,
                   stride_mn, HAS_MASK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    """logits[t, e] = sum_h router[task[t], e, h] * x[t, h] (fp32, fp64 for fp64 x); -inf where
    expert_mask[task[t], e] is False. One program per (token, block of experts)."""
    t = tl.program_id(0).to(tl.int64)
    ex = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    task = tl.load(task_ptr + t).to(tl.int64)
    hh = tl.arange(0, BLOCK_H)
    acc_dtype: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_E, BLOCK_H], dtype=acc_dtype)
    rows = router_ptr + task * stride_rn + ex.to(tl.int64)[:, None] * stride_re
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hh
        xv = tl.load(x_ptr + t * stride_xt + h, mask=h < H, other=0).to(acc_dtype)
        r = tl.load(rows + h[None, :], mask=(ex[:, None] < E) & (h[None, :] < H), other=0).to(acc_dtype)
        acc += r * xv[None, :]
    logits = tl.sum(acc, axis=1)
    if HAS_MASK:
        allowed = tl.load(mask_ptr + task * stride_mn + ex, mask=ex < E, other=0) != 0
        logits = tl.where(allowed, logits, float("-inf"))
    tl.store(out_ptr + t * E + ex, logits, mask=ex < E)


def _check_k(k: int, E: int) -> int:
    if not 0 <= k <= E:
        raise ValueError(f"k must be in [0, {E}], got {k}")
    return int(k)


def moe_topk_gate(logits: Tensor, k: int, scoring: str, renormalize: bool,
                  bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Triton launcher of ``mtmerge::moe_topk_gate``.

    Parameters
    ----------
    logits : Tensor
        ``[T, E]`` float router logits.
    k : int
        Experts per token, ``0 <= k <= E``.
    scoring : {"softmax", "sigmoid"}
        How scores are made from the logits (in fp32).
    renormalize : bool
        Divide the k weights of a token by their sum.
    bias : Tensor or None
        ``[E]`` float, added to the scores only to choose the experts.

    Returns
    -------
    weights : Tensor
        float32 ``[T, k]`` (float64 for float64 logits): the chosen experts' scores.
    ids : Tensor
        int32 ``[T, k]``: the chosen experts, by decreasing choice (lower index first on ties).
    """
    check_float(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {list(logits.shape)}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    T, E = logits.shape
    k = _check_k(k, E)
    wdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    weights = torch.empty((T, k), dtype=wdtype, device=logits.device)
    ids = torch.empty((T, k), dtype=torch.int32, device=logits.device)
    if T == 0 or k == 0:
        return weights, ids
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if bias is not None:
        bias = check_float(bias, "bias").reshape(-1).contiguous()
        if bias.numel() != E:
            raise ValueError(f"bias must be [{E}], got shape {list(bias.shape)}")
    E_P2 = pow2(E)
    BLOCK_T = max(1, min(block(4096, 256) // E_P2, block(64, 4)))
    _topk_kernel[(triton.cdiv(T, BLOCK_T),)](
        logits, logits if bias is None else bias, weights, ids, T, E, k, logits.stride(0),
        SIGMOID=scoring == "sigmoid", RENORM=bool(renormalize), HAS_BIAS=bias is not None,
        BLOCK_T=BLOCK_T, E_P2=E_P2, K_P2=pow2(k), **EXACT)
    return weights, ids


def moe_task_gate(x: Tensor, router: Tensor, task_ids: Tensor, k: int, expert_mask: Tensor | None, scoring: str,
                  renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Triton launcher of ``mtmerge::moe_task_gate``: per-task routers, then the top-k gate.

    Parameters
    ----------
    x : Tensor
        ``[T, H]`` float tokens.
    router : Tensor
        ``[n_tasks, E, H]`` of x's dtype: one router per task.
    task_ids : Tensor
        int32 or int64 ``[T]`` in ``[0, n_tasks)``.
    k : int
        Experts per token.
    expert_mask : Tensor or None
        bool ``[n_tasks, E]``: the experts each task may use (logits of the others are -inf).
    scoring, renormalize
        As in :func:`moe_topk_gate`.

    Returns
    -------
    weights : Tensor
        float32 ``[T, k]`` (float64 for float64 x).
    ids : Tensor
        int32 ``[T, k]``.
    logits : Tensor
        float32 ``[T, E]`` (float64 for float64 x), -inf where masked.
    """
    check_float(x, "x")
    check_float(router, "router")
    if x.dim() != 2 or router.dim() != 3 or router.shape[2] != x.shape[1]:
        raise ValueError(f"x must be [T, H] and router [n_tasks, E, H], got {list(x.shape)} and "
                         f"{list(router.shape)}")
    T, H = x.shape
    n_tasks, E, _ = router.shape
    if task_ids.dtype not in (torch.int32, torch.int64) or task_ids.numel() != T:
        raise ValueError(f"task_ids must be int32/int64 [{T}], got {task_ids.dtype} {list(task_ids.shape)}")
    _check_k(k, E)
    ldtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = torch.empty((T, E), dtype=ldtype, device=x.device)
    if T and E:
        x = x if x.stride(1) == 1 else x.contiguous()
        router = router if router.stride(2) == 1 else router.contiguous()
        tasks = task_ids.reshape(-1).contiguous()
        mask = None
        if expert_mask is not None:
            if tuple(expert_mask.shape) != (n_tasks, E):
                raise ValueError(f"expert_mask must be [{n_tasks}, {E}], got {list(expert_mask.shape)}")
            mask = expert_mask.to(torch.int8).contiguous()
        BLOCK_E = min(pow2(E), block(64, 8))
        BLOCK_H = min(pow2(H), block(64, 16))
        _router_kernel[(T, triton.cdiv(E, BLOCK_E))](
            x, router, tasks, x if mask is None else mask, logits, E, H, x.stride(0), router.stride(0),
            router.stride(1), 0 if mask is None else mask.stride(0), HAS_MASK=mask is not None,
            BLOCK_E=BLOCK_E, BLOCK_H=BLOCK_H, **EXACT)
    weights, ids = moe_topk_gate(logits, k, scoring, renormalize, None)
    return weights, ids, logits
