"""What the op-family benchmarks (``bench_moe.py``, ``bench_lowrank.py``) share beside
``gpu_mode.py`` (do_bench timing, markdown tables, JSON): the machine (ISA flags, L3 size, load
average), CPU timing (medians of timed calls, a cache flush before each), timing a row's
programs, the report's header lines and target lines, and the command line of both modes.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

import mtmerge
from benchmarks.gpu_mode import bench_ms
from mtmerge import _library

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")

Measure = Callable[[Callable[[], object]], float]  # a program -> milliseconds
R = TypeVar("R")


# ---- the machine ---------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    """The CPU's feature flags, from ``lscpu`` (``/proc/cpuinfo`` when lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=20, check=False).stdout
        for line in text.splitlines():
            if line.startswith("Flags:"):
                return set(line.split(":", 1)[1].split())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_summary() -> dict[str, Any]:
    """The widest vector ISA the CPU has (avx512f > avx2 > baseline) and the flags that matter here."""
    flags = cpu_flags()
    isa = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "baseline (no avx2)"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"isa": isa, "flags": [f for f in ISA_FLAGS if f in flags], "cpu": model}


def l3_bytes() -> int:
    """The L3 (last-level) cache size of cpu0, 32 MiB when sysfs does not say."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        return int(text.rstrip("KMGkmg")) * scale
    except (OSError, ValueError):
        return 32 << 20


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


# ---- CPU timing --------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1, budget: float = math.inf,
              flush: Callable[[], object] | None = None) -> float:
    """Median milliseconds of ``repeats`` timed calls after ``warmup`` calls; ``flush`` runs
    (untimed) before each timed call; stops early (after at least one timed call) once the timed
    calls have used ``budget`` seconds. A program whose first warm-up call alone takes ``budget``
    seconds is timed by that call (its one-time costs are small beside its run time)."""
    for i in range(warmup):
        start = time.perf_counter()
        fn()
        if i == 0 and time.perf_counter() - start >= budget:
            return (time.perf_counter() - start) * 1e3
    times: list[float] = []
    for _ in range(max(1, repeats)):
        if flush is not None:
            flush()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if sum(times) >= budget:
            break
    return statistics.median(times) * 1e3


def cache_flush(enabled: bool) -> tuple[int, Callable[[], object] | None]:
    """``(bytes, flush)``: ``flush`` writes a buffer twice the L3 size (at most 512 MiB), so the
    next call reads its operands from DRAM; ``(0, None)`` when not ``enabled``."""
    flush_bytes = min(2 * l3_bytes(), 512 << 20) if enabled else 0
    if not flush_bytes:
        return 0, None
    buf = torch.empty(flush_bytes // 4, dtype=torch.int32)
    return flush_bytes, lambda: buf.fill_(1)


def cpu_measure(args: argparse.Namespace, flush: Callable[[], object] | None = None) -> Measure:
    """``median_ms`` with the command line's repeats and budget (and ``flush`` before each call)."""
    return lambda fn: median_ms(fn, args.repeats, budget=args.budget, flush=flush)


def gpu_measure(args: argparse.Namespace) -> Measure:
    """``bench_ms`` (do_bench medians) with the command line's warm-up and repetition times."""
    return lambda fn: bench_ms(fn, warmup=args.gpu_warmup, rep=args.gpu_rep)


# ---- a row's programs ------------------------------------------------------------------------------


def time_programs(ms: dict[str, float], errors: dict[str, str], programs: dict[str, Callable[[], object]],
                  measure: Measure, required: Iterable[str]) -> None:
    """Time every program into ``ms``; a peer that fails is reported in ``errors``, a program
    named in ``required`` (ours) re-raises."""
    for name, prog in programs.items():
        try:
            ms[name] = measure(prog)
        except Exception as exc:  # a peer that cannot run here is reported, not fatal
            if name in required:
                raise
            errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"


def rel_diff(ours: Tensor, peer: Tensor) -> float:
    """max |ours - peer| / max |peer|, in float32."""
    peer = peer.float()
    return float((ours.float() - peer).abs().max() / peer.abs().max().clamp_min(1e-30))


def as_words(t: Tensor) -> Tensor:
    """``t``'s bytes as int32 (int16 when the byte count is not a multiple of 4) words."""
    flat = t.detach().reshape(-1)
    return flat.view(torch.int32) if (flat.numel() * flat.element_size()) % 4 == 0 else flat.view(torch.int16)


# ---- report ------------------------------------------------------------------------------------------


def grouped(rows: Iterable[R], key: Callable[[R], Any]) -> dict[Any, list[R]]:
    """The rows by ``key`` (one table per group), in first-seen order."""
    groups: dict[Any, list[R]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def check(ok: bool) -> str:
    return "ok" if ok else "MISS"


def print_targets(title: str, lines: Iterable[tuple[str, Sequence[str]]]) -> list[str]:
    """``Targets (title):`` then one line per row (``label: check; check``, each check ending in
    ``ok`` / ``MISS``) and the count of rows that miss; returns the missing lines."""
    print(f"\nTargets ({title}):")
    misses = []
    count = 0
    for label, checks in lines:
        line = f"- {label}: " + "; ".join(checks)
        print(line)
        count += 1
        if "MISS" in line:
            misses.append(line)
    print(f"\n{len(misses)} of {count} rows miss a target.")
    return misses


def gpu_header(device_name: str, backends: str, args: argparse.Namespace) -> str:
    return (f"mtmerge {mtmerge.__version__}, torch {torch.__version__}, {device_name}; {backends}; do_bench medians "
            f"in ms (warmup {args.gpu_warmup} ms, rep {args.gpu_rep} ms)")


def cpu_header(backends: str, isa: dict[str, Any], args: argparse.Namespace, flush_bytes: int, *,
               flushed: str = "", notes: Sequence[str] = ()) -> str:
    """The CPU mode's header: versions, backends and load, the ISA and the extension's
    multiversioned ISAs, ``notes``, then how the medians are taken (``flushed``: which programs
    the cache flush applies to, when not all)."""
    build = _library._C.build_info() if _library._C is not None else {}
    flags = " ".join(isa["flags"]) or "none of " + ", ".join(ISA_FLAGS)
    flush = (f"{flushed}caches flushed before each timed call (write {flush_bytes >> 20} MiB = 2x L3, untimed)"
             if flush_bytes else "no cache flush (--no-flush)")
    return "\n".join([
        f"mtmerge {mtmerge.__version__}, torch {torch.__version__}; {backends}; load average at start "
        f"{load_average()} on {os.cpu_count()} CPUs (others' work skews absolute times)",
        f"ISA: {isa['isa']} (lscpu flags: {flags}); CPU: {isa['cpu']}; mtmerge._C multiversioned for: "
        f"{', '.join(build.get('multiversioned_isas', ())) or '-'}",
        *notes,
        f"Medians of <= {args.repeats} timed calls after 1 warm-up, <= {args.budget:g} s of timed calls each (a "
        f"warm-up call over {args.budget:g} s is the measurement); {flush}",
    ])


def cpu_figures(isa: dict[str, Any], flush_bytes: int) -> dict[str, Any]:
    """The CPU mode's machine fields of the JSON figures."""
    return {"isa": isa, "flush_bytes": flush_bytes, "load_average_end": load_average()}


# ---- command line ---------------------------------------------------------------------------------


def add_mode_args(parser: argparse.ArgumentParser, *, flush_help: str = "") -> None:
    """The options both modes take: threads, repeats and budget, the cache flush (CPU mode);
    ``--gpu``, its device, do_bench's times (GPU mode); ``--json``."""
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="stop repeating one measurement after this many seconds (at least 1 call)")
    parser.add_argument("--no-flush", action="store_true",
                        help=f"{flush_help}do not evict the caches before each timed call")
    parser.add_argument("--gpu", action="store_true", help="GPU mode: Triton on CUDA timed by do_bench")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"],
                        help="GPU mode's device (cpu: a smoke run of the script, not GPU figures)")
    parser.add_argument("--gpu-warmup", type=int, default=10, help="do_bench warm-up, ms")
    parser.add_argument("--gpu-rep", type=int, default=40, help="do_bench repetition time, ms")
    parser.add_argument("--json", default=None, help="write the figures to this file")


def run_mode(args: argparse.Namespace, cpu_main: Callable[[argparse.Namespace], R],
             gpu_main: Callable[[argparse.Namespace], R]) -> R:
    """``--quick``: 3 repeats, 0.5 s budget; ``--gpu``: the GPU mode on ``--device`` (default
    cuda); otherwise the CPU mode."""
    if args.quick:
        args.repeats, args.budget = 3, 0.5
    if args.gpu:
        args.device = args.device or "cuda"
        return gpu_main(args)
    args.device = "cpu"
    return cpu_main(args)
