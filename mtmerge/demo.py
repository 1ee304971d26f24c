"""``mtmerge demo``: a small, real multi-task merging experiment on a bundled dataset.

Nothing is downloaded: the data is scikit-learn's bundled ``load_digits`` (1797 greyscale
8x8 images of the digits 0-9). The experiment follows the task-arithmetic and TIES papers
in miniature: one pre-trained backbone, one full fine-tune per task with that task's
classification head frozen, the fine-tunes merged into one backbone, and every model
evaluated on every task with each task's own (frozen) head.

Design choices
--------------
Data split
    One fixed permutation (``seed``) of the 1797 images: 500 for pre-training (labels
    unused), 700 to build the heads and fine-tune, 250 validation (only to choose each merge
    method's lambda) and the remaining 347 for test (every number in the table).
Tasks
    Six tasks, each a different "view" of the same images, so that the tasks want
    different things from the shared backbone (the papers' eight vision datasets, in
    miniature): ``digits`` (0-9, upright), ``rot90`` (0-9, rotated 90 degrees), ``mirror``
    (0-9, flipped left-right), ``negative`` (0-9, intensities inverted), ``parity``
    (even/odd, upside down) and ``mod3`` (digit mod 3, transposed). ``--quick`` uses four of
    them (``digits``, ``rot90``, ``negative``, ``parity``).
Backbone and pre-training
    An MLP 64 -> 512 -> 512 -> 256 (GELU after every layer; 427k parameters, all merged)
    pre-trained as a denoising autoencoder (Gaussian noise 0.2, a linear decoder that is
    then discarded) on the unlabelled pre-training images in every task's view: a generic,
    self-supervised "foundation" backbone that has seen all the input distributions but no
    labels.
Heads
    Frozen and shared by the base, the fine-tune and every merge, as the papers' zero-shot
    CLIP heads are: a nearest-class-mean ("prototype") head per task built from the base
    backbone's features of 5 training images per class (``W_c = 5 * normalize(mu_c - mu)``,
    ``b_c = -W_c . mu``). The base model's accuracy is this few-shot head on the
    pre-trained features. Every checkpoint (base, fine-tunes) stores the backbone and all
    six heads; the heads are identical in all of them, so their task vectors are zero and
    every merge method leaves them exactly as they are: a merged ``model.safetensors`` is a
    complete multi-task model.
Fine-tuning
    The whole backbone, head frozen, cross-entropy, SGD with momentum 0.9, lr 0.01, batch
    32, 10 epochs (220 steps). SGD, not the papers' AdamW, is a deliberate deviation that
    favours trimming: in a prototype trial (one seed, Adam lr 1e-4) Adam's sign-like updates
    gave task vectors whose top-20% magnitudes carry less of the vector, and TIES came out
    level with plain averaging (80.3% vs 80.4% mean) while task arithmetic reached 83.2%.
Checkpoints and caching
    Hugging Face-style directories (``model.safetensors`` + ``config.json``) under
    ``<work-dir>/<full|quick>/``: ``base/``, ``finetuned/<task>/``, and the merges in
    ``merged/<method>/`` (with the exact merge config beside them in ``configs/``). The
    pre-trained and fine-tuned checkpoints are reused when every ``config.json`` carries the
    hash of the current training settings and every tensor has the expected name and shape;
    otherwise (or with ``--retrain``) all of them are retrained. Default work dir:
    ``$MTMERGE_DEMO_DIR``, else ``$XDG_CACHE_HOME/mtmerge/demo``, else ``~/.cache/mtmerge/demo``.
Merging
    Every merge is one ``mtmerge.merge_checkpoints(config, out_dir)`` call on the saved
    checkpoints with a mergekit-style config (``configs/<method>.yaml``), i.e. the same
    pipeline a user runs on a real model (``examples/demo_ties.yaml`` is the TIES one), with
    the pipeline's defaults unless stated: TIES knobs ``flavor: mergekit``, per-tensor trim
    (``scope: tensor``), ``normalize`` true for the TIES methods (mean of the agreeing
    entries). The merged checkpoint is then loaded and evaluated. Methods:

    * ``average``: task arithmetic with weights 1/T and lambda 1 (plain weight averaging of
      the fine-tunes); nothing tuned.
    * ``task_arithmetic``, ``ties`` (density 0.2, the TIES paper's k = 20%), ``dare_ties``
      (density 0.2, seed 0, the DARE paper's ``1/density`` rescale and TIES' mean rather
      than mergekit's L1 rescale and sum), ``consensus_ties`` (density 0.2) and
      ``consensus_task_arithmetic`` (TALL masks with the pipeline's defaults, consensus of
      k = 2 tasks): weights 1, lambda chosen on the validation split from the grid
      ``LAMBDA_GRID`` (0.1 to 2.0), as the papers tune it on held-out data.

    The lambda search costs one merge per method: the output of every method is
    ``base + lambda * merged`` with ``merged`` independent of lambda, so the merge is run
    once at lambda 1 and the validation accuracy is read along that line (ties go to the
    smaller lambda); the chosen lambda
    is then merged for real by the pipeline and that checkpoint is what the table reports.
    "merge s" is the wall-clock time of that final ``merge_checkpoints`` call (reading the
    checkpoints, merging, writing the output).
Table
    Test accuracy (%) of each task for the base, each individual fine-tune (on every task),
    the "individual" reference (each task by its own fine-tune) and each merge; the mean
    over tasks; the normalized accuracy (the TIES paper's: accuracy / the task's own
    fine-tune's accuracy, averaged over tasks); and the merge time. ``--json PATH`` writes
    the same numbers as JSON.
Determinism
    Fixed seeds for the split, the initialization, the noise and every shuffle (``--seed``,
    default 0; other seeds are cached in ``<full|quick>-seed<N>``), and a fixed thread count
    (``--threads``, default 1): the same table on every run with the same torch build and
    thread count (1 and 2 threads gave the same table here). The merges are bit-identical
    across thread counts (mtmerge's ops are deterministic). One thread is also the fastest
    here: the matrices are small, and on this shared 2-core machine 2 threads ran 5x slower.

Results (this machine, torch 2.13 CPU, 1 thread)
------------------------------------------------
About 20 s cold (12 s training, dominated by the 8 s pre-training), 5 s with cached
checkpoints; each merge takes 0.02-0.07 s. Seed 0 (the default table): base 77.3% mean,
individual fine-tunes 96.0%, averaging 81.3%, task arithmetic 82.3%, TIES 82.5%, DARE-TIES
82.6%, Consensus-TIES 81.3%, Consensus-TA 80.9%. Over seeds 0-9 TIES beat plain averaging
every time, by 1.2 to 5.9 points of mean accuracy (3.5 on average; seed 0 is the smallest
margin), and beat tuned task arithmetic in 8 of 10 seeds (by 0.8 points on average, -0.5 to
+2.2): the TIES paper's ordering, with small margins at this scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

#: Bumped whenever training changes in a way the settings do not capture (invalidates caches).
DEMO_VERSION = 1

#: lambda values searched on the validation split.
LAMBDA_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


# ---------------------------------------------------------------------------------------------
# Tasks and data
# ---------------------------------------------------------------------------------------------

#: Image transforms (8x8 images, batch first).
VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "upright": lambda x: x,
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "mirror": lambda x: x[:, :, ::-1],
    "negative": lambda x: 1.0 - x,
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "transpose": lambda x: np.transpose(x, (0, 2, 1)),
}

#: Label functions of the digit 0-9.
LABELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "digit": lambda y: y,
    "parity": lambda y: y % 2,
    "mod3": lambda y: y % 3,
}


@dataclass(frozen=True)
class TaskSpec:
    """One task: a view of the images and a label function."""

    name: str
    view: str
    labels: str
    num_classes: int
    description: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("digits", "upright", "digit", 10, "digit 0-9, upright"),
        TaskSpec("rot90", "rot90", "digit", 10, "digit 0-9, rotated 90 degrees"),
        TaskSpec("mirror", "mirror", "digit", 10, "digit 0-9, mirrored left-right"),
        TaskSpec("negative", "negative", "digit", 10, "digit 0-9, intensities inverted"),
        TaskSpec("parity", "rot180", "parity", 2, "even or odd, upside down"),
        TaskSpec("mod3", "transpose", "mod3", 3, "digit mod 3, transposed"),
    )
}
QUICK_TASKS: tuple[str, ...] = ("digits", "rot90", "negative", "parity")


@dataclass(frozen=True)
class Settings:
    """Everything that determines the trained checkpoints (hashed into the cache key)."""

    tasks: tuple[str, ...] = tuple(TASKS)
    seed: int = 0
    hidden: tuple[int, ...] = (512, 512)
    features: int = 256
    n_pretrain: int = 500
    n_train: int = 700
    n_val: int = 250
    pretrain_epochs: int = 20
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    pretrain_noise: float = 0.2
    shots: int = 5
    head_scale: float = 5.0
    finetune_epochs: int = 10
    finetune_batch: int = 32
    finetune_lr: float = 1e-2
    finetune_momentum: float = 0.9

    def key(self) -> str:
        """A short hash of these settings and :data:`DEMO_VERSION`."""
        blob = json.dumps({"version": DEMO_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


FULL_SETTINGS = Settings()
QUICK_SETTINGS = Settings(tasks=QUICK_TASKS, pretrain_epochs=10, finetune_epochs=6)


@dataclass
class Data:
    """The digits images in [0, 1] and the index sets of the split."""

    images: np.ndarray  # [N, 8, 8] float32
    digits: np.ndarray  # [N] int64
    pretrain: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def task(self, name: str, split: str) -> tuple[Tensor, Tensor]:
        """``(inputs [n, 64] float32, labels [n] int64)`` of task ``name`` on ``split``."""
        spec = TASKS[name]
        idx = getattr(self, split)
        x = np.ascontiguousarray(VIEWS[spec.view](self.images[idx]), dtype=np.float32).reshape(len(idx), 64)
        y = LABELS[spec.labels](self.digits[idx]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)


def load_data(settings: Settings) -> Data:
    """Load scikit-learn's bundled digits and split them with ``settings.seed``.

    Raises
    ------
    RuntimeError
        If scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("mtmerge demo needs scikit-learn (its bundled digits): pip install scikit-learn") from exc
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    perm = np.random.default_rng(settings.seed).permutation(len(images))
    a = settings.n_pretrain
    b = a + settings.n_train
    c = b + settings.n_val
    if c >= len(images):
        raise ValueError(f"split sizes {a}+{settings.n_train}+{settings.n_val} leave no test images")
    return Data(images, bunch.target.astype(np.int64), perm[:a], perm[a:b], perm[b:c], perm[c:])


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class MultiTaskMLP(nn.Module):
    """A shared MLP backbone and one linear head per task.

    State dict keys: ``backbone.{0,2,4}.{weight,bias}`` and ``heads.<task>.{weight,bias}``.
    """

    def __init__(self, tasks: Sequence[str], hidden: Sequence[int] = (512, 512), features: int = 256) -> None:
        super().__init__()
        sizes = [64, *hidden, features]
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.GELU()]
        self.backbone = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({t: nn.Linear(features, TASKS[t].num_classes) for t in tasks})

    def forward(self, x: Tensor, task: str) -> Tensor:
        """Logits of ``task`` for inputs ``x`` ``[n, 64]``."""
        return self.heads[task](self.backbone(x))


def build_model(settings: Settings) -> MultiTaskMLP:
    """An untrained model for ``settings`` (initialized from the global torch RNG)."""
    return MultiTaskMLP(settings.tasks, settings.hidden, settings.features)


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _run_epochs(params: list[Tensor], loss_fn: Callable[[Tensor], Tensor], n: int, epochs: int, batch: int,
                optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    for p in params:
        p.requires_grad_(True)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(order[start:start + batch]).backward()
            optimizer.step()


def pretrain(model: MultiTaskMLP, data: Data, settings: Settings) -> None:
    """Denoising-autoencoder pre-training of ``model.backbone`` on every task's view (no labels)."""
    views = sorted({TASKS[t].view for t in settings.tasks})
    x = torch.cat([torch.from_numpy(np.ascontiguousarray(VIEWS[v](data.images[data.pretrain])).reshape(-1, 64))
                   for v in views])
    gen = torch.Generator().manual_seed(settings.seed * 1000 + 1)
    decoder = nn.Linear(settings.features, 64)
    params = [*model.backbone.parameters(), *decoder.parameters()]
    opt = torch.optim.Adam(params, lr=settings.pretrain_lr)

    def loss_fn(batch: Tensor) -> Tensor:
        clean = x[batch]
        noisy = clean + settings.pretrain_noise * torch.randn(clean.shape, generator=gen)
        return F.mse_loss(decoder(model.backbone(noisy)), clean)

    _run_epochs(params, loss_fn, len(x), settings.pretrain_epochs, settings.pretrain_batch, opt, gen)


@torch.no_grad()
def build_heads(model: MultiTaskMLP, data: Data, settings: Settings) -> None:
    """Few-shot prototype heads on the (pre-trained) backbone's features, frozen afterwards."""
    for task in settings.tasks:
        x, y = data.task(task, "train")
        head = model.heads[task]
        shots = torch.cat([torch.nonzero(y == c)[: settings.shots, 0] for c in range(head.out_features)])
        feats, labels = model.backbone(x[shots]), y[shots]
        center = feats.mean(0)
        means = torch.stack([feats[labels == c].mean(0) for c in range(head.out_features)])
        weight = F.normalize(means - center, dim=1) * settings.head_scale
        head.weight.copy_(weight)
        head.bias.copy_(-(weight @ center))
    for p in model.heads.parameters():
        p.requires_grad_(False)


def finetune(model: MultiTaskMLP, task: str, data: Data, settings: Settings) -> None:
    """Fine-tune the whole backbone on ``task`` with its head frozen."""
    x, y = data.task(task, "train")
    gen = torch.Generator().manual_seed(settings.seed * 1000 + 2 + settings.tasks.index(task))
    params = list(model.backbone.parameters())
    opt = torch.optim.SGD(params, lr=settings.finetune_lr, momentum=settings.finetune_momentum)
    _run_epochs(params, lambda b: F.cross_entropy(model(x[b], task), y[b]), len(x), settings.finetune_epochs,
                settings.finetune_batch, opt, gen)


@torch.no_grad()
def evaluate(model: MultiTaskMLP, state: dict[str, Tensor], data: Data, tasks: Sequence[str],
             split: str = "test") -> dict[str, float]:
    """Accuracy of the weights ``state`` on each task (with the task's head from ``state``)."""
    model.load_state_dict(state, strict=True)
    accs = {}
    for task in tasks:
        x, y = data.task(task, split)
        accs[task] = float((model(x, task).argmax(1) == y).double().mean())
    return accs


# ---------------------------------------------------------------------------------------------
# Checkpoints (Hugging Face-style directories) and the cache
# ---------------------------------------------------------------------------------------------


def model_config(settings: Settings, role: str, task: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of a demo checkpoint."""
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
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (files replaced atomically)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")
    tmp_cfg = directory / "config.json.tmp"
    tmp_cfg.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_cfg, directory / "config.json")


def load_checkpoint(directory: Path) -> dict[str, Tensor]:
    """All tensors of ``directory/model.safetensors`` (or of its shards, if the merge sharded it)."""
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    shards = sorted(directory.glob("model-*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no model.safetensors in {directory}")
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    return state


@dataclass
class Checkpoints:
    """Paths of the base and fine-tuned checkpoints and how they were obtained."""

    root: Path
    base: Path
    finetuned: dict[str, Path]
    trained: bool
    train_seconds: float


def _checkpoint_ok(directory: Path, settings: Settings, expected: dict[str, torch.Size]) -> bool:
    try:
        config = json.loads((directory / "config.json").read_text())
        if config.get("mtmerge_demo", {}).get("settings_key") != settings.key():
            return False
        from safetensors import safe_open

        with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
            shapes = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
        return shapes == expected
    except Exception:  # missing, unreadable or corrupt (safetensors raises its own error types): retrain
        return False


def prepare_checkpoints(root: Path, settings: Settings, data: Data, *, retrain: bool = False,
                        log: Callable[[str], None] = print) -> Checkpoints:
    """Train (or reuse from ``root``) the pre-trained and fine-tuned checkpoints."""
    base_dir = root / "base"
    ft_dirs = {t: root / "finetuned" / t for t in settings.tasks}
    expected = {k: v.shape for k, v in build_model(settings).state_dict().items()}
    if not retrain and all(_checkpoint_ok(d, settings, expected) for d in [base_dir, *ft_dirs.values()]):
        log(f"checkpoints: reusing {root} (settings {settings.key()})")
        return Checkpoints(root, base_dir, ft_dirs, trained=False, train_seconds=0.0)
    log(f"checkpoints: training into {root} (settings {settings.key()})")
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = build_model(settings)
    pretrain(model, data, settings)
    build_heads(model, data, settings)
    base_state = _snapshot(model)
    save_checkpoint(base_dir, base_state, model_config(settings, "base"))
    log(f"  pre-trained the backbone ({sum(v.numel() for k, v in base_state.items() if k.startswith('backbone'))}"
        f" parameters) in {time.perf_counter() - start:.1f} s")
    for task in settings.tasks:
        t0 = time.perf_counter()
        model.load_state_dict(base_state)
        finetune(model, task, data, settings)
        save_checkpoint(ft_dirs[task], _snapshot(model), model_config(settings, "finetuned", task))
        log(f"  fine-tuned {task} in {time.perf_counter() - t0:.1f} s")
    return Checkpoints(root, base_dir, ft_dirs, trained=True, train_seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Merge methods and the pipeline call
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A row of the table: a mergekit-style merge method and its parameters."""

    name: str
    merge_method: str
    density: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    tune_lambda: bool = True
    average: bool = False  # weights 1/T and lambda 1 (plain averaging)


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("average", "task_arithmetic", tune_lambda=False, average=True),
        MethodSpec("task_arithmetic", "task_arithmetic"),
        MethodSpec("ties", "ties", density=0.2),
        # The DARE paper's DARE-then-TIES: 1/density rescale, TIES' mean of the agreeing values
        # (mergekit's dare_ties defaults are the L1 rescale and a plain sum).
        MethodSpec("dare_ties", "dare_ties", density=0.2, parameters={"seed": 0, "rescale": "inverse",
                                                                      "normalize": True}),
        MethodSpec("consensus_ties", "consensus_ties", density=0.2),
        MethodSpec("consensus_task_arithmetic", "consensus_task_arithmetic"),
    )
}
QUICK_METHODS: tuple[str, ...] = ("average", "task_arithmetic", "ties")


def merge_config(method: MethodSpec, ckpts: Checkpoints, tasks: Sequence[str], lam: float) -> dict[str, Any]:
    """The mergekit-style config of ``method`` over the demo's checkpoints."""
    weight = 1.0 / len(tasks) if method.average else 1.0
    models = []
    for task in tasks:
        params: dict[str, Any] = {"weight": weight}
        if method.density is not None:
            params["density"] = method.density
        models.append({"model": str(ckpts.finetuned[task]), "parameters": params})
    return {
        "merge_method": method.merge_method,
        "base_model": str(ckpts.base),
        "models": models,
        "parameters": {"lambda": 1.0 if method.average else float(lam), **method.parameters},
        "dtype": "float32",
    }


def _merge_checkpoints() -> Callable[..., Any]:
    """``mtmerge.merge_checkpoints`` (from ``mtmerge.merging`` if the top level does not re-export it yet)."""
    import mtmerge

    fn = getattr(mtmerge, "merge_checkpoints", None)
    if fn is None:
        from mtmerge.merging import merge_checkpoints as fn
    return fn


def run_merge(config: dict[str, Any], out_dir: Path) -> float:
    """Merge with ``mtmerge.merge_checkpoints(config, out_dir)``; returns the wall-clock seconds."""
    merge_checkpoints = _merge_checkpoints()
    start = time.perf_counter()
    merge_checkpoints(config, out_dir, overwrite=True, progress=False)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One row of the results table."""

    name: str
    kind: str  # "base" | "finetuned" | "individual" | "merge"
    accuracy: dict[str, float]
    mean: float
    normalized: float
    lam: float | None = None
    merge_seconds: float | None = None
    val_mean: float | None = None  # mean validation accuracy of the reported (final) merge
    val_search: float | None = None  # the same, as predicted by the lambda search (base + lam * (m_1 - base))
    config: dict[str, Any] | None = None


@dataclass
class Result:
    """Everything :func:`run_experiment` measured."""

    tasks: tuple[str, ...]
    rows: list[Row]
    settings: Settings
    work_dir: Path
    trained: bool
    train_seconds: float
    total_seconds: float
    merged_with: str
    threads: int

    def row(self, name: str) -> Row:
        """The row called ``name``."""
        return next(r for r in self.rows if r.name == name)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict of the results."""
        return {
            "tasks": {t: TASKS[t].description for t in self.tasks},
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "settings": dataclasses.asdict(self.settings),
            "settings_key": self.settings.key(),
            "work_dir": str(self.work_dir),
            "trained": self.trained,
            "train_seconds": self.train_seconds,
            "total_seconds": self.total_seconds,
            "merged_with": self.merged_with,
            "threads": self.threads,
            "lambda_grid": list(LAMBDA_GRID),
        }


def _row(name: str, kind: str, acc: dict[str, float], individual: dict[str, float], **extra: Any) -> Row:
    mean = sum(acc.values()) / len(acc)
    normalized = sum(acc[t] / individual[t] for t in acc) / len(acc)
    return Row(name, kind, acc, mean, normalized, **extra)


def _interpolate(base: dict[str, Tensor], merged: dict[str, Tensor], lam: float) -> dict[str, Tensor]:
    return {k: base[k] + lam * (merged[k] - base[k]) for k in base}


def run_experiment(work_dir: Path, *, quick: bool = False, retrain: bool = False,
                   methods: Sequence[str] | None = None, seed: int = 0,
                   log: Callable[[str], None] = print) -> Result:
    """Train or reuse the checkpoints, merge them with every method, evaluate everything.

    Parameters
    ----------
    work_dir : Path
        Cache root; this run uses ``work_dir / ("quick" if quick else "full")``.
    quick : bool
        Four tasks, shorter training, three methods (for tests).
    seed : int
        Seed of the split, the initialization and the training (0 is the documented table);
        other seeds use their own cache directory ``<full|quick>-seed<N>``.
    retrain : bool
        Retrain the checkpoints even if valid ones are cached.
    methods : sequence of str, optional
        Names from :data:`METHODS` (default: all, or :data:`QUICK_METHODS` when ``quick``).
    log : callable
        Receives progress lines.

    Returns
    -------
    Result
    """
    start = time.perf_counter()
    settings = dataclasses.replace(QUICK_SETTINGS if quick else FULL_SETTINGS, seed=seed)
    methods = tuple(methods) if methods is not None else (QUICK_METHODS if quick else tuple(METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {tuple(METHODS)}")
    root = Path(work_dir).expanduser() / (("quick" if quick else "full") + (f"-seed{seed}" if seed else ""))
    tasks = settings.tasks
    data = load_data(settings)
    ckpts = prepare_checkpoints(root, settings, data, retrain=retrain, log=log)

    model = build_model(settings)
    base = load_checkpoint(ckpts.base)
    finetuned = {t: load_checkpoint(ckpts.finetuned[t]) for t in tasks}
    ft_acc = {t: evaluate(model, finetuned[t], data, tasks) for t in tasks}
    individual = {t: ft_acc[t][t] for t in tasks}
    rows = [_row("pre-trained", "base", evaluate(model, base, data, tasks), individual)]
    rows += [_row(f"fine-tuned on {t}", "finetuned", ft_acc[t], individual) for t in tasks]
    rows.append(_row("individual (own fine-tune)", "individual", individual, individual))

    import mtmerge

    merged_with = "mtmerge.merge_checkpoints" if hasattr(mtmerge, "merge_checkpoints") else (
        "mtmerge.merging.merge_checkpoints")
    log(f"merging with {merged_with}")
    config_dir = root / "configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    (root / "merged").mkdir(parents=True, exist_ok=True)
    for name in methods:
        spec = METHODS[name]
        out_dir = root / "merged" / name
        val_search = None
        lam = 1.0
        if spec.tune_lambda:
            tune_dir = root / "merged" / f"{name}.lambda1"
            run_merge(merge_config(spec, ckpts, tasks, 1.0), tune_dir)
            unit = load_checkpoint(tune_dir)
            shutil.rmtree(tune_dir, ignore_errors=True)
            best = None
            for candidate in LAMBDA_GRID:
                acc = evaluate(model, _interpolate(base, unit, candidate), data, tasks, "val")
                score = sum(acc.values()) / len(acc)
                if best is None or score > best[0] + 1e-12:
                    best = (score, candidate)
            val_search, lam = best
        config = merge_config(spec, ckpts, tasks, lam)
        _write_config(config_dir / f"{name}.yaml", config)
        seconds = run_merge(config, out_dir)
        merged = load_checkpoint(out_dir)
        val = evaluate(model, merged, data, tasks, "val")
        acc = evaluate(model, merged, data, tasks)
        rows.append(_row(name, "merge", acc, individual, lam=config["parameters"]["lambda"], merge_seconds=seconds,
                         val_mean=sum(val.values()) / len(val), val_search=val_search, config=config))
        log(f"  {name}: lambda {config['parameters']['lambda']:g}, mean accuracy {100 * rows[-1].mean:.1f}%, "
            f"merge {seconds:.3f} s")
    return Result(tasks, rows, settings, root, ckpts.trained, ckpts.train_seconds, time.perf_counter() - start,
                  merged_with, torch.get_num_threads())


def _write_config(path: Path, config: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def format_table(result: Result) -> str:
    """The results as a markdown table (accuracies in %)."""
    head = ["model", "lambda", *result.tasks, "mean", "normalized", "merge s"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for r in result.rows:
        cells = [r.name, "" if r.lam is None else f"{r.lam:g}"]
        cells += [f"{100 * r.accuracy[t]:.1f}" for t in result.tasks]
        cells += [f"{100 * r.mean:.1f}", f"{100 * r.normalized:.1f}",
                  "" if r.merge_seconds is None else f"{r.merge_seconds:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(result: Result) -> list[str]:
    """Verdict lines under the table (TIES vs plain averaging, timings)."""
    lines = []
    names = {r.name for r in result.rows}
    if {"ties", "average"} <= names:
        ties, avg = result.row("ties"), result.row("average")
        diff = 100 * (ties.mean - avg.mean)
        verdict = "beats" if diff > 0 else ("matches" if diff == 0 else "does NOT beat")
        lines.append(f"TIES {verdict} plain averaging: mean accuracy {100 * ties.mean:.1f}% vs {100 * avg.mean:.1f}% "
                     f"({diff:+.1f} points), normalized {100 * ties.normalized:.1f}% vs {100 * avg.normalized:.1f}%.")
    merges = [r for r in result.rows if r.kind == "merge"]
    if merges:
        best = max(merges, key=lambda r: r.mean)
        lines.append(f"Best merge: {best.name} ({100 * best.mean:.1f}% mean, {100 * best.normalized:.1f}% normalized).")
    trained = f"trained in {result.train_seconds:.1f} s" if result.trained else "reused from the cache"
    lines.append(f"Checkpoints {trained}; total {result.total_seconds:.1f} s with {result.threads} thread(s); "
                 f"merged with {result.merged_with}; work dir {result.work_dir}.")
    return lines


def print_report(result: Result, file: Any = None) -> None:
    """Print the header, the table and the verdict lines."""
    file = sys.stdout if file is None else file
    n_test = len(load_data(result.settings).test)
    print(file=file)
    print(f"Test accuracy (%) on {n_test} held-out images of sklearn's digits, {len(result.tasks)} tasks: "
          + "; ".join(f"{t} = {TASKS[t].description}" for t in result.tasks), file=file)
    print("lambda: chosen on the validation split (average: weights 1/T, lambda 1); "
          "normalized = accuracy / the task's own fine-tune, averaged.", file=file)
    print(file=file)
    print(format_table(result), file=file)
    print(file=file)
    for line in summary_lines(result):
        print(line, file=file)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def default_work_dir() -> Path:
    """``$MTMERGE_DEMO_DIR``, else ``$XDG_CACHE_HOME/mtmerge/demo``, else ``~/.cache/mtmerge/demo``."""
    if os.environ.get("MTMERGE_DEMO_DIR"):
        return Path(os.environ["MTMERGE_DEMO_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "mtmerge" / "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``mtmerge demo`` options to ``parser``."""
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where checkpoints, merge configs and merges go (default: $MTMERGE_DEMO_DIR or "
                             "~/.cache/mtmerge/demo); trained checkpoints are reused from here")
    parser.add_argument("--retrain", action="store_true", help="retrain the checkpoints even if cached ones are valid")
    parser.add_argument("--quick", action="store_true",
                        help=f"{len(QUICK_TASKS)} tasks, shorter training, methods {', '.join(QUICK_METHODS)}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads (default 1; the table is reproducible for a fixed count)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, initialization and training (default 0)")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=None,
                        help="merge methods to run (default: all, or the quick set with --quick)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args``; prints the table; returns the exit code."""
    if args.threads < 1:
        print("mtmerge demo: --threads must be >= 1", file=sys.stderr)
        return 2
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        work_dir = args.work_dir if args.work_dir is not None else default_work_dir()
        result = run_experiment(work_dir, quick=args.quick, retrain=args.retrain, methods=args.methods,
                                seed=args.seed, log=lambda line: print(line, flush=True))
    finally:
        torch.set_num_threads(previous)
    print_report(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mtmerge.demo``: the same as ``mtmerge demo``."""
    parser = argparse.ArgumentParser(prog="mtmerge demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

__all__ = [
    "LAMBDA_GRID",
    "METHODS",
    "TASKS",
    "MultiTaskMLP",
    "Result",
    "Settings",
    "add_arguments",
    "main",
    "run",
    "run_experiment",
]
