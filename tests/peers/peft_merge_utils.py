"""Real package: peft's ``peft/utils/merge_utils.py`` (ties, magnitude_based_pruning, ...).

The file is loaded straight from the installed ``peft`` (it needs only torch; ``import peft``
itself would pull in transformers). Install with ``pip install --no-deps peft==0.21.2`` (the
Makefile does). :data:`MERGE_UTILS` is the loaded module, or None with the reason in
:data:`UNAVAILABLE`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor


def _load() -> tuple[ModuleType | None, str, str]:
    """(module or None, label, why unavailable)."""
    spec = importlib.util.find_spec("peft")
    if spec is None or spec.origin is None:
        return None, "", "peft is not installed: pip install --no-deps peft"
    path = Path(spec.origin).parent / "utils" / "merge_utils.py"
    file_spec = importlib.util.spec_from_file_location("_peers_peft_merge_utils", path)
    if file_spec is None or file_spec.loader is None or not path.is_file():
        return None, "", f"peft is installed but {path} is missing"
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except Exception as exc:  # any failure: the peer is unavailable, say why
        return None, "", f"loading {path} failed: {exc!r}"
    try:
        from importlib.metadata import version

        label = f"peft {version('peft')} ({path})"
    except Exception:  # metadata is only for the label
        label = f"peft ({path})"
    return module, label, ""


MERGE_UTILS, LABEL, UNAVAILABLE = _load()


def ties(task_tensors: Tensor | list[Tensor], weights: Tensor, density: float) -> Tensor:
    """``peft.utils.merge_utils.ties`` (majority sign "total", the default)."""
    return MERGE_UTILS.ties(task_tensors, weights, density)


def magnitude_based_pruning(tensor: Tensor, density: float) -> Tensor:
    return MERGE_UTILS.magnitude_based_pruning(tensor, density)


def ties_merge(base: Tensor, finetuned: list[Tensor], density: float) -> Tensor:
    """A whole merge as a peft user writes it: task vectors, ``ties`` with weights 1, base added back."""
    task_vectors = [f - base for f in finetuned]
    weights = torch.ones(len(finetuned), dtype=base.dtype, device=base.device)
    return base + MERGE_UTILS.ties(task_vectors, weights, density)
