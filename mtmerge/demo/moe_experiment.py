"""The demo's multi-task MoE experiment: dense vs shared MoE vs task-routed MoE (M³ViT in miniature).

The same bundled digits tasks as the merge experiment (:mod:`mtmerge.demo.data`), but one
model is trained on all tasks at once, its tokens (one image in one task's view, tagged with the
task's id) of every task mixed in each batch. Three models share everything but the block in
the middle, so the comparison is the block:

* ``dense``: a SwiGLU feed-forward block of width ``num_experts * expert_ffn`` (the same
  parameter count as the experts of the MoE models), plain torch.
* ``shared MoE``: :class:`mtmerge.nn.MoEFeedForward`, one router for every task, top-``k`` of
  ``num_experts`` experts of width ``expert_ffn``.
* ``TaskMoE``: :class:`mtmerge.nn.TaskMoE`, one router per task (M³ViT's task-conditioned
  sparse pathway), each task restricted to ``experts_per_task`` of the experts.

Architecture (every model): ``h = gelu(W_in x)`` (64 -> ``hidden``), ``h = h + block(h)``,
``logits = head_task(h)`` (one linear head per task). The MoE blocks run on mtmerge's ops,
forward and backward (``moe_topk_gate`` / ``moe_task_gate``, ``moe_experts`` and its backward
op, ``load_balancing_loss`` and ``router_z_loss`` as auxiliary losses with coefficients
``aux_coef`` and ``z_coef``).

Training: from scratch, cross-entropy averaged over the mixed batch (plus the auxiliary
losses), Adam, fixed seeds, the merge experiment's ``train`` split of every task; accuracy on
its ``test`` split, one task per batch (as a task is served at inference).

FLOPs per token are computed from the shapes (2 per multiply-add of every matmul; activations,
softmax and top-k not counted): the block's (dense: ``2 * 3 * hidden * width``; MoE: the
router ``2 * hidden * num_experts`` plus ``top_k`` experts of ``2 * 3 * hidden * expert_ffn``)
and the whole model's (+ the input layer ``2 * 64 * hidden`` and the task's head
``2 * hidden * classes``, averaged over the tasks). A token of one task served alone (a batch
of that task) costs ``TaskMoE`` only its task's ``experts_per_task`` router rows: ``TaskMoE``
then passes only those rows and experts to the kernels. "experts/task" is measured: the number of
distinct experts the test tokens of a task are routed to (averaged over tasks), i.e. the expert
weights a model serving only that task must hold.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from mtmerge.demo.data import FULL_SETTINGS, QUICK_SETTINGS, TASKS, Data, load_data

#: The models of the experiment, in table order.
MOE_MODELS: tuple[str, ...] = ("dense", "shared MoE", "TaskMoE")
INPUT_SIZE = 64


@dataclass(frozen=True)
class MoESettings:
    """Sizes and training of the MoE experiment (the same for every model)."""

    hidden: int = 64
    num_experts: int = 8
    expert_ffn: int = 64
    top_k: int = 2
    experts_per_task: int = 4
    epochs: int = 12
    batch: int = 128
    lr: float = 3e-3
    aux_coef: float = 1e-2
    z_coef: float = 1e-3

    @property
    def dense_ffn(self) -> int:
        """The dense block's width: as many parameters as the MoE's experts together."""
        return self.num_experts * self.expert_ffn


FULL_MOE_SETTINGS = MoESettings()
QUICK_MOE_SETTINGS = MoESettings(epochs=6)


def router_rows(model: str, s: MoESettings) -> int:
    """How many router rows (experts scored) a token of one task costs: ``num_experts``, or for
    ``TaskMoE`` serving one task, that task's ``experts_per_task`` (only its rows reach the kernel)."""
    return s.experts_per_task if model == "TaskMoE" else s.num_experts


def block_flops(model: str, s: MoESettings) -> int:
    """Matmul FLOPs per token of ``model``'s middle block (2 per multiply-add).

    Parameters
    ----------
    model : str
        One of :data:`MOE_MODELS`.
    s : MoESettings

    Returns
    -------
    int
        Dense: ``6 * hidden * dense_ffn`` (gate, up and down projections); MoE: the router
        ``2 * hidden * router_rows`` (see :func:`router_rows`) plus ``top_k * 6 * hidden * expert_ffn``.

    Raises
    ------
    ValueError
        An unknown model.
    """
    if model == "dense":
        return 6 * s.hidden * s.dense_ffn
    if model in ("shared MoE", "TaskMoE"):
        return 2 * s.hidden * router_rows(model, s) + s.top_k * 6 * s.hidden * s.expert_ffn
    raise ValueError(f"model must be one of {MOE_MODELS}, got {model!r}")


def model_flops(model: str, s: MoESettings, tasks: Sequence[str]) -> float:
    """Matmul FLOPs per token of the whole model: input layer, block, the task's head (mean over ``tasks``)."""
    heads = sum(2 * s.hidden * TASKS[t].num_classes for t in tasks) / len(tasks)
    return 2 * INPUT_SIZE * s.hidden + block_flops(model, s) + heads


class DenseFFN(nn.Module):
    """A SwiGLU feed-forward block ``down(silu(gate(h)) * up(h))``, plain torch."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        """``[T, hidden] -> [T, hidden]``."""
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


@dataclass
class BlockOutput:
    """What a block returns: its output, the auxiliary loss and the routing (``None`` for dense)."""

    output: Tensor
    aux_loss: Tensor | None
    router_logits: Tensor | None


class MultiTaskNet(nn.Module):
    """``h = gelu(W_in x)``, ``h = h + block(h)``, ``logits = head_task(h)``.

    Parameters
    ----------
    kind : str
        One of :data:`MOE_MODELS`.
    tasks : sequence of str
        Keys of :data:`~mtmerge.demo.data.TASKS`; task id ``i`` is ``tasks[i]``.
    settings : MoESettings
    """

    def __init__(self, kind: str, tasks: Sequence[str], settings: MoESettings) -> None:
        super().__init__()
        from mtmerge.nn import MoEFeedForward, TaskMoE

        s = settings
        self.kind = kind
        self.settings = settings
        self.tasks = tuple(tasks)
        self.stem = nn.Linear(INPUT_SIZE, s.hidden)
        if kind == "dense":
            self.block: nn.Module = DenseFFN(s.hidden, s.dense_ffn)
        elif kind == "shared MoE":
            self.block = MoEFeedForward(s.hidden, s.expert_ffn, s.num_experts, s.top_k)
        elif kind == "TaskMoE":
            self.block = TaskMoE(s.hidden, s.expert_ffn, s.num_experts, s.top_k, len(self.tasks),
                                 experts_per_task=s.experts_per_task)
        else:
            raise ValueError(f"kind must be one of {MOE_MODELS}, got {kind!r}")
        self.heads = nn.ModuleList(nn.Linear(s.hidden, TASKS[t].num_classes) for t in self.tasks)

    def features(self, x: Tensor, task_ids: Tensor | int) -> BlockOutput:
        """The features before the heads, ``[T, hidden]``, with the block's auxiliary loss and router logits.

        ``task_ids``: one task id per token, or an int for a batch of one task (then ``TaskMoE``
        computes only that task's router and experts).
        """
        h = F.gelu(self.stem(x))
        if self.kind == "dense":
            return BlockOutput(h + self.block(h), None, None)
        out = self.block(h, task_ids) if self.kind == "TaskMoE" else self.block(h)
        aux = self.settings.aux_coef * out.load_balancing_loss + self.settings.z_coef * out.router_z_loss
        return BlockOutput(h + out.output, aux, out.router_logits)

    def loss(self, x: Tensor, y: Tensor, task_ids: Tensor) -> Tensor:
        """Cross-entropy of a mixed batch (mean over its tokens) plus the auxiliary losses."""
        out = self.features(x, task_ids)
        total = out.output.new_zeros(())
        for i, head in enumerate(self.heads):
            rows = torch.nonzero(task_ids == i)[:, 0]
            if rows.numel():
                total = total + F.cross_entropy(head(out.output[rows]), y[rows], reduction="sum")
        total = total / len(x)
        return total if out.aux_loss is None else total + out.aux_loss

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, task: int) -> tuple[float, int]:
        """Accuracy on one task's batch and the number of distinct experts its tokens were routed to."""
        out = self.features(x, task)
        acc = float((self.heads[task](out.output).argmax(1) == y).double().mean())
        if out.router_logits is None:
            return acc, 0
        from mtmerge import moe_topk_gate

        ids = moe_topk_gate(out.router_logits.float(), self.settings.top_k).ids
        return acc, int(torch.unique(ids).numel())


@dataclass
class MoERow:
    """One row of the MoE table."""

    name: str
    accuracy: dict[str, float]
    mean: float
    block_flops: int
    model_flops: float
    experts_per_task: float | None
    parameters: int
    train_seconds: float


@dataclass
class MoEResult:
    """Everything :func:`run_moe_experiment` measured."""

    tasks: tuple[str, ...]
    rows: list[MoERow]
    settings: MoESettings
    steps: int
    train_tokens: int
    total_seconds: float

    def row(self, name: str) -> MoERow:
        """The row called ``name``."""
        return next(r for r in self.rows if r.name == name)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict of the results."""
        return {"tasks": list(self.tasks), "rows": [dataclasses.asdict(r) for r in self.rows],
                "settings": dataclasses.asdict(self.settings), "steps": self.steps,
                "train_tokens": self.train_tokens, "total_seconds": self.total_seconds}


def _mixed(data: Data, tasks: Sequence[str], split: str) -> tuple[Tensor, Tensor, Tensor]:
    xs, ys, ids = [], [], []
    for i, task in enumerate(tasks):
        x, y = data.task(task, split)
        xs.append(x)
        ys.append(y)
        ids.append(torch.full((len(x),), i, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys), torch.cat(ids)


def train_model(kind: str, data: Data, tasks: Sequence[str], settings: MoESettings, seed: int) -> tuple[
        MultiTaskNet, int]:
    """Train one model of the experiment from scratch on the mixed tasks.

    Parameters
    ----------
    kind : str
        One of :data:`MOE_MODELS`.
    data : Data
    tasks : sequence of str
    settings : MoESettings
    seed : int
        Seeds the initialization and the shuffles (the same for every model).

    Returns
    -------
    tuple
        ``(model, steps)``.
    """
    torch.manual_seed(seed)
    model = MultiTaskNet(kind, tasks, settings)
    x, y, task_ids = _mixed(data, tasks, "train")
    gen = torch.Generator().manual_seed(seed * 1000 + 7)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    steps = 0
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), settings.batch):
            rows = order[start:start + settings.batch]
            opt.zero_grad(set_to_none=True)
            model.loss(x[rows], y[rows], task_ids[rows]).backward()
            opt.step()
            steps += 1
    model.eval()
    return model, steps


def run_moe_experiment(*, quick: bool = False, seed: int = 0, settings: MoESettings | None = None,
                       models: Sequence[str] = MOE_MODELS, log: Callable[[str], None] = print) -> MoEResult:
    """Train the dense, shared-MoE and TaskMoE models on the mixed tasks and evaluate each task.

    Parameters
    ----------
    quick : bool
        The merge experiment's quick tasks and :data:`QUICK_MOE_SETTINGS` (for tests).
    seed : int
        Seed of the split (the merge experiment's), the initialization and the shuffles.
    settings : MoESettings, optional
        Overrides the sizes and training (default :data:`FULL_MOE_SETTINGS` or the quick ones).
    models : sequence of str
        Which of :data:`MOE_MODELS` to train (default all).
    log : callable
        Receives progress lines.

    Returns
    -------
    MoEResult

    Raises
    ------
    ValueError
        An unknown model name.
    """
    start = time.perf_counter()
    unknown = [m for m in models if m not in MOE_MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {MOE_MODELS}")
    split = dataclasses.replace(QUICK_SETTINGS if quick else FULL_SETTINGS, seed=seed)
    s = settings if settings is not None else (QUICK_MOE_SETTINGS if quick else FULL_MOE_SETTINGS)
    tasks = split.tasks
    data = load_data(split)
    rows = []
    steps = 0
    for kind in models:
        t0 = time.perf_counter()
        model, steps = train_model(kind, data, tasks, s, seed)
        seconds = time.perf_counter() - t0
        accs, used = {}, []
        for i, task in enumerate(tasks):
            x, y = data.task(task, "test")
            accs[task], n_experts = model.evaluate(x, y, i)
            used.append(n_experts)
        rows.append(MoERow(kind, accs, sum(accs.values()) / len(accs), block_flops(kind, s),
                           model_flops(kind, s, tasks), None if kind == "dense" else sum(used) / len(used),
                           sum(p.numel() for p in model.parameters()), seconds))
        log(f"  moe: {kind} trained in {seconds:.1f} s ({steps} steps), mean accuracy {100 * rows[-1].mean:.1f}%")
    return MoEResult(tuple(tasks), rows, s, steps, len(tasks) * len(data.train), time.perf_counter() - start)
