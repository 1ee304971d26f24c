"""The demo's report: the results table (markdown) and the verdict lines under it.

Test accuracy (%) of each task for the base, each individual fine-tune (on every task), the
"individual" reference (each task by its own fine-tune) and each merge; the mean over tasks;
the normalized accuracy (the TIES paper's: accuracy / the task's own fine-tune's accuracy,
averaged over tasks); and the merge time ("merge s": the final ``merge_checkpoints`` call).

The MoE experiment's table (:func:`format_moe_table`): each task's test accuracy for the dense
baseline, the shared MoE and the TaskMoE, their mean, the FLOPs per token of the block and of
the whole model (from the shapes), the block's FLOPs relative to dense, the experts a task's
tokens were routed to, the parameter count and the training time.
"""

from __future__ import annotations

import sys
from typing import TextIO

from mtmerge.demo.data import TASKS, load_data
from mtmerge.demo.experiment import Result
from mtmerge.demo.moe_experiment import MoEResult


def format_table(result: Result) -> str:
    """The results as a markdown table (accuracies in %).

    Returns
    -------
    str
        Header, alignment row and one line per row of ``result``.
    """
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
    """Verdict lines under the table: TIES vs plain averaging, the best merge, timings."""
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


def print_report(result: Result, file: TextIO | None = None) -> None:
    """Print the header, the table and the verdict lines to ``file`` (default stdout)."""
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


def format_moe_table(result: MoEResult) -> str:
    """The MoE experiment's results as a markdown table (accuracies in %, FLOPs per token).

    Returns
    -------
    str
        Header, alignment row and one line per model.
    """
    head = ["model", *result.tasks, "mean", "block FLOPs/token", "vs dense", "model FLOPs/token", "experts/task",
            "params", "train s"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    dense = next((r.block_flops for r in result.rows if r.name == "dense"), None)
    for r in result.rows:
        cells = [r.name, *(f"{100 * r.accuracy[t]:.1f}" for t in result.tasks), f"{100 * r.mean:.1f}",
                 f"{r.block_flops:,}", "" if dense is None else f"{r.block_flops / dense:.2f}x",
                 f"{r.model_flops:,.0f}",
                 "-" if r.experts_per_task is None else f"{r.experts_per_task:.1f}/{result.settings.num_experts}",
                 f"{r.parameters:,}", f"{r.train_seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def moe_summary_lines(result: MoEResult) -> list[str]:
    """Verdict lines under the MoE table: FLOPs saved and accuracy given up, per MoE model, vs dense."""
    names = {r.name for r in result.rows}
    lines = []
    if "dense" in names:
        dense = result.row("dense")
        for r in result.rows:
            if r.name == "dense":
                continue
            lines.append(f"{r.name}: {dense.block_flops / r.block_flops:.1f}x fewer block FLOPs per token than dense "
                         f"({dense.model_flops / r.model_flops:.1f}x for the whole model) at "
                         f"{100 * r.mean:.1f}% vs {100 * dense.mean:.1f}% mean accuracy "
                         f"({100 * (r.mean - dense.mean):+.1f} points).")
    if {"shared MoE", "TaskMoE"} <= names:
        shared, task = result.row("shared MoE"), result.row("TaskMoE")
        lines.append(f"Serving one task, TaskMoE's tokens used {task.experts_per_task:.1f} of "
                     f"{result.settings.num_experts} experts on average (at most experts_per_task="
                     f"{result.settings.experts_per_task}), the shared MoE's {shared.experts_per_task:.1f}.")
    lines.append(f"MoE experiment: {result.steps} steps per model, {result.train_tokens} mixed-task tokens per "
                 f"epoch; total {result.total_seconds:.1f} s.")
    return lines


def print_moe_report(result: MoEResult, file: TextIO | None = None) -> None:
    """Print the MoE experiment's header, table and verdict lines to ``file`` (default stdout)."""
    file = sys.stdout if file is None else file
    s = result.settings
    print(file=file)
    print(f"Multi-task MoE (one model for {len(result.tasks)} tasks, mixed-task batches, trained with mtmerge's MoE "
          f"ops): test accuracy (%) per task; hidden {s.hidden}; dense = SwiGLU block of width {s.dense_ffn}; "
          f"shared MoE = one router, top-{s.top_k} of {s.num_experts} experts of width {s.expert_ffn}; "
          f"TaskMoE = one router per task, {s.experts_per_task} experts per task, top-{s.top_k}. "
          "FLOPs per token from the shapes (2 per multiply-add).", file=file)
    print(file=file)
    print(format_moe_table(result), file=file)
    print(file=file)
    for line in moe_summary_lines(result):
        print(line, file=file)
