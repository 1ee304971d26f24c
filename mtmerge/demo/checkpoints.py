"""The demo's checkpoints: Hugging Face-style directories, saved, cached and read back.

Each checkpoint is a directory with ``model.safetensors`` and ``config.json`` under
``<work-dir>/<full|quick>/``: ``base/`` and ``finetuned/<task>/``. They are reused when every
``config.json`` carries the hash of the current training settings and every tensor has the
expected name and shape; otherwise (or with ``--retrain``) all of them are retrained.
Reading goes through the merge pipeline's own reader, :class:`mtmerge.merging.Checkpoint`, so
the demo reads its inputs and the merged outputs (possibly sharded) as ``mtmerge merge`` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtmerge.demo.data import DEMO_VERSION, TASKS, Data, Settings
from mtmerge.demo.models import build_heads, build_model, finetune, pretrain, snapshot
from mtmerge.merging import Checkpoint

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def model_config(settings: Settings, role: str, task: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of a demo checkpoint.

    Parameters
    ----------
    settings : Settings
        The training settings (their hash is the cache key).
    role : {"base", "finetuned"}
    task : str, optional
        The fine-tune's task.

    Returns
    -------
    dict
        JSON-serializable.
    """
    return {
        "architectures": ["MultiTaskMLP"],
        "model_type": "mtmerge-demo-mlp",
        "input_size": 64,
        "hidden_sizes": list(settings.hidden),
        "feature_size": settings.features,
        "activation": "gelu",
        "tasks": {t: TASKS[t].num_classes for t in settings.tasks},
        "torch_dtype": "float32",
        "mtmerge_demo": {"version": DEMO_VERSION, "settings_key": settings.key(), "role": role, "task": task,
                         "settings": dataclasses.asdict(settings)},
    }


def save_checkpoint(directory: Path, state: dict[str, Tensor], config: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each file replaced atomically)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS_NAME)
    tmp_cfg = directory / (CONFIG_NAME + ".tmp")
    tmp_cfg.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_cfg, directory / CONFIG_NAME)


def load_checkpoint(directory: Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint in ``directory``, read by :class:`mtmerge.merging.Checkpoint`.

    Parameters
    ----------
    directory : Path
        ``model.safetensors``, or the shards listed by ``model.safetensors.index.json`` (a
        sharded merge output).

    Returns
    -------
    dict of str to Tensor
        Name -> tensor in its stored shape and dtype (a copy: nothing stays mapped).

    Raises
    ------
    FileNotFoundError
        No safetensors file in ``directory``.
    ValueError
        A file that is not safetensors.
    """
    with Checkpoint(directory, where=str(directory)) as ckpt:
        return {name: ckpt.tensor(name).clone() for name in ckpt.names()}


def checkpoint_ok(directory: Path, settings: Settings, expected: dict[str, torch.Size]) -> bool:
    """Whether ``directory`` holds a checkpoint trained with ``settings`` with the ``expected`` shapes.

    Missing, unreadable or corrupt files count as "no": the caller retrains.
    """
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
        if config.get("mtmerge_demo", {}).get("settings_key") != settings.key():
            return False
        with Checkpoint(directory / WEIGHTS_NAME, where=str(directory)) as ckpt:
            shapes = {name: torch.Size(info.shape) for name, info in ckpt.tensors.items()}
        return shapes == expected
    except (OSError, ValueError, TypeError, AttributeError):
        return False


@dataclass
class Checkpoints:
    """Paths of the base and fine-tuned checkpoints and how they were obtained."""

    root: Path
    base: Path
    finetuned: dict[str, Path]
    trained: bool
    train_seconds: float


def prepare_checkpoints(root: Path, settings: Settings, data: Data, *, retrain: bool = False,
                        log: Callable[[str], None] = print) -> Checkpoints:
    """Train (or reuse from ``root``) the pre-trained and fine-tuned checkpoints.

    Parameters
    ----------
    root : Path
        The cache directory of this run (``base/`` and ``finetuned/<task>/`` go there).
    settings : Settings
    data : Data
    retrain : bool
        Retrain even if valid checkpoints are cached.
    log : callable
        Receives progress lines.

    Returns
    -------
    Checkpoints
    """
    base_dir = root / "base"
    ft_dirs = {t: root / "finetuned" / t for t in settings.tasks}
    expected = {k: v.shape for k, v in build_model(settings).state_dict().items()}
    if not retrain and all(checkpoint_ok(d, settings, expected) for d in [base_dir, *ft_dirs.values()]):
        log(f"checkpoints: reusing {root} (settings {settings.key()})")
        return Checkpoints(root, base_dir, ft_dirs, trained=False, train_seconds=0.0)
    log(f"checkpoints: training into {root} (settings {settings.key()})")
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = build_model(settings)
    pretrain(model, data, settings)
    build_heads(model, data, settings)
    base_state = snapshot(model)
    save_checkpoint(base_dir, base_state, model_config(settings, "base"))
    log(f"  pre-trained the backbone ({sum(v.numel() for k, v in base_state.items() if k.startswith('backbone'))}"
        f" parameters) in {time.perf_counter() - start:.1f} s")
    for task in settings.tasks:
        t0 = time.perf_counter()
        model.load_state_dict(base_state)
        finetune(model, task, data, settings)
        save_checkpoint(ft_dirs[task], snapshot(model), model_config(settings, "finetuned", task))
        log(f"  fine-tuned {task} in {time.perf_counter() - t0:.1f} s")
    return Checkpoints(root, base_dir, ft_dirs, trained=True, train_seconds=time.perf_counter() - start)
