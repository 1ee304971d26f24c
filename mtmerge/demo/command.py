"""``mtmerge demo``'s command line: options, the run, the printed report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from mtmerge.demo.data import QUICK_TASKS
from mtmerge.demo.experiment import METHODS, QUICK_METHODS, run_experiment
from mtmerge.demo.moe_experiment import run_moe_experiment
from mtmerge.demo.report import print_moe_report, print_report

#: The demo's experiments: model merging, and the multi-task MoE (dense vs shared MoE vs TaskMoE).
EXPERIMENTS: tuple[str, ...] = ("merge", "moe")

DESCRIPTION = "``mtmerge demo``: a small, real multi-task merging experiment on a bundled dataset."


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
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS),
                        help="which experiments to run (default: both): merge = the fine-tunes merged by each "
                             "method; moe = a dense, a shared-MoE and a TaskMoE multi-task model trained with "
                             "mtmerge's MoE ops")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")


def _log(line: str) -> None:
    print(line, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args`` (see :func:`add_arguments`) and print the report.

    Runs the experiments of ``args.experiments`` in order (merge, then MoE), printing each
    report as soon as it is ready. The torch thread count is set to ``args.threads`` for the run
    and restored afterwards. With ``--json``, the merge results are the top level and the MoE
    results go under ``"moe"``.

    Returns
    -------
    int
        The exit code: 0, or 2 for a bad ``--threads``.
    """
    if args.threads < 1:
        print("mtmerge demo: --threads must be >= 1", file=sys.stderr)
        return 2
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    result = moe = None
    try:
        if "merge" in args.experiments:
            work_dir = args.work_dir if args.work_dir is not None else default_work_dir()
            result = run_experiment(work_dir, quick=args.quick, retrain=args.retrain, methods=args.methods,
                                    seed=args.seed, log=_log)
            print_report(result)
        if "moe" in args.experiments:
            _log("multi-task MoE: training dense, shared MoE and TaskMoE models")
            moe = run_moe_experiment(quick=args.quick, seed=args.seed, log=_log)
            print_moe_report(moe)
    finally:
        torch.set_num_threads(previous)
    if args.json is not None:
        payload = result.to_json() if result is not None else {}
        if moe is not None:
            payload["moe"] = moe.to_json()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mtmerge.demo``: the same as ``mtmerge demo``.

    Parameters
    ----------
    argv : list of str, optional
        The options (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="mtmerge demo", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
