"""The demo's experiment: merge the fine-tunes with each method through the pipeline, evaluate.

Every merge is one ``mtmerge.merge_checkpoints(config, out_dir)`` call on the saved
checkpoints with a mergekit-style config (written to ``configs/<method>.yaml``), i.e. the
same pipeline a user runs on a real model, with the pipeline's defaults unless stated: TIES
knobs ``flavor: mergekit``, per-tensor trim (``scope: tensor``), ``normalize`` true for the
TIES methods. Methods (:data:`METHODS`):

* ``average``: task arithmetic with weights 1/T and lambda 1 (plain weight averaging of the
  fine-tunes); nothing tuned.
* ``task_arithmetic``, ``ties`` (density 0.2, the TIES paper's k = 20%), ``dare_ties``
  (density 0.2, seed 0, the DARE paper's ``1/density`` rescale and TIES' mean rather than
  mergekit's L1 rescale and sum), ``consensus_ties`` (density 0.2) and
  ``consensus_task_arithmetic`` (TALL masks with the pipeline's defaults, consensus of k = 2
  tasks): weights 1, lambda chosen on the validation split from :data:`LAMBDA_GRID`.

The lambda search costs one merge per method: every method's output is ``base + lambda *
merged`` with ``merged`` independent of lambda, so the merge is run once at lambda 1 and the
validation accuracy is read along that line (ties go to the smaller lambda); the chosen
lambda is then merged for real by the pipeline and that checkpoint is what the table reports.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtmerge.demo.checkpoints import Checkpoints, load_checkpoint, prepare_checkpoints
from mtmerge.demo.data import FULL_SETTINGS, QUICK_SETTINGS, TASKS, Settings, load_data
from mtmerge.demo.models import build_model, evaluate

#: lambda values searched on the validation split.
LAMBDA_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


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
    """The mergekit-style config of ``method`` over the demo's checkpoints.

    Parameters
    ----------
    method : MethodSpec
    ckpts : Checkpoints
    tasks : sequence of str
        The fine-tunes to merge, in order.
    lam : float
        lambda (ignored by ``average``, which uses 1).

    Returns
    -------
    dict
        A config :func:`mtmerge.merge_checkpoints` accepts.
    """
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


def _merge_checkpoints() -> tuple[Callable[..., Any], str]:
    """``mtmerge.merge_checkpoints`` (from ``mtmerge.merging`` if the top level does not
    re-export it) and the name it was found under."""
    import mtmerge

    fn = getattr(mtmerge, "merge_checkpoints", None)
    if fn is not None:
        return fn, "mtmerge.merge_checkpoints"
    from mtmerge.merging import merge_checkpoints

    return merge_checkpoints, "mtmerge.merging.merge_checkpoints"


def run_merge(config: dict[str, Any], out_dir: Path) -> float:
    """Merge with ``mtmerge.merge_checkpoints(config, out_dir)``.

    Returns
    -------
    float
        Wall-clock seconds of the call (reading, merging, writing).
    """
    merge_checkpoints, _ = _merge_checkpoints()
    start = time.perf_counter()
    merge_checkpoints(config, out_dir, overwrite=True, progress=False)
    return time.perf_counter() - start


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


def _write_config(path: Path, config: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))


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
    retrain : bool
        Retrain the checkpoints even if valid ones are cached.
    methods : sequence of str, optional
        Names from :data:`METHODS` (default: all, or :data:`QUICK_METHODS` when ``quick``).
    seed : int
        Seed of the split, the initialization and the training (0 is the documented table);
        other seeds use their own cache directory ``<full|quick>-seed<N>``.
    log : callable
        Receives progress lines.

    Returns
    -------
    Result

    Raises
    ------
    ValueError
        An unknown method name.
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

    _, merged_with = _merge_checkpoints()
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
