"""``moe_align``: the stable counting sort of the routed slots by expert, on the device.

Slot s = t * k + j. Three steps, no float math and no atomics, so the result is the same bits on
every run:

1. :func:`_count_kernel`: per block of BLOCK slots, how many go to each expert (``counts[b, e]``).
2. torch scans on the device (tiny: [blocks, E]): each block's exclusive prefix per expert, the
   kept counts under ``capacity``, ``expert_offsets``, how many slots each block keeps before it.
3. :func:`_scatter_kernel`: per block, each slot's rank inside the block among its expert's slots
   (a cumsum of the one-hot tile), hence its global rank; kept slots go to
   ``offsets[e] + rank``, the others (dropped or id outside [0, E)) after ``offsets[E]`` in slot
   order.

On CUDA, when ``mtmerge._C`` was built with CUDA, the native kernel of
``csrc/cuda/moe_align.cu`` runs instead (same algorithm, same output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import block, pow2


@triton.jit
def _expert_onehot(ids, e0, E, EXPERTS: tl.constexpr):
    """[BLOCK, EXPERTS] one-hot of the ids in the expert chunk e0 .. e0 + EXPERTS (ids outside
    [0, E) match nothing) and the chunk's expert indices."""
    ex = e0 + tl.arange(0, EXPERTS)
    hit = (ids[:, None] == ex[None, :]) & (ex[None, :] < E)
    return hit, ex


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, n, E, BLOCK: tl.constexpr, EXPERTS: tl.constexpr):
    """counts[b, e] = #slots of block b routed to expert e (int64 [blocks, E])."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1).to(tl.int64)
    for e0 in range(0, E, EXPERTS):
        hit, ex = _expert_onehot(ids, e0, E, EXPERTS)
        tl.store(counts_ptr + pid.to(tl.int64) * E + ex, tl.sum(hit.to(tl.int64), axis=0), mask=ex < E)


@triton.jit
def _scatter_kernel(ids_ptr, prefix_ptr, offsets_ptr, kept_before_ptr, sorted_ptr, n, E, capacity,
                    BLOCK: tl.constexpr, EXPERTS: tl.constexpr):
    """sorted[pos(s)] = s for the slots s of block b (see the module docstring).

    prefix[b, e]: expert e's slots in blocks before b; kept_before[b]: kept slots before block b.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1).to(tl.int64)
    rank = tl.zeros([BLOCK], dtype=tl.int64)  # global rank among the slots of its expert
    start = tl.zeros([BLOCK], dtype=tl.int64)  # offsets[expert]
    for e0 in range(0, E, EXPERTS):
        hit, ex = _expert_onehot(ids, e0, E, EXPERTS)
        before = tl.load(prefix_ptr + pid.to(tl.int64) * E + ex, mask=ex < E, other=0)
        first = tl.load(offsets_ptr + ex, mask=ex < E, other=0)
        # inclusive cumsum down the block: the slot's 1-based rank inside the block, in its column
        inblock = tl.cumsum(hit.to(tl.int64), axis=0)
        rank += tl.sum(tl.where(hit, inblock - 1 + before[None, :], 0), axis=1)
        start += tl.sum(tl.where(hit, first[None, :], 0), axis=1)
    valid = (ids >= 0) & (ids < E)
    kept = valid & ((capacity < 0) | (rank < capacity))
    kept_i = kept.to(tl.int64)
    kept_before = tl.load(kept_before_ptr + pid) + tl.cumsum(kept_i, axis=0) - kept_i
    # not kept: after all kept slots, in slot order (s minus the kept slots before s)
    rest = tl.load(offsets_ptr + E) + offs - kept_before
    tl.store(sorted_ptr + tl.where(kept, start + rank, rest), offs, mask=in_range)


def _triton_align(ids: Tensor, num_experts: int, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    device = ids.device
    flat = ids.reshape(-1).contiguous()
    n = flat.numel()
    E = int(num_experts)
    BLOCK = block(256, 16)
    EXPERTS = min(pow2(E), block(64, 8))
    nb = triton.cdiv(n, BLOCK)
    sorted_slots = torch.empty(n, dtype=torch.int64, device=device)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=device)
    if n == 0:
        return sorted_slots, offsets, torch.zeros((), dtype=torch.int64, device=device)
    if E == 0:  # every slot is "other", in slot order
        return torch.arange(n, dtype=torch.int64, device=device), offsets, torch.zeros((), dtype=torch.int64,
                                                                                      device=device)
    counts = torch.empty((nb, E), dtype=torch.int64, device=device)
    _count_kernel[(nb,)](flat, counts, n, E, BLOCK=BLOCK, EXPERTS=EXPERTS)
    # device-side scans over the small [blocks, E] table
    inclusive = counts.cumsum(0)
    prefix = inclusive - counts
    total = inclusive[-1]
    if capacity < 0:
        kept = total
        kept_blocks = counts.sum(1)
    else:
        kept = total.clamp(max=capacity)
        kept_blocks = torch.minimum((capacity - prefix).clamp(min=0), counts).sum(1)
    torch.cumsum(kept, 0, out=offsets[1:])
    kept_before = kept_blocks.cumsum(0) - kept_blocks
    dropped = total.sum() - offsets[E]
    _scatter_kernel[(nb,)](flat, prefix, offsets, kept_before, sorted_slots, n, E, int(capacity),
                           BLOCK=BLOCK, EXPERTS=EXPERTS)
    return sorted_slots, offsets, dropped


def moe_align(ids: Tensor, num_experts: int, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Triton launcher of ``mtmerge::moe_align``: the slots sorted by expert (stable).

    Parameters
    ----------
    ids : Tensor
        int32 or int64 ``[T, k]`` expert ids; entries outside ``[0, num_experts)`` are "not routed".
    num_experts : int
        E.
    capacity : int
        Slots kept per expert (the first ones in slot order); -1: unlimited.

    Returns
    -------
    sorted_slots : Tensor
        int64 ``[T * k]``: the kept slots of expert 0, 1, ..., E - 1 (each in increasing slot
        order), then every other slot in increasing order.
    expert_offsets : Tensor
        int64 ``[E + 1]``: expert e's kept slots are ``sorted_slots[offsets[e]:offsets[e + 1]]``.
    dropped : Tensor
        int64 0-dim: valid slots past an expert's capacity.
    """
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be an int32 or int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if num_experts < 0:
        raise ValueError(f"num_experts must be >= 0, got {num_experts}")
    if capacity < -1:
        raise ValueError(f"capacity must be -1 (unlimited) or >= 0, got {capacity}")
    if ids.is_cuda:
        from mtmerge import _library

        native = getattr(_library._C, "moe_align_cuda", None)
        if native is not None:
            return tuple(native(ids, int(num_experts), int(capacity)))
    return _triton_align(ids, num_experts, capacity)
