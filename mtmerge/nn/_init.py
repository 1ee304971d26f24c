"""Helpers shared by the layers of :mod:`mtmerge.nn`: argument checks and device-independent init."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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


def generator_for(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """The generator an initialization draws from: ``generator`` if given, else a fresh one seeded
    with the layer's ``seed``, else None (torch's global RNG)."""
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return generator


def add_expert_parameters(module: nn.Module, num_experts: int, hidden: int, ffn: int, bias: bool,
                          device=None, dtype=None) -> None:
    """Register uninitialized expert weights on ``module``: ``gate_up [E, 2F, H]``, ``down [E, H, F]``
    and, with ``bias``, ``gate_up_bias [E, 2F]`` and ``down_bias [E, H]`` (else None)."""
    factory = {"device": device, "dtype": dtype}
    module.gate_up = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden, **factory))
    module.down = nn.Parameter(torch.empty(num_experts, hidden, ffn, **factory))
    if bias:
        module.gate_up_bias = nn.Parameter(torch.empty(num_experts, 2 * ffn, **factory))
        module.down_bias = nn.Parameter(torch.empty(num_experts, hidden, **factory))
    else:
        module.register_parameter("gate_up_bias", None)
        module.register_parameter("down_bias", None)
