"""The benchmarks' GPU mode, shared: time CUDA work with ``triton.testing.do_bench`` (medians
of CUDA-event timings after warm-up, caches flushed), print a markdown table and optionally
write the figures as JSON (``scripts/gpu_check.py`` collects them into its report).

Each benchmark's ``--gpu`` flag runs its GPU mode at small-to-moderate sizes: the Triton path
(``torch.ops.mtmerge.*`` on CUDA tensors) beside the memory floor and the peers on the same
device, reported as ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def add_repo_root_to_path() -> None:
    """So ``tests.peers`` imports when a benchmark runs as ``python benchmarks/x.py``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def require_gpu(device: str = "cuda") -> str:
    """The device's name; exits with a message when ``device`` is "cuda" and there is none.
    ``device="cpu"`` runs the GPU mode's code on CPU tensors (a smoke test of the script, timed
    with a plain timer; the figures mean nothing)."""
    if device == "cpu":
        return "cpu (smoke run of the GPU mode: not GPU figures)"
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (torch.cuda.is_available() is False)")
    return torch.cuda.get_device_name(0)


def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` on the GPU (``triton.testing.do_bench``, ``rep`` ms of
    repeats); without a GPU (smoke runs) the median of a few timed calls."""
    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def floor_ms(inputs: Sequence[torch.Tensor], out: torch.Tensor) -> float:
    """The memory-traffic floor of a pass that reads ``inputs`` once and writes ``out`` once:
    the cheaper of (reads by ``amax`` of each input's words + ``out.zero_()``) and a chain of
    in-place adds into ``out`` (reads each input once, re-reads out)."""

    def reads() -> None:
        for x in inputs:
            flat = x.reshape(-1)
            (flat.view(torch.int16) if flat.element_size() == 2 else flat.view(torch.int32)).amax()
        out.zero_()

    def adds() -> None:
        torch.add(inputs[0].reshape(out.shape), inputs[1].reshape(out.shape) if len(inputs) > 1 else 0, out=out)
        for x in inputs[2:]:
            out.add_(x.reshape(out.shape))

    return min(bench_ms(reads), bench_ms(adds))


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns)))
             + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True))
