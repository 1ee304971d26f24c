"""Local copy of mergekit 0.1.5's ``ties`` math on one tensor.

Source files: ``mergekit/merge_methods/generalized_task_arithmetic.py``
(``GeneralizedTaskArithmeticMerge.merge_group`` with sign consensus "sum", ``get_mask``) and
``mergekit/sparsify.py`` (``magnitude``: density >= 1 keeps all, <= 0 keeps none, else the
``k = max(1, int(d * n))`` largest by ``argsort`` of ``|delta|``, in float32 on CPU), in the same
order of operations, so that it equals the package bit for bit
(``tests/ops/merge/test_peers.py`` checks it whenever mergekit imports). Used where mergekit is
not installed, and for mergekit's ``dare_ties`` (``sparsified=`` replaces the trim).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LABEL = "mergekit (local copy of its ties math, tests/peers/mergekit_ties_copy.py)"


def magnitude(delta: Tensor, density: float) -> Tensor:
    """``sparsify.magnitude`` without rescale."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return delta * mask.reshape_as(delta)


def ties_merge(base: Tensor, finetuned: Sequence[Tensor], weights: Sequence[float],
               densities: Sequence[float] | None, lam: float = 1.0, normalize: bool = True,
               sparsified: Sequence[Tensor] | None = None) -> Tensor:
    """``base + lam * merged`` in ``base``'s dtype. ``sparsified``: the task vectors after a
    sparsification done elsewhere (then ``densities`` is ignored)."""
    deltas = base.new_empty((len(finetuned), *base.shape))
    for t, f in enumerate(finetuned):
        deltas[t] = magnitude(f - base, densities[t]) if sparsified is None else sparsified[t].reshape(base.shape)
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > w.dim():
        w = w.unsqueeze(-1)
    deltas = deltas * w
    # get_mask(method="sum")
    sign = deltas.sign()
    majority_sign = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    mask = sign == majority_sign
    mixed = (deltas * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(base.dtype)
