"""mtmerge's experts kernels as a transformers experts implementation.

After :func:`register`, every model whose experts use ``@use_experts_implementation``
(transformers 5.23+) can run them on :func:`mtmerge.ops.moe.moe_experts`::

    from mtmerge.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="mtmerge")
    model = Model._from_config(config, experts_implementation="mtmerge")
    model.set_experts_implementation("mtmerge")

transformers calls ``fn(experts_module, hidden_states [T, H], top_k_index [T, K] int64,
top_k_weights [T, K])`` and expects ``[T, H]`` in the input's dtype. The module's layout is read
from its attributes and mapped onto the kernels' layout (``gate_up [E, 2F, H]``, ``down [E, H, F]``)
without copying a weight:

* the standard layout (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, Granite-MoE, Jamba, Qwen3-Next,
  PhiMoE, ...): concatenated gate/up, ``act_fn(gate) * up`` with SiLU, GELU (erf or tanh) or ReLU;
* ``is_transposed`` (``gate_up_proj [E, H, 2F]``, ``down_proj [E, F, H]``): transposed views;
* ``has_bias``: ``gate_up_proj_bias [E, 2F]`` and ``down_proj_bias [E, H]``;
* gpt-oss (transposed, interleaved gate/up, biases, ``(up + 1) * glu`` with ``alpha=1.702`` and
  ``limit=7.0``): the kernels' ``"gpt_oss"`` activation.

Anything else (experts without a gate, a post-expert norm, another gating function or
activation, other ``alpha``/``limit``) raises :class:`UnsupportedExpertsLayoutError` naming what is
not supported. Expert ids ``>= E`` (transformers' expert parallelism sends them with weight 0)
become ``-1``: they contribute nothing and are never read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtmerge._constants import GPT_OSS_ALPHA, GPT_OSS_LIMIT
from mtmerge.ops.moe import moe_experts

__all__ = ["NAME", "ExpertsLayout", "UnsupportedExpertsLayoutError", "experts_layout", "mtmerge_experts_forward",
           "register"]

NAME = "mtmerge"


class UnsupportedExpertsLayoutError(ValueError):
    """An experts module whose layout or activation the mtmerge kernels do not implement."""


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module maps onto :func:`~mtmerge.ops.moe.moe_experts`.

    Attributes
    ----------
    activation : str
        The kernels' activation (``"silu"``, ``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"gpt_oss"``).
    transposed : bool
        The module stores ``gate_up_proj [E, H, 2F]`` and ``down_proj [E, F, H]``.
    bias : bool
        The module has ``gate_up_proj_bias`` and ``down_proj_bias``.
    """

    activation: str
    transposed: bool
    bias: bool


def _describe(module: nn.Module) -> str:
    flags = ", ".join(f"{flag}={getattr(module, flag, None)}"
                      for flag in ("has_gate", "is_concatenated", "is_transposed", "has_bias"))
    return f"{type(module).__name__} ({flags})"


def _activation_name(act: nn.Module, module: nn.Module) -> str:
    """The kernels' name for transformers' ``act_fn`` (exact classes only: a subclass may change the math)."""
    from transformers import activations

    kind = type(act)
    if kind in (activations.SiLUActivation, nn.SiLU):
        return "silu"
    if kind is activations.GELUActivation:  # nn.functional.gelu or its python erf form
        return "gelu"
    if kind in (activations.GELUTanh, activations.NewGELUActivation, activations.FastGELUActivation):
        return "gelu_tanh"
    if kind is nn.GELU and act.approximate in ("none", "tanh"):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if kind is nn.ReLU:
        return "relu"
    hidden_act = getattr(getattr(module, "config", None), "hidden_act", None)
    raise UnsupportedExpertsLayoutError(
        f"mtmerge experts: activation {kind.__name__} (hidden_act={hidden_act!r}) of {_describe(module)} is not "
        "supported; supported: SiLU/swish ('silu'), GELU erf ('gelu'), GELU tanh ('gelu_pytorch_tanh', 'gelu_new', "
        "'gelu_fast'), ReLU ('relu')")


_PROBE_CHECKED: dict[tuple[type, float, float], bool] = {}


def _gpt_oss_gate(h: Tensor, alpha: float, limit: float) -> Tensor:
    gate, up = h[..., 0::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def _is_gpt_oss_gate(module: nn.Module) -> bool:
    """Whether ``module._apply_gate`` computes gpt-oss's clamped SwiGLU on interleaved rows with
    alpha=1.702, limit=7.0 (checked once per class on a probe spanning the clamps)."""
    alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
    if not isinstance(alpha, int | float) or not isinstance(limit, int | float):
        return False
    if not (math.isclose(alpha, GPT_OSS_ALPHA) and math.isclose(limit, GPT_OSS_LIMIT)):
        return False
    key = (type(module), float(alpha), float(limit))
    if key not in _PROBE_CHECKED:
        probe = torch.linspace(-12.0, 12.0, 96, dtype=torch.float64).reshape(4, 24)
        probe = probe[:, torch.randperm(24, generator=torch.Generator().manual_seed(0))]
        with torch.no_grad():
            got = module._apply_gate(probe)
        want = _gpt_oss_gate(probe, GPT_OSS_ALPHA, GPT_OSS_LIMIT)
        _PROBE_CHECKED[key] = got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-6, atol=1e-6))
    return _PROBE_CHECKED[key]


def experts_layout(module: nn.Module) -> ExpertsLayout:
    """Read an experts module's layout, or raise :class:`UnsupportedExpertsLayoutError` naming it.

    Parameters
    ----------
    module : nn.Module
        A transformers experts module (decorated with ``@use_experts_implementation``).

    Returns
    -------
    ExpertsLayout
    """
    from transformers.integrations.moe import _default_apply_gate

    if not getattr(module, "has_gate", True):
        raise UnsupportedExpertsLayoutError(
            f"mtmerge experts: {_describe(module)} has no gate (up_proj only, activation(up)); the kernels implement "
            "gated experts (gate_up_proj) only")
    if getattr(module, "has_post_expert_norm", False):
        raise UnsupportedExpertsLayoutError(
            f"mtmerge experts: {_describe(module)} applies a post-expert norm, which the kernels do not implement")
    if not hasattr(module, "gate_up_proj") or not hasattr(module, "down_proj"):
        raise UnsupportedExpertsLayoutError(f"mtmerge experts: {_describe(module)} has no gate_up_proj/down_proj")
    transposed = bool(getattr(module, "is_transposed", False))
    bias = bool(getattr(module, "has_bias", False))
    concatenated = bool(getattr(module, "is_concatenated", True))
    default_gate = getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate
    if concatenated and default_gate:
        return ExpertsLayout(_activation_name(module.act_fn, module), transposed, bias)
    if not concatenated and not default_gate and _is_gpt_oss_gate(module):
        return ExpertsLayout("gpt_oss", transposed, bias)
    if not concatenated and not default_gate and hasattr(module, "alpha") and hasattr(module, "limit"):
        raise UnsupportedExpertsLayoutError(
            f"mtmerge experts: {_describe(module)} has a clamped SwiGLU with alpha={module.alpha}, "
            f"limit={module.limit}; the kernels' 'gpt_oss' activation fixes alpha={GPT_OSS_ALPHA}, "
            f"limit={GPT_OSS_LIMIT} (interleaved gate/up rows)")
    layout = "concatenated" if concatenated else "interleaved"
    gate = "the default act_fn(gate) * up gate" if default_gate else f"a custom {type(module).__name__}._apply_gate"
    raise UnsupportedExpertsLayoutError(
        f"mtmerge experts: {_describe(module)}: {layout} gate/up rows with {gate} is not supported; supported: "
        "concatenated gate/up with act_fn(gate) * up, and gpt-oss's interleaved clamped SwiGLU")


def _weights(module: nn.Module, layout: ExpertsLayout, hidden: int) -> tuple[Tensor, Tensor, Tensor | None,
                                                                                Tensor | None]:
    """``gate_up [E, 2F, H]``, ``down [E, H, F]`` and biases as views of the module's parameters."""
    gate_up, down = module.gate_up_proj, module.down_proj
    if layout.transposed:
        gate_up, down = gate_up.transpose(-2, -1), down.transpose(-2, -1)
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[2] != hidden or gate_up.shape[1] % 2:
        raise UnsupportedExpertsLayoutError(
            f"mtmerge experts: {_describe(module)}: gate_up_proj {tuple(module.gate_up_proj.shape)} and down_proj "
            f"{tuple(module.down_proj.shape)} do not form gate_up [E, 2F, H={hidden}], down [E, H, F]")
    experts, ffn = gate_up.shape[0], gate_up.shape[1] // 2
    if tuple(down.shape) != (experts, hidden, ffn):
        raise UnsupportedExpertsLayoutError(
            f"mtmerge experts: {_describe(module)}: down_proj {tuple(module.down_proj.shape)} does not match "
            f"gate_up_proj {tuple(module.gate_up_proj.shape)} (expected down [E={experts}, H={hidden}, F={ffn}]"
            f"{' transposed' if layout.transposed else ''})")
    if not layout.bias:
        return gate_up, down, None, None
    return gate_up, down, module.gate_up_proj_bias, module.down_proj_bias


def mtmerge_experts_forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                            top_k_weights: Tensor) -> Tensor:
    """transformers' experts call, run by :func:`mtmerge.ops.moe.moe_experts`.

    Parameters
    ----------
    module : nn.Module
        The experts module (its parameters are used in place, as views).
    hidden_states : Tensor
        ``[T, H]``.
    top_k_index : Tensor
        ``[T, K]`` int64 expert ids; ids ``>= E`` (expert parallelism) count as ``-1``.
    top_k_weights : Tensor
        ``[T, K]`` routing weights, any float dtype.

    Returns
    -------
    Tensor
        ``[T, H]`` in ``hidden_states``' dtype.
    """
    layout = experts_layout(module)
    gate_up, down, gate_up_bias, down_bias = _weights(module, layout, hidden_states.shape[-1])
    ids = top_k_index.masked_fill(top_k_index >= gate_up.shape[0], -1)
    x = hidden_states.to(gate_up.dtype)  # under autocast, activations may not be in the weights' dtype
    out = moe_experts(x, gate_up, down, top_k_weights, ids, activation=layout.activation, gate_up_bias=gate_up_bias,
                      down_bias=down_bias)
    return out.to(hidden_states.dtype)


def register(name: str = NAME) -> None:
    """Register :func:`mtmerge_experts_forward` with transformers' ``ExpertsInterface`` as ``name``
    (idempotent), so ``experts_implementation=name`` selects it.

    Raises
    ------
    ImportError
        transformers is missing or predates ``ExpertsInterface`` (transformers 5.23+).
    """
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        raise ImportError("mtmerge.integrations.transformers needs transformers >= 5.23 "
                          f"(transformers.integrations.moe.ExpertsInterface): {exc}") from exc
    ExpertsInterface.register(name, mtmerge_experts_forward)
