"""Plain-PyTorch reference for the merge family: the math, written to be read.

These functions define what "correct" means for the compiled kernels (``csrc/merge``) and
the Triton kernels (``kernels/merge.py``). They favour clarity over speed: they sort and
concatenate freely.

Magnitude selection (``magnitude_threshold`` / ``threshold_mask``)
-------------------------------------------------------------------
A list of tensors is one vector: their row-major flattenings, concatenated in list order.
With ``a = |x|`` over that vector, ``n = len(a)`` and ``0 <= k <= n``:

* ``selection="exact"`` keeps exactly ``k`` entries: every ``a_i > t`` where ``t`` is the
  k-th largest value, plus the first ``ties_kept = k - #{a_i > t}`` entries with ``a_i == t``
  in flat order (ties broken by lowest flat index). ``k = 0`` gives ``t = +inf`` and
  ``ties_kept = 0``.
* ``selection="geq"`` (the TIES paper's rule) keeps every ``a_i >= t`` where ``t`` is the
  ``(n - k)``-th smallest value (1-based), i.e. the ``(k+1)``-th largest; ``k = n`` keeps all
  (``t`` is then the smallest value). ``ties_kept`` counts the entries equal to ``t``, all of
  which are kept.

NaN anywhere in ``x`` raises ``ValueError``; +-inf are ordinary values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _flat_magnitudes(xs: Sequence[Tensor]) -> Tensor:
    flat = torch.cat([x.reshape(-1) for x in xs]).abs()
    if torch.isnan(flat).any():
        raise ValueError(f"x contains {int(torch.isnan(flat).sum())} NaN value(s); magnitude selection is "
                         "undefined for NaN")
    return flat


def magnitude_threshold(xs: Sequence[Tensor], k: int, selection: str = "exact") -> tuple[Tensor, Tensor]:
    """Threshold on ``|x|`` and the number of entries equal to it that are kept.

    Parameters
    ----------
    xs : sequence of Tensor
        Tensors of one float dtype, seen as one concatenated vector of ``n`` entries.
    k : int
        How many entries to keep, ``0 <= k <= n``.
    selection : {"exact", "geq"}
        Tie rule, see the module docstring.

    Returns
    -------
    threshold : Tensor
        0-d, dtype of ``xs``: the magnitude ``t``.
    ties_kept : Tensor
        0-d int64: how many entries with ``|x| == t`` are kept.
    """
    a = _flat_magnitudes(xs)
    n = a.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    inf = torch.tensor(float("inf"), dtype=xs[0].dtype, device=a.device)
    zero = torch.zeros((), dtype=torch.int64, device=a.device)
    if selection == "exact":
        if k == 0:
            return inf, zero
        t = torch.sort(a, descending=True).values[k - 1]
        return t.clone(), k - (a > t).sum()
    if selection == "geq":
        if n == 0:
            return inf, zero
        ascending = torch.sort(a).values
        t = ascending[0] if k == n else ascending[n - k - 1]  # the (n-k)-th smallest, 1-based
        return t.clone(), (a == t).sum()
    raise ValueError(f"selection must be 'exact' or 'geq', got {selection!r}")


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean mask, flattened, into uint8: bit ``i`` of byte ``j`` is entry ``8j + i``.

    Matches ``numpy.packbits(mask.ravel(), bitorder="little")``.
    """
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=mask.device)
    return (flat.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` entries."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32).unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def threshold_mask(
    xs: Sequence[Tensor],
    threshold: Tensor,
    ties_kept: Tensor,
    selection: str = "exact",
    packed: bool = False,
) -> list[Tensor]:
    """Masks of the kept entries, one per tensor, given ``magnitude_threshold``'s result.

    Returns bool masks shaped like each ``x`` or, with ``packed=True``, flat uint8 tensors of
    ``ceil(numel / 8)`` bytes (see :func:`pack_bits`).
    """
    a = torch.cat([x.reshape(-1) for x in xs]).abs()
    t = threshold.to(a.dtype).abs()
    if selection == "geq":
        keep = a >= t
    elif selection == "exact":
        is_tie = a == t
        tie_rank = torch.cumsum(is_tie.to(torch.int64), dim=0)  # 1-based rank among ties
        keep = (a > t) | (is_tie & (tie_rank <= ties_kept))
    else:
        raise ValueError(f"selection must be 'exact' or 'geq', got {selection!r}")
    masks = list(torch.split(keep, [x.numel() for x in xs]))
    if packed:
        return [pack_bits(m) for m in masks]
    return [m.reshape(x.shape) for m, x in zip(masks, xs, strict=True)]
