"""Real package: peft's LoRA (``peft.LoraConfig``, ``get_peft_model``, ``PeftModel``) and its
mixed-adapter batch (``model(x, adapter_names=[...])``: the base layer once, then a Python loop
over the distinct adapters, each on its sub-batch of sequences).

``import peft`` needs ``accelerate`` (and transformers); install with
``pip install --no-deps peft==0.21.2 accelerate``. :data:`PEFT` is the package, or None with the
reason in :data:`UNAVAILABLE`. The model is :class:`OneLinear`, a custom module around one
``nn.Linear`` named ``proj`` (peft targets it through ``target_modules``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn


def _load() -> tuple[ModuleType | None, str, str]:
    """(peft or None, label, why unavailable)."""
    try:
        import peft
    except Exception as exc:  # any failure: the peer is unavailable, say why
        return None, "", f"import peft failed: {exc!r} (pip install --no-deps peft==0.21.2 accelerate)"
    return peft, f"peft {peft.__version__} (real package, {Path(peft.__file__).parent})", ""


PEFT, LABEL, UNAVAILABLE = _load()
MODULE_NAME = "proj"


class OneLinear(nn.Module):
    """The smallest model peft can wrap: ``proj``, one ``nn.Linear``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def save_random_adapter(linear: nn.Linear, directory: str | Path, *, r: int, alpha: float, use_rslora: bool = False,
                        seed: int = 0, std: float = 0.05) -> Path:
    """Create a LoRA adapter on ``OneLinear(copy of linear)`` with peft, give ``lora_A`` and
    ``lora_B`` random N(0, std^2) values (peft's init makes B zero), ``save_pretrained`` it into
    ``directory`` and return that path."""
    config = PEFT.LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=[MODULE_NAME],
                             lora_dropout=0.0)
    model = PEFT.get_peft_model(OneLinear(copy.deepcopy(linear)), config)
    layer = model.base_model.model.proj
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weights in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            weights.copy_(torch.randn(weights.shape, generator=gen) * std)
    model.save_pretrained(str(directory))
    return Path(directory)


def load_mixed(linear: nn.Linear, directories: Sequence[str | Path], names: Sequence[str]) -> nn.Module:
    """A ``PeftModel`` on ``OneLinear(copy of linear)`` with the saved adapters loaded under
    ``names`` (``PeftModel.from_pretrained`` + ``load_adapter``), in eval mode."""
    model = PEFT.PeftModel.from_pretrained(OneLinear(copy.deepcopy(linear)), str(directories[0]),
                                           adapter_name=names[0])
    for directory, name in zip(directories[1:], names[1:], strict=True):
        model.load_adapter(str(directory), adapter_name=name)
    return model.eval()


def mixed_forward(model: nn.Module, x: Tensor, adapter_names: Sequence[str]) -> Tensor:
    """peft's mixed-adapter batch: ``model(x, adapter_names=...)``, one name per sequence
    (``x.shape[0]``), ``"__base__"`` for none."""
    with torch.no_grad():
        return model(x, adapter_names=list(adapter_names))


def lora_layer(model: nn.Module) -> nn.Module:
    """The peft ``LoraLayer`` that replaced ``proj``."""
    return model.base_model.model.proj
