"""Multi-task LoRA layer on :func:`mtmerge.ops.lowrank.multi_lora`.

:class:`MultiLoRALinear`: an existing ``nn.Linear`` plus a task-agnostic LoRA adapter and one
adapter per task (MTLoRA), each token routed to its task's adapter in one batch;
:meth:`MultiLoRALinear.from_peft` loads several PEFT LoRA adapters saved on disk into one such
layer, whose outputs equal PEFT's mixed-adapter batch.

Initialization is deterministic given ``seed`` (values drawn on the CPU in float32, as in
:mod:`mtmerge.nn.lowrank`).
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
from torch import Tensor, nn

from mtmerge.nn._init import generator_for, positive_int, uniform_
from mtmerge.ops.lowrank import multi_lora

__all__ = ["MultiLoRALinear"]

_PEFT_PREFIX = "base_model.model."


def _lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


class MultiLoRALinear(nn.Module):
    """An ``nn.Linear`` with a task-agnostic LoRA adapter plus one adapter per task (MTLoRA),
    every token going through its own task's adapter in one batch.

    ``y = linear(x) + s_shared B_shared A_shared x' + s_t B_t A_t x'`` where ``t`` is the token's
    task, ``x' = dropout(x)`` and ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Task ``-1``
    adds no task adapter (PEFT's ``"__base__"``). The two adapters are two chained
    :func:`~mtmerge.ops.lowrank.multi_lora` calls: the shared adapter (one adapter, every token)
    on top of the base output, then the task adapters on top of that; no weight is copied or
    stacked, and each call keeps its low-rank intermediate in fp32.

    Parameters
    ----------
    linear : nn.Linear
        The base layer (held, not copied). Its weight's device and dtype are the adapters'.
    num_tasks : int
        Number of task adapters ``L``.
    r : int
        Rank of each task adapter.
    alpha : float or None
        LoRA alpha of the task adapters (default ``r``: scale 1).
    use_rslora : bool
        Scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA) instead of ``alpha / r``.
    shared_adapter : bool
        Add the task-agnostic adapter (MTLoRA's TA-LoRA) that every token goes through.
    shared_r, shared_alpha : int, float or None
        Rank and alpha of the shared adapter (default ``r`` and ``alpha``).
    dropout : float
        Dropout on the adapters' input (PEFT's ``lora_dropout``); the base layer sees ``x``.
    freeze_base : bool
        Set ``requires_grad=False`` on the base layer's parameters (LoRA fine-tuning).
    seed : int or None
        Seed of the initialization (None: torch's global RNG).

    Attributes
    ----------
    base_layer : nn.Linear
        ``linear``.
    lora_A : nn.Parameter
        ``[L, r, in]``: PEFT's init, U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)).
    lora_B : nn.Parameter
        ``[L, out, r]``, zeros at initialization (a new layer equals its base layer).
    scaling : Tensor
        ``[L]`` float32 buffer, each task adapter's scale.
    shared_A, shared_B : nn.Parameter or None
        ``[1, shared_r, in]`` and ``[1, out, shared_r]`` (None without ``shared_adapter``).
    shared_scaling : Tensor or None
        ``[1]`` float32 buffer.
    ranks : list of int
        Each task adapter's own rank (:meth:`from_peft` pads smaller ranks to ``r`` with zero
        rows of ``A`` and zero columns of ``B``, which change no output and get zero gradients).
    task_names : list of str or None
        The adapters' names (:meth:`from_peft`), for :meth:`task_ids_for`.
    """

    def __init__(self, linear: nn.Linear, num_tasks: int, r: int, *, alpha: float | None = None,
                 use_rslora: bool = False, shared_adapter: bool = True, shared_r: int | None = None,
                 shared_alpha: float | None = None, dropout: float = 0.0, freeze_base: bool = True,
                 seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self.base_layer = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.num_tasks = positive_int(num_tasks, "num_tasks")
        self.r = positive_int(r, "r")
        self.use_rslora = bool(use_rslora)
        self.alpha = float(r if alpha is None else alpha)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.seed = seed
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(num_tasks, r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_tasks, self.out_features, r, **factory))
        scale = _lora_scaling(self.alpha, r, self.use_rslora)
        self.register_buffer("scaling", torch.full((num_tasks,), scale, dtype=torch.float32,
                                                   device=linear.weight.device))
        self.ranks = [r] * num_tasks
        self.task_names: list[str] | None = None
        if shared_adapter:
            self.shared_r = positive_int(r if shared_r is None else shared_r, "shared_r")
            self.shared_alpha = float(self.alpha if shared_alpha is None else shared_alpha)
            self.shared_A = nn.Parameter(torch.empty(1, self.shared_r, self.in_features, **factory))
            self.shared_B = nn.Parameter(torch.empty(1, self.out_features, self.shared_r, **factory))
            shared_scale = _lora_scaling(self.shared_alpha, self.shared_r, self.use_rslora)
            self.register_buffer("shared_scaling", torch.full((1,), shared_scale, dtype=torch.float32,
                                                              device=linear.weight.device))
        else:
            self.shared_r, self.shared_alpha = 0, 0.0
            self.register_parameter("shared_A", None)
            self.register_parameter("shared_B", None)
            self.register_buffer("shared_scaling", None)
        if freeze_base:
            for p in linear.parameters():
                p.requires_grad_(False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialize the adapters as PEFT does (``generator``, else ``seed``, else torch's
        RNG): ``A`` ~ U(-1/sqrt(in), 1/sqrt(in)), ``B = 0``. The base layer is left alone."""
        generator = generator_for(self.seed, generator)
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        for A, B in ((self.lora_A, self.lora_B), (self.shared_A, self.shared_B)):
            uniform_(A, bound, generator)
            if B is not None:
                with torch.no_grad():
                    B.zero_()

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ``.half()`` ...: the scales move with the layer but stay float32
        (a cast to the parameters' dtype would round them)."""
        kept = {name: getattr(self, name) for name in ("scaling", "shared_scaling") if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, value in kept.items():
            setattr(self, name, value.to(device=getattr(self, name).device, dtype=torch.float32))
        return self

    # ---- forward ----

    def _task_ids(self, task_ids: int | Tensor, lead: tuple[int, ...]) -> int | Tensor:
        """An int in ``[-1, L)``, or an index tensor of shape ``lead`` or ``[T]``."""
        if isinstance(task_ids, Tensor) and task_ids.dim() == 0:
            task_ids = int(task_ids.item())
        if not isinstance(task_ids, Tensor):
            try:
                task = None if isinstance(task_ids, bool) else operator.index(task_ids)
            except TypeError:
                task = None
            if task is None or not -1 <= task < self.num_tasks:
                raise ValueError(f"task_ids must be an int in [-1, num_tasks={self.num_tasks}) or a tensor, "
                                 f"got {task_ids!r}")
            return task
        if len(lead) > 1 and tuple(task_ids.shape) == lead[:1]:  # one task per sequence
            task_ids = task_ids.reshape(lead[:1] + (1,) * (len(lead) - 1)).expand(lead)
        if task_ids.numel() != math.prod(lead) or (task_ids.dim() > 1 and tuple(task_ids.shape) != lead):
            raise ValueError(f"task_ids must be an int, one per sequence {lead[:1]} or one per token {lead}, got "
                             f"shape {tuple(task_ids.shape)}")
        return task_ids

    def forward(self, x: Tensor, task_ids: int | Tensor) -> Tensor:
        """The base layer plus the shared adapter plus each token's task adapter.

        Parameters
        ----------
        x : Tensor
            ``[..., in]`` in the parameters' dtype.
        task_ids : int or Tensor
            One task for the whole batch (an int or a 0-dim tensor), one per sequence (shape
            ``x.shape[:1]`` for ``x`` of 3 or more dimensions) or one per token (``x.shape[:-1]``
            or ``[T]``); int32/int64 in ``[-1, L)``, ``-1`` for no task adapter (a tensor out of
            range raises :func:`~mtmerge.ops.lowrank.multi_lora`'s ``ValueError`` about
            ``adapter_ids``).

        Returns
        -------
        Tensor
            ``[..., out]``, ``x``'s dtype.
        """
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [..., in={self.in_features}], got {shape}")
        lead = tuple(x.shape[:-1])
        ids = self._task_ids(task_ids, lead)
        y = self.base_layer(x)
        xa = self.lora_dropout(x)
        if self.shared_A is not None:
            zeros = torch.zeros(lead, dtype=torch.int32, device=x.device)
            y = multi_lora(xa, self.shared_A, self.shared_B, zeros, scale=self.shared_scaling, base=y)
        if isinstance(ids, int):  # one task: only its adapter reaches the kernel
            if ids < 0:
                return y
            zeros = torch.zeros(lead, dtype=torch.int32, device=x.device)
            return multi_lora(xa, self.lora_A[ids:ids + 1], self.lora_B[ids:ids + 1], zeros,
                              scale=self.scaling[ids:ids + 1], base=y)
        return multi_lora(xa, self.lora_A, self.lora_B, ids.to(x.device), scale=self.scaling, base=y)

    def task_ids_for(self, names: Sequence[str], device: torch.device | str | None = None) -> Tensor:
        """PEFT-style ``adapter_names`` (one per sequence) as task ids: ``int64 [len(names)]``,
        ``"__base__"`` -> ``-1``; needs :attr:`task_names` (set by :meth:`from_peft`)."""
        if self.task_names is None:
            raise ValueError("this layer has no task_names (from_peft sets them)")
        index = {name: i for i, name in enumerate(self.task_names)}
        index.setdefault("__base__", -1)
        try:
            ids = [index[n] for n in names]
        except KeyError as exc:
            raise ValueError(f"unknown adapter name {exc.args[0]!r}; known: {self.task_names}") from None
        return torch.tensor(ids, dtype=torch.int64, device=device or self.lora_A.device)

    def delta_weight(self, task: int) -> Tensor:
        """``[out, in]`` fp32: what task ``task``'s adapter (plus the shared one) adds to the
        base weight, ``s_t B_t A_t (+ s B_shared A_shared)``."""
        delta = self.scaling[task] * (self.lora_B[task].float() @ self.lora_A[task].float())
        if self.shared_A is not None:
            delta = delta + self.shared_scaling[0] * (self.shared_B[0].float() @ self.shared_A[0].float())
        return delta

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_tasks={self.num_tasks}, "
                f"r={self.r}, alpha={self.alpha:g}, use_rslora={self.use_rslora}, shared_r={self.shared_r}")

    # ---- PEFT adapters ----

    @classmethod
    def from_peft(cls, linear: nn.Linear, adapter_dirs: Sequence[str | PathLike], *, module_name: str | None = None,
                  names: Sequence[str] | None = None, freeze_base: bool = True) -> MultiLoRALinear:
        """Load several PEFT LoRA adapters saved on disk into one layer: task ``i`` is adapter
        ``adapter_dirs[i]``, and ``layer(x, task_ids)`` equals PEFT's mixed-adapter batch
        ``model(x, adapter_names=[...])`` (``"__base__"`` = task ``-1``).

        Parameters
        ----------
        linear : nn.Linear
            The base layer the adapters were trained on (the adapters are cast to its weight's
            device and dtype).
        adapter_dirs : sequence of path
            Directories written by PEFT's ``save_pretrained``: ``adapter_config.json`` and
            ``adapter_model.safetensors`` (or ``adapter_model.bin``).
        module_name : str or None
            The module path of ``linear`` in the PEFT model (``"model.layers.0.self_attn.q_proj"``,
            or any dotted suffix of it such as ``"q_proj"`` when that is unique). None: the
            adapter must hold exactly one LoRA module.
        names : sequence of str or None
            The adapters' names (default: each directory's name), kept in :attr:`task_names`.
        freeze_base : bool
            As in the constructor.

        Returns
        -------
        MultiLoRALinear
            No shared adapter; ``r`` = the largest rank (smaller ones zero-padded), per-task
            ``scaling`` from each config's ``lora_alpha`` (or ``alpha_pattern``), ``r`` (or
            ``rank_pattern``) and ``use_rslora``.

        Raises
        ------
        ValueError
            A missing file, a non-LoRA or DoRA adapter, a LoRA bias, an adapter that changes the
            base layer itself (``bias`` or ``modules_to_save``), shapes that do not fit ``linear``,
            or a ``module_name`` that matches no module or several.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        dirs = [Path(d) for d in adapter_dirs]
        if not dirs:
            raise ValueError("adapter_dirs is empty")
        if names is None:
            names = [d.name for d in dirs]
        names = list(names)
        if len(names) != len(dirs) or len(set(names)) != len(names):
            raise ValueError(f"names must be {len(dirs)} distinct names, got {names}")
        adapters = [_read_peft_adapter(d, module_name, linear) for d in dirs]
        rank = max(a[0].shape[0] for a in adapters)
        layer = cls(linear, len(dirs), rank, shared_adapter=False, freeze_base=freeze_base)
        with torch.no_grad():
            layer.lora_A.zero_()
            layer.lora_B.zero_()
            for i, (A, B, scale) in enumerate(adapters):
                r = A.shape[0]
                layer.lora_A[i, :r].copy_(A)
                layer.lora_B[i, :, :r].copy_(B)
                layer.scaling[i] = scale
        layer.ranks = [a[0].shape[0] for a in adapters]
        layer.task_names = names
        return layer


def _peft_pattern_key(patterns: Sequence[str], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``(.*\\.)?(p)$`` matching ``module``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _read_peft_adapter(directory: Path, module_name: str | None, linear: nn.Linear) -> tuple[Tensor, Tensor, float]:
    """``(A [r, in], B [out, r], scale)`` of one saved PEFT LoRA adapter for ``linear``."""
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory}: no adapter_config.json (not a PEFT adapter directory)")
    config = json.loads(config_path.read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{directory}: peft_type is {config.get('peft_type')!r}, not LORA")
    if config.get("use_dora"):
        raise ValueError(f"{directory}: DoRA adapters (use_dora) are not supported")
    if config.get("lora_bias"):
        raise ValueError(f"{directory}: adapters with a LoRA bias (lora_bias) are not supported")
    weights_path = directory / "adapter_model.safetensors"
    if weights_path.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights_path))
    elif (directory / "adapter_model.bin").is_file():
        state = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{directory}: no adapter_model.safetensors or adapter_model.bin")

    suffix = ".lora_A.weight"
    modules = sorted(k[:-len(suffix)] for k in state if k.endswith(suffix))
    if module_name is None:
        if len(modules) != 1:
            raise ValueError(f"{directory}: the adapter has {len(modules)} LoRA modules ({modules[:8]}); "
                             "pass module_name")
        matches = modules
    else:
        matches = [m for m in modules if m == module_name or m.endswith("." + module_name)]
        if len(matches) != 1:
            raise ValueError(f"{directory}: module_name={module_name!r} matches {len(matches)} of the adapter's "
                             f"LoRA modules {modules[:8]}: it must match exactly one")
    key = matches[0]
    module = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
    if f"{key}.lora_B.bias" in state or f"{key}.lora_magnitude_vector" in state:
        raise ValueError(f"{directory}: {module} has a LoRA bias or a DoRA magnitude: not supported")
    if any(k.startswith(f"{key}.") and ".lora_" not in k for k in state) or f"{key}.bias" in state:
        raise ValueError(f"{directory}: the adapter changes {module}'s base layer itself (bias or "
                         "modules_to_save): not supported")
    A, B = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
    r = A.shape[0]
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != linear.in_features or tuple(B.shape) != (linear.out_features, r):
        raise ValueError(f"{directory}: {module}'s lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit "
                         f"nn.Linear({linear.in_features}, {linear.out_features})")
    rank_key = _peft_pattern_key(list(config.get("rank_pattern") or {}), module)
    config_r = int(config["rank_pattern"][rank_key] if rank_key is not None else config.get("r", r))
    if config_r != r:
        raise ValueError(f"{directory}: {module}'s lora_A has rank {r} but the config says r = {config_r}")
    alpha_key = _peft_pattern_key(list(config.get("alpha_pattern") or {}), module)
    alpha = float(config["alpha_pattern"][alpha_key] if alpha_key is not None else config.get("lora_alpha", 8))
    scale = _lora_scaling(alpha, r, bool(config.get("use_rslora", False)))
    factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    return A.to(**factory), B.to(**factory), scale
