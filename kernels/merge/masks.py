"""TALL masks and Consensus: ``tall_masks`` and ``consensus_mask``.

Masks are bit-packed uint8: bit ``i`` of byte ``j`` is flat index ``8j + i``. No host read:
``lams`` (host floats) reach the device through pinned memory and a non-blocking copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    ELEMENT_CONFIGS,
    EXACT,
    autotune,
    check_tensor,
    device_values,
    flat,
    grid_over,
    host_list,
    load_f32,
    store_packed,
    task_delta,
    task_inputs,
)


@autotune(ELEMENT_CONFIGS, key=["T"])
@triton.jit
def _tall_masks_kernel(
    base_ptr, ft_ptrs, merged_ptr, lams_ptr, out_ptr, n, nbytes,
    T: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[t] = packed |d_t| > lam_t * |merged - d_t|."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    b = 0.0
    if HAS_BASE:
        b = load_f32(base_ptr, offs, in_range)
    mtl = load_f32(merged_ptr, offs, in_range)
    for t in tl.static_range(T):
        d = task_delta(ft_ptrs[t], b, offs, in_range, HAS_BASE)
        keep = in_range & (tl.abs(d) > tl.load(lams_ptr + t) * tl.abs(mtl - d))
        store_packed(out_ptr + tl.full([], t, tl.int64) * nbytes, keep, pid, nbytes, BLOCK)


@autotune(ELEMENT_CONFIGS, key=[])
@triton.jit
def _consensus_kernel(masks_ptr, out_ptr, T: tl.constexpr, nbytes, stride_t, stride_b, k, BLOCK: tl.constexpr):
    """Byte j of out: bit i set where at least k of the T packed masks have bit i of byte j."""
    byte_offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = byte_offs < nbytes
    shifts = tl.arange(0, 8)[None, :]
    count = tl.zeros([BLOCK, 8], dtype=tl.int32)
    row = masks_ptr + byte_offs * stride_b
    for _ in tl.static_range(T):
        byte = tl.load(row, mask=in_range, other=0).to(tl.int32)
        count += (byte[:, None] >> shifts) & 1
        row += stride_t
    byte = tl.sum((count >= k).to(tl.int32) << shifts, axis=1).to(tl.uint8)
    tl.store(out_ptr + byte_offs, byte, mask=in_range)


def tall_masks(base: Tensor | None, finetuned: Sequence[Tensor], merged: Tensor, lams: Sequence[float]) -> Tensor:
    """Triton launcher of ``mtmerge::tall_masks``.

    Parameters
    ----------
    base, finetuned
        As in ``delta_threshold``.
    merged : Tensor
        The multi-task vector ``tau_MTL``: float32, bfloat16 or float16, ``n`` elements.
    lams : sequence of float
        Per task ``lam_t``.

    Returns
    -------
    Tensor
        uint8 ``[T, ceil(n / 8)]``: packed ``|tau_t| > lam_t * |merged - tau_t|`` (fp32).
    """
    b, fts, n, device = task_inputs(base, finetuned)
    mtl = flat(merged, "merged")
    if mtl.numel() != n or mtl.device != device:
        raise ValueError(f"merged must hold {n} elements on {device}, got {mtl.numel()} on {mtl.device}")
    T = len(fts)
    lams = host_list(lams, "lams", T)
    nbytes = (n + 7) // 8
    out = torch.empty((T, nbytes), dtype=torch.uint8, device=device)
    if n:
        lam_values = device_values(lams, torch.float32, device)
        _tall_masks_kernel[grid_over(n)](fts[0] if b is None else b, fts, mtl, lam_values, out, n, nbytes,
                                         T=T, HAS_BASE=b is not None, **EXACT)
    return out


def consensus_mask(masks: Tensor, k: int = 2) -> Tensor:
    """Triton launcher of ``mtmerge::consensus_mask``.

    Parameters
    ----------
    masks : Tensor
        uint8 ``[T, nbytes]``: packed per-task masks (e.g. from :func:`tall_masks`).
    k : int
        How many masks must agree, ``>= 1``.

    Returns
    -------
    Tensor
        uint8 ``[nbytes]``: bits set where at least ``k`` of the masks are set.
    """
    check_tensor(masks, "masks")
    if masks.dtype != torch.uint8:
        raise TypeError(f"masks must be uint8, got {masks.dtype}")
    if masks.dim() != 2:
        raise ValueError(f"masks must be a 2-D [T, nbytes] tensor, got shape {list(masks.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    T, nbytes = masks.shape
    out = torch.empty(nbytes, dtype=torch.uint8, device=masks.device)
    if nbytes:
        _consensus_kernel[grid_over(nbytes)](masks, out, T, nbytes, masks.stride(0), masks.stride(1), int(k))
    return out
