"""Helpers shared by the layers of :mod:`mtmerge.nn`: argument checks and device-independent init."""

from __future__ import annotations

import torch
from torch import Tensor


def positive_int(value: int, name: str) -> int:
    """``value`` if it is an int >= 1 (bool is not), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def uniform_(param: Tensor | None, bound: float, generator: torch.Generator | None) -> None:
    """Fill ``param`` with U(-bound, bound) drawn on the CPU in float32, so a seed gives the same
    values on every device and dtype; ``None`` and meta parameters are left alone."""
    if param is None or param.is_meta:
        return
    values = torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    with torch.no_grad():
        param.copy_(values)
