"""The routers' auxiliary losses, as two-stage deterministic reductions: one kernel writes a
partial per block of rows, one program sums the partials in block order.

* ``moe_load_balancing_loss``: E * sum_e (count_e / T) * mean_t softmax(logits)[t, e].
* ``moe_router_z_loss``: mean_t logsumexp_e(logits[t])^2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import EXACT, block, check_float, pow2


@triton.jit
def _rows(logits_ptr, rows, T, E, stride_t, E_P2: tl.constexpr):
    """The block's logits [rows, E_P2] in fp32 (fp64 for fp64 logits), -inf past E, 0 past T."""
    ex = tl.arange(0, E_P2)
    x = tl.load(logits_ptr + rows[:, None] * stride_t + ex[None, :], mask=(rows[:, None] < T) & (ex[None, :] < E),
                other=float("-inf"))
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    return tl.where(rows[:, None] < T, x, tl.where(ex[None, :] < E, 0.0, float("-inf")))


@triton.jit
def _balance_partial_kernel(logits_ptr, ids_ptr, prob_ptr, count_ptr, T, E, topk, stride_t,
                            BLOCK_T: tl.constexpr, E_P2: tl.constexpr):
    """prob[b, e] = sum over the block's rows of softmax(logits[t])[e]; count[b, e] = its slots routed to e."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    ex = tl.arange(0, E_P2)
    x = _rows(logits_ptr, rows, T, E, stride_t, E_P2)
    z = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = tl.where(rows[:, None] < T, z / tl.sum(z, axis=1)[:, None], 0.0)
    tl.store(prob_ptr + pid * E_P2 + ex, tl.sum(p, axis=0))
    counts = tl.zeros([E_P2], dtype=tl.int64)
    for j in range(topk):
        e = tl.load(ids_ptr + rows * topk + j, mask=rows < T, other=-1).to(tl.int64)
        counts += tl.sum((e[:, None] == ex[None, :]).to(tl.int64), axis=0)
    tl.store(count_ptr + pid * E_P2 + ex, counts)


@triton.jit
def _balance_final_kernel(prob_ptr, count_ptr, out_ptr, blocks, T, E, num_experts, E_P2: tl.constexpr):
    ex = tl.arange(0, E_P2)
    prob = tl.zeros([E_P2], dtype=prob_ptr.dtype.element_ty)
    counts = tl.zeros([E_P2], dtype=tl.int64)
    for b in range(blocks):
        prob += tl.load(prob_ptr + b * E_P2 + ex)
        counts += tl.load(count_ptr + b * E_P2 + ex)
    live = (ex < E) & (ex < num_experts)
    terms = tl.where(live, (counts.to(prob.dtype) / T) * (prob / T), 0.0)
    tl.store(out_ptr, tl.sum(terms, axis=0) * num_experts)


@triton.jit
def _z_partial_kernel(logits_ptr, partial_ptr, T, E, stride_t, BLOCK_T: tl.constexpr, E_P2: tl.constexpr):
    """partial[b] = sum over the block's rows of logsumexp(logits[t])^2."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    x = _rows(logits_ptr, rows, T, E, stride_t, E_P2)
    m = tl.max(x, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a row of -inf: lse = -inf, as torch
    lse = m_safe + tl.log(tl.sum(tl.exp(x - m_safe[:, None]), axis=1))
    tl.store(partial_ptr + pid, tl.sum(tl.where(rows < T, lse * lse, 0.0), axis=0))


@triton.jit
def _z_final_kernel(partial_ptr, out_ptr, blocks, T, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    for b0 in range(0, blocks, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + b, mask=b < blocks, other=0)
    tl.store(out_ptr, tl.sum(acc, axis=0) / T)


def _logits(router_logits: Tensor) -> tuple[Tensor, torch.dtype]:
    check_float(router_logits, "router_logits")
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {list(router_logits.shape)}")
    x = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    return x, torch.float64 if x.dtype == torch.float64 else torch.float32


def _block_t(E_P2: int) -> int:
    return max(1, min(block(4096, 128) // E_P2, block(64, 4)))


def moe_load_balancing_loss(router_logits: Tensor, ids: Tensor, num_experts: int) -> Tensor:
    """Triton launcher of ``mtmerge::moe_load_balancing_loss`` (Mixtral's load-balancing loss).

    Parameters
    ----------
    router_logits : Tensor
        ``[T, E]`` float.
    ids : Tensor
        int32/int64 ``[T, k]`` routed experts (ids outside ``[0, num_experts)`` ignored).
    num_experts : int
        E.

    Returns
    -------
    Tensor
        0-dim float32 (float64 for float64 logits); 0 for T = 0.
    """
    x, dtype = _logits(router_logits)
    T, E = x.shape
    out = torch.zeros((), dtype=dtype, device=x.device)
    if T == 0 or E == 0:
        return out
    ids = ids.reshape(T, -1).contiguous()
    E_P2 = pow2(max(E, num_experts))
    BLOCK_T = _block_t(E_P2)
    blocks = triton.cdiv(T, BLOCK_T)
    prob = torch.empty((blocks, E_P2), dtype=dtype, device=x.device)
    counts = torch.empty((blocks, E_P2), dtype=torch.int64, device=x.device)
    _balance_partial_kernel[(blocks,)](x, ids, prob, counts, T, E, ids.shape[1], x.stride(0), BLOCK_T=BLOCK_T,
                                       E_P2=E_P2, **EXACT)
    _balance_final_kernel[(1,)](prob, counts, out, blocks, T, E, int(num_experts), E_P2=E_P2, **EXACT)
    return out


def moe_router_z_loss(router_logits: Tensor) -> Tensor:
    """Triton launcher of ``mtmerge::moe_router_z_loss``: mean_t logsumexp(router_logits[t])^2.

    Parameters
    ----------
    router_logits : Tensor
        ``[T, E]`` float.

    Returns
    -------
    Tensor
        0-dim float32 (float64 for float64 logits); 0 for T = 0.
    """
    x, dtype = _logits(router_logits)
    T, E = x.shape
    out = torch.zeros((), dtype=dtype, device=x.device)
    if T == 0:
        return out
    E_P2 = pow2(E)
    BLOCK_T = _block_t(E_P2)
    blocks = triton.cdiv(T, BLOCK_T)
    partial = torch.empty(blocks, dtype=dtype, device=x.device)
    _z_partial_kernel[(blocks,)](x, partial, T, E, x.stride(0), BLOCK_T=BLOCK_T, E_P2=E_P2, **EXACT)
    _z_final_kernel[(1,)](partial, out, blocks, T, BLOCK=block(1024, 16), **EXACT)
    return out
