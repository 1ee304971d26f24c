"""Sparse mixture-of-experts feed-forward layers on the MoE ops.

:class:`MoEFeedForward` is a token-choice MoE layer (a shared router, top-k experts per token, as
in Mixtral); :class:`TaskMoE` is M³ViT's task-conditioned layer (one router per task, optionally a
fixed subset of experts per task). Both keep their experts in the layouts of DESIGN.md ("MoE
semantics"): ``gate_up [E, 2F, H]`` (gate rows ``0:F``, up rows ``F:2F``), ``down [E, H, F]``,
and run them with :func:`mtmerge.ops.moe.moe_experts` (forward and backward on the kernels).
Both return a :class:`MoEOutput` that carries the router logits and the two auxiliary losses.

Initialization is deterministic given ``seed`` (or a ``torch.Generator`` passed to
``reset_parameters``): values are drawn on the CPU in float32 and copied to the parameters, so a
seed gives the same layer on every device and dtype.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mtmerge.nn._init import add_expert_parameters, generator_for, positive_int, uniform_
from mtmerge.ops.moe import load_balancing_loss, moe_experts, moe_task_gate, moe_topk_gate, router_z_loss

__all__ = ["MoEFeedForward", "MoEOutput", "TaskMoE", "default_task_experts"]

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "gpt_oss")


class MoEOutput(NamedTuple):
    """What a MoE layer returns.

    Attributes
    ----------
    output : Tensor
        ``[..., H]``, the input's shape and dtype.
    router_logits : Tensor
        ``[T, E]`` float32 (float64 for float64 input), ``T`` = the number of tokens (the input's
        leading dimensions flattened); ``-inf`` where a task may not use an expert.
    load_balancing_loss : Tensor
        0-dim float32: transformers' (Mixtral's) load-balancing loss of this layer's routing.
    router_z_loss : Tensor
        0-dim float32: the mean squared log-sum-exp of the router logits (ST-MoE).
    """

    output: Tensor
    router_logits: Tensor
    load_balancing_loss: Tensor
    router_z_loss: Tensor


def default_task_experts(num_tasks: int, num_experts: int, experts_per_task: int) -> Tensor:
    """The expert mask ``experts_per_task=n`` stands for: task ``t`` uses experts
    ``(t*n + i) % E`` for ``i < n`` (consecutive blocks, wrapping around).

    Returns
    -------
    Tensor
        ``[num_tasks, num_experts]`` bool.
    """
    if not 1 <= experts_per_task <= num_experts:
        raise ValueError(f"experts_per_task must be in [1, num_experts={num_experts}], got {experts_per_task}")
    mask = torch.zeros(num_tasks, num_experts, dtype=torch.bool)
    for task in range(num_tasks):
        for i in range(experts_per_task):
            mask[task, (task * experts_per_task + i) % num_experts] = True
    return mask


class _ExpertBank(nn.Module):
    """The experts shared by both layers: ``gate_up [E, 2F, H]``, ``down [E, H, F]``, optional
    biases ``gate_up_bias [E, 2F]`` and ``down_bias [E, H]``."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *, activation: str, scoring: str,
                 renormalize: bool, bias: bool, seed: int | None, device, dtype) -> None:
        super().__init__()
        self.hidden = positive_int(hidden, "hidden")
        self.ffn = positive_int(ffn, "ffn")
        self.num_experts = positive_int(num_experts, "num_experts")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [0, num_experts={num_experts}], got {top_k!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.top_k = top_k
        self.activation = activation
        self.scoring = scoring
        self.renormalize = bool(renormalize)
        self.seed = seed
        add_expert_parameters(self, num_experts, hidden, ffn, bias, device, dtype)

    def _reset_experts(self, generator: torch.Generator | None) -> None:
        """nn.Linear's default bounds per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        in_bound, ffn_bound = 1.0 / math.sqrt(self.hidden), 1.0 / math.sqrt(self.ffn)
        uniform_(self.gate_up, in_bound, generator)
        uniform_(self.down, ffn_bound, generator)
        uniform_(self.gate_up_bias, in_bound, generator)
        uniform_(self.down_bias, ffn_bound, generator)

    def _flat(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.hidden:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [..., hidden={self.hidden}], got {shape}")
        return x.reshape(-1, self.hidden)

    def _experts(self, x: Tensor, weights: Tensor, ids: Tensor, experts: slice | Tensor | None = None) -> Tensor:
        """Run the experts on flat tokens ``x [T, H]``; ``experts`` restricts the bank to a slice
        (views, no copy) or an index tensor of experts, and ``ids`` then index into that subset."""
        gate_up, down, gate_up_bias, down_bias = self.gate_up, self.down, self.gate_up_bias, self.down_bias
        if isinstance(experts, slice):
            gate_up, down = gate_up[experts], down[experts]
            gate_up_bias = None if gate_up_bias is None else gate_up_bias[experts]
            down_bias = None if down_bias is None else down_bias[experts]
        elif experts is not None:
            gate_up, down = gate_up.index_select(0, experts), down.index_select(0, experts)
            gate_up_bias = None if gate_up_bias is None else gate_up_bias.index_select(0, experts)
            down_bias = None if down_bias is None else down_bias.index_select(0, experts)
        return moe_experts(x, gate_up, down, weights, ids, activation=self.activation, gate_up_bias=gate_up_bias,
                           down_bias=down_bias)

    def _output(self, out: Tensor, shape: torch.Size, logits: Tensor, ids: Tensor) -> MoEOutput:
        lb = load_balancing_loss(logits, ids, self.num_experts, self.top_k)
        return MoEOutput(out.reshape(shape), logits, lb, router_z_loss(logits))

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, ffn={self.ffn}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"activation={self.activation!r}, scoring={self.scoring!r}, renormalize={self.renormalize}, "
                f"bias={self.gate_up_bias is not None}")


class MoEFeedForward(_ExpertBank):
    """Token-choice sparse MoE feed-forward layer (Mixtral-style): a linear router picks the
    ``top_k`` experts of each token; the output is their routing-weighted sum.

    Parameters
    ----------
    hidden : int
        Model width ``H``.
    ffn : int
        Each expert's intermediate width ``F``.
    num_experts : int
        ``E``.
    top_k : int
        Experts per token, ``0 <= top_k <= E``.
    activation : str
        ``"silu"`` (SwiGLU), ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` (each ``act(gate) * up``) or
        ``"gpt_oss"`` (gpt-oss's clamped SwiGLU on interleaved gate/up rows).
    scoring : str
        ``"softmax"`` or ``"sigmoid"`` router scores.
    renormalize : bool
        Divide each token's top-k weights by their sum.
    bias : bool
        Give the experts biases ``gate_up_bias [E, 2F]`` and ``down_bias [E, H]``.
    seed : int or None
        Seed of the initialization (None: torch's global RNG).
    device, dtype
        Where and in which dtype the parameters live.

    Attributes
    ----------
    router : nn.Parameter
        ``[E, H]``: logits are ``x @ router.T`` (an ``nn.Linear(H, E, bias=False)`` weight).
    gate_up : nn.Parameter
        ``[E, 2F, H]``.
    down : nn.Parameter
        ``[E, H, F]``.
    gate_up_bias, down_bias : nn.Parameter or None
        ``[E, 2F]`` and ``[E, H]`` when ``bias=True``.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *, activation: str = "silu",
                 scoring: str = "softmax", renormalize: bool = True, bias: bool = False, seed: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(hidden, ffn, num_experts, top_k, activation=activation, scoring=scoring,
                         renormalize=renormalize, bias=bias, seed=seed, device=device, dtype=dtype)
        self.router = nn.Parameter(torch.empty(num_experts, hidden, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialize every parameter (``generator``, else the layer's ``seed``, else torch's RNG).

        The router as ``nn.Linear(H, E)``: U(-1/sqrt(H), 1/sqrt(H)); the experts likewise per
        projection (fan-in ``H`` for ``gate_up``, ``F`` for ``down``).
        """
        generator = generator_for(self.seed, generator)
        uniform_(self.router, 1.0 / math.sqrt(self.hidden), generator)
        self._reset_experts(generator)

    def forward(self, x: Tensor) -> MoEOutput:
        """Route each token of ``x`` to its ``top_k`` experts.

        Parameters
        ----------
        x : Tensor
            ``[..., H]`` in the parameters' dtype.

        Returns
        -------
        MoEOutput
            ``output [..., H]``, ``router_logits [T, E]`` (T = ``x.numel() // H``) and the losses.
        """
        flat = self._flat(x)
        logits = nn.functional.linear(flat, self.router)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        weights, ids = moe_topk_gate(logits, self.top_k, scoring=self.scoring, renormalize=self.renormalize)
        out = self._experts(flat, weights, ids)
        return self._output(out, x.shape, logits, ids)


class TaskMoE(_ExpertBank):
    """Task-conditioned sparse MoE layer (M³ViT): one router per task, optionally a fixed subset
    of experts per task; tokens of different tasks may share a batch.

    A batch of one task (``task_ids`` an int) computes only that task's router row and experts:
    the kernels receive views (or, for a subset that is not a contiguous block, a gather) of the
    allowed experts' weights only, so the other experts are never read and get zero gradient.

    Parameters
    ----------
    hidden, ffn, num_experts, top_k
        As in :class:`MoEFeedForward`.
    num_tasks : int
        Number of tasks (routers).
    experts_per_task : int or None
        Give task ``t`` the ``n`` experts ``(t*n + i) % E`` (see :func:`default_task_experts`).
    expert_mask : Tensor or None
        ``[num_tasks, E]`` bool: the experts each task may use (exclusive with
        ``experts_per_task``; neither: every task may use every expert). Each task needs at least
        ``top_k`` experts.
    activation, scoring, renormalize, bias, seed, device, dtype
        As in :class:`MoEFeedForward`.

    Attributes
    ----------
    router : nn.Parameter
        ``[num_tasks, E, H]``.
    expert_mask : Tensor or None
        ``[num_tasks, E]`` bool buffer (not saved in the state dict: it is configuration).
    gate_up, down, gate_up_bias, down_bias
        As in :class:`MoEFeedForward`.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, num_tasks: int, *,
                 experts_per_task: int | None = None, expert_mask: Tensor | Sequence[Sequence[bool]] | None = None,
                 activation: str = "silu", scoring: str = "softmax", renormalize: bool = True, bias: bool = False,
                 seed: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(hidden, ffn, num_experts, top_k, activation=activation, scoring=scoring,
                         renormalize=renormalize, bias=bias, seed=seed, device=device, dtype=dtype)
        self.num_tasks = positive_int(num_tasks, "num_tasks")
        mask = self._mask(experts_per_task, expert_mask)
        # per task: None (every expert), a slice (a contiguous block) or the sorted expert indices
        self._subsets: list[slice | list[int] | None] = [self._subset(mask, t) for t in range(num_tasks)]
        if mask is not None and device is not None:
            mask = mask.to(device)
        self.register_buffer("expert_mask", mask, persistent=False)
        self.router = nn.Parameter(torch.empty(num_tasks, num_experts, hidden, device=device, dtype=dtype))
        self.reset_parameters()

    def _mask(self, experts_per_task: int | None, expert_mask) -> Tensor | None:
        if experts_per_task is not None and expert_mask is not None:
            raise ValueError("give experts_per_task or expert_mask, not both")
        if experts_per_task is not None:
            mask = default_task_experts(self.num_tasks, self.num_experts, positive_int(experts_per_task,
                                                                                         "experts_per_task"))
        elif expert_mask is not None:
            mask = torch.as_tensor(expert_mask).detach().cpu()
            if mask.dtype != torch.bool or tuple(mask.shape) != (self.num_tasks, self.num_experts):
                raise ValueError(f"expert_mask must be bool [num_tasks={self.num_tasks}, num_experts="
                                 f"{self.num_experts}], got {mask.dtype} {tuple(mask.shape)}")
        else:
            return None
        allowed = mask.sum(dim=1)
        if bool((allowed < max(self.top_k, 1)).any()):
            task = int(torch.nonzero(allowed < max(self.top_k, 1))[0, 0])
            raise ValueError(f"expert_mask: task {task} may use {int(allowed[task])} experts, fewer than "
                             f"top_k={self.top_k} (and at least one)")
        return mask.clone()

    def _subset(self, mask: Tensor | None, task: int) -> slice | list[int] | None:
        if mask is None or bool(mask[task].all()):
            return None
        experts = torch.nonzero(mask[task]).flatten().tolist()
        if experts[-1] - experts[0] + 1 == len(experts):
            return slice(experts[0], experts[-1] + 1)
        return experts

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialize every parameter (``generator``, else the layer's ``seed``, else torch's RNG);
        each task's router as ``nn.Linear(H, E)``, the experts as in :class:`MoEFeedForward`."""
        generator = generator_for(self.seed, generator)
        uniform_(self.router, 1.0 / math.sqrt(self.hidden), generator)
        self._reset_experts(generator)

    def task_experts(self, task: int) -> list[int]:
        """The experts ``task`` may use, ascending."""
        subset = self._subsets[self._task_index(task)]
        if subset is None:
            return list(range(self.num_experts))
        return list(range(subset.start, subset.stop)) if isinstance(subset, slice) else list(subset)

    def _task_index(self, task: int) -> int:
        try:
            index = None if isinstance(task, bool) else operator.index(task)
        except TypeError:
            index = None
        if index is None or not 0 <= index < self.num_tasks:
            raise ValueError(f"task_ids must be a task in [0, num_tasks={self.num_tasks}), got {task!r}")
        return index

    def forward(self, x: Tensor, task_ids: int | Tensor) -> MoEOutput:
        """Route each token of ``x`` with its task's router, among its task's experts.

        Parameters
        ----------
        x : Tensor
            ``[..., H]`` in the parameters' dtype.
        task_ids : int or Tensor
            One task for the whole batch (an int, or a 0-dim tensor), or one per token: int32/int64
            of shape ``x.shape[:-1]`` (or ``[T]``), values in ``[0, num_tasks)``.

        Returns
        -------
        MoEOutput
            ``output [..., H]``, ``router_logits [T, E]`` (``-inf`` at experts a token's task may
            not use) and the losses (over all ``E`` experts).
        """
        flat = self._flat(x)
        if isinstance(task_ids, Tensor) and task_ids.dim() == 0:
            task_ids = int(task_ids.item())
        if not isinstance(task_ids, Tensor):
            return self._one_task(flat, x.shape, self._task_index(task_ids))
        if task_ids.numel() != flat.shape[0] or (task_ids.dim() > 1 and task_ids.shape != x.shape[:-1]):
            raise ValueError(f"task_ids must be an int or have one entry per token, shape {tuple(x.shape[:-1])}, "
                             f"got {tuple(task_ids.shape)}")
        weights, ids, logits = moe_task_gate(flat, self.router, task_ids.reshape(-1), self.top_k,
                                             expert_mask=self.expert_mask, scoring=self.scoring,
                                             renormalize=self.renormalize)
        return self._output(self._experts(flat, weights, ids), x.shape, logits, ids)

    def _one_task(self, flat: Tensor, shape: torch.Size, task: int) -> MoEOutput:
        """A batch of one task: only its router row and its experts reach the kernels."""
        subset = self._subsets[task]
        tokens = flat.shape[0]
        zeros = torch.zeros(tokens, dtype=torch.int32, device=flat.device)
        if subset is None:
            weights, ids, logits = moe_task_gate(flat, self.router[task:task + 1], zeros, self.top_k,
                                                 scoring=self.scoring, renormalize=self.renormalize)
            return self._output(self._experts(flat, weights, ids), shape, logits, ids)
        if isinstance(subset, slice):
            experts: slice | Tensor = subset
            index = torch.arange(subset.start, subset.stop, device=flat.device)
            router = self.router[task:task + 1, subset]
        else:
            experts = index = torch.tensor(subset, dtype=torch.int64, device=flat.device)
            router = self.router[task:task + 1].index_select(1, index)
        weights, local_ids, local_logits = moe_task_gate(flat, router, zeros, self.top_k, scoring=self.scoring,
                                                         renormalize=self.renormalize)
        out = self._experts(flat, weights, local_ids, experts)
        ids = index[local_ids.long()].to(local_ids.dtype)
        logits = local_logits.new_full((tokens, self.num_experts), -math.inf).index_copy(1, index, local_logits)
        return self._output(out, shape, logits, ids)

    def extra_repr(self) -> str:
        masked = self.expert_mask is not None
        return f"{super().extra_repr()}, num_tasks={self.num_tasks}, expert_mask={masked}"
