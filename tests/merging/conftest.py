"""Tiny safetensors models for the checkpoint-pipeline tests."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]

#: float tensors of a tiny "transformer" (embed and lm_head get chunked with small chunk_bytes)
SHAPES: dict[str, tuple[int, ...]] = {
    "lm_head.weight": (50, 16),
    "model.embed_tokens.weight": (50, 16),
    "model.layers.0.mlp.up_proj.weight": (32, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.1.mlp.up_proj.weight": (32, 16),
    "model.layers.1.self_attn.q_proj.weight": (16, 16),
    "model.norm.weight": (7,),
}
INT_TENSOR = "model.rotary.position_ids"


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], shards: int = 1, aux: bool = True) -> Path:
    """A Hugging Face style directory: model.safetensors, or shards + index; config/tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        weight_map = {}
        groups = [names[i::shards] for i in range(shards)]
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n].contiguous() for n in group}, str(path / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, fname))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if aux:
        (path / "config.json").write_text(json.dumps({"model_type": "tiny", "torch_dtype": "bfloat16"}))
        (path / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
        (path / "tokenizer_config.json").write_text("{}")
        (path / "generation_config.json").write_text("{}")
    return path


def make_family(root: Path, num_models: int = 3, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                coarse: bool = False, shapes: dict | None = None, int_tensor: bool = True,
                base_shards: int = 1) -> tuple[Path, list[Path], dict, list[dict]]:
    """A base and ``num_models`` fine-tunes (base + noise). ``coarse`` deltas repeat (many
    ties at any threshold)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = SHAPES if shapes is None else shapes
    base = {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}
    if int_tensor:
        base[INT_TENSOR] = torch.arange(20).reshape(1, 20)
    models = []
    for _ in range(num_models):
        m = {}
        for n, t in base.items():
            if not t.is_floating_point():
                m[n] = t.clone()
                continue
            noise = torch.randn(t.shape, generator=gen)
            noise = (noise * 4).round() / 64 if coarse else noise * 0.05
            m[n] = (t.float() + noise).to(dtype)
        models.append(m)
    base_dir = save_checkpoint(root / "base", base, shards=base_shards)
    dirs = [save_checkpoint(root / f"ft{i}", m) for i, m in enumerate(models)]
    return base_dir, dirs, base, models


def config(method: str, base: Path, models: list[Path], weights=None, densities=None, **params) -> dict:
    weights = weights or [1.0 + 0.5 * i for i in range(len(models))]
    densities = densities or [0.2 + 0.2 * i for i in range(len(models))]
    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(m), "parameters": {"weight": w, "density": d}}
                      for m, w, d in zip(models, weights, densities, strict=True)]}
    if params:
        cfg["parameters"] = params
    return cfg


def python_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable


@pytest.fixture
def family(tmp_path):
    return make_family(tmp_path)
