"""Local copy of the TIES paper's released code (prateeky2806/ties-merging).

Source file: ``src/utils/merge_utils.py``: ``topk_values_mask`` (keep ``|x| >=`` the
``(d - int(d * K))``-th smallest by ``kthvalue``), ``resolve_sign`` with ``"mass"`` and
``resolve_zero_signs(..., "majority")``, ``disjoint_merge`` (``mean`` / ``sum`` / ``max``), and
the merge script's ``base + lam * merged_tv`` on flattened checkpoints. One guard is added:
``kthvalue(0)`` is an error in the original, so K = 1 (keep all) skips the mask, as the
tall_masks repository's copy of the file does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LABEL = "the TIES paper's code (local copy of src/utils/merge_utils.py, tests/peers/ties_paper.py)"


def topk_values_mask(m: Tensor, k_frac: float) -> Tensor:
    """Rows of ``m`` [T, d] keep ``|x| >=`` their ``(d - int(d * K))``-th smallest ``|x|``."""
    if k_frac > 1:
        k_frac /= 100
    if m.dim() == 1:
        m = m.unsqueeze(0)
    d = m.shape[1]
    k = d - int(d * k_frac)
    if k == 0:
        return m
    kth_values, _ = m.abs().kthvalue(k, dim=1, keepdim=True)
    return m * (m.abs() >= kth_values)


def resolve_sign(tv: Tensor) -> Tensor:
    """``resolve_sign(.., "mass")``: sign of the column sums; zeros get the sign of their sum."""
    sign_to_mult = torch.sign(tv.sum(dim=0))
    majority_sign = torch.sign(sign_to_mult.sum())
    sign_to_mult[sign_to_mult == 0] = majority_sign
    return sign_to_mult


def disjoint_merge(tv: Tensor, merge_func: str, sign_to_mult: Tensor) -> Tensor:
    rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, tv > 0, tv < 0)
    selected = tv * rows_to_keep
    if merge_func == "mean":
        counts = (selected != 0).sum(dim=0).float()
        return selected.sum(dim=0) / torch.clamp(counts, min=1)
    if merge_func == "sum":
        return selected.sum(dim=0)
    if merge_func == "max":
        return selected.abs().max(dim=0)[0] * sign_to_mult
    raise ValueError(f"Merge method {merge_func} is not defined.")


def ties(task_vectors: Sequence[Tensor], density: float, merge_func: str = "mean") -> Tensor:
    """The merged task vector of flat task vectors (the paper's ``merge_methods("topk", ...)``)."""
    return _ties_rows(torch.stack([tv.reshape(-1) for tv in task_vectors]), density, merge_func)


def _ties_rows(task_vectors: Tensor, density: float, merge_func: str) -> Tensor:
    updated = topk_values_mask(task_vectors, density)
    return disjoint_merge(updated, merge_func, resolve_sign(updated))


def ties_merge(base: Tensor, finetuned: Sequence[Tensor], density: float, lam: float = 1.0,
               merge_func: str = "mean") -> Tensor:
    """The merge script: flatten, subtract, TIES, ``base + lam * merged_tv``, back to ``base``'s shape."""
    flat_base = base.reshape(-1)
    task_vectors = torch.vstack([f.reshape(-1) for f in finetuned]) - flat_base
    return (flat_base + lam * _ties_rows(task_vectors, density, merge_func)).reshape(base.shape)
