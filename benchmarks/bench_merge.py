"""Benchmark: fused TIES merge vs the memory-traffic floor, peft, mergekit and the TIES paper's code.

T fine-tuned tensors of n elements (default T = 4, n = 16M, density 0.2), fp32 and bf16, output
into a preallocated ``out``. Everything is timed in one process on the same inputs and the
report gives ratios, which survive the noise of a shared machine better than absolute times.
Times are medians of several repeats after one warm-up call (peers: no warm-up, fewer repeats).

    python benchmarks/bench_merge.py                  # 16M x 4, fp32 + bf16, 1 and 2 threads, peers
    python benchmarks/bench_merge.py --quick          # 1M x 4, peers at 256K, 3 repeats: a smoke run
    python benchmarks/bench_merge.py --no-peers --size 4194304 --threads 2
    python benchmarks/bench_merge.py --gpu            # GPU mode: Triton on CUDA, do_bench, 1M and 4M

Columns (one markdown table per dtype, one row per thread count):

* ``floor ms``: the memory-traffic floor, the cheapest of three torch programs that read
  ``base`` and the T fine-tuned tensors once each and write one n-element output into a
  preallocated buffer (no allocation of n-sized tensors):
  (a) ``x.sum()`` on each of the T + 1 inputs, then ``buf.zero_()`` (exactly the minimal
  traffic: (T + 1) n reads + n writes, but the float reduction is not free);
  (b) the same with ``x.view(int32).amax()`` (the same bytes read by a cheaper integer
  reduction; the values are meaningless, only the traffic counts);
  (c) ``torch.addcmul(base, ft0, ft1, out=buf)``, ``buf.addcmul_(ft2, ft3)``, ... (each input
  read once in elementwise passes; ``buf`` is re-read and re-written once per extra pass, so
  this moves a little more than the minimum). Each is timed as a median with 1 thread and
  with the row's thread count; the row's floor is the smallest of these medians (all printed
  under the table; a merge may always use fewer threads, and on a shared machine a contended
  core can make a 2-thread pass slower than a 1-thread one). Any merge must move at least these
  bytes, so ``ties_merge/floor`` is how far the merge is from the machine's limit.
* ``ties_merge ms``: ``mtmerge.ties_merge(base, fts, density, out=out)`` (default knobs,
  which are the ``"peft"`` flavor): both passes, the per-task trim selection and the fused
  merge. ``ties_merge/floor`` is that time over the floor. Under the table: the selection pass
  alone (the ``delta_threshold`` op, all T tasks), to show where the time goes.
* ``task_arithmetic ms``: ``mtmerge.task_arithmetic(base, fts, out=out)`` (one pass, no trim).
* ``mergekit-flavor ms``, ``paper-flavor ms``: ``ties_merge(..., flavor="mergekit")`` and
  ``flavor="paper"`` (the latter adds the "majority" zero-sign pre-pass).
* ``peft ms``: ``base + peft.utils.merge_utils.ties([ft - base for ft in fts], ones(T), density)``,
  loaded from the installed package file (``tests/peers/peft_merge_utils.py``).
  ``peft/ours`` = peft ms / ``ties_merge ms`` (the same knobs).
* ``mergekit ms``: mergekit's ``ties`` (``tests/peers/mergekit_ties.py``: the package's
  ``merge_tensors``, consensus "sum", magnitude sparsification, normalize, lambda 1) when mergekit
  imports; otherwise the local copy of its math (``tests/peers/mergekit_ties_copy.py``), labelled
  as such. ``mergekit/ours`` = mergekit ms / ``mergekit-flavor ms``.
* ``paper-code ms``: the local copy of the TIES paper's released code (``tests/peers/ties_paper.py``:
  ``topk_values_mask`` with ``kthvalue`` and ``>=``, ``resolve_sign`` with majority zero signs,
  ``disjoint_merge`` mean, ``base + lam * tv``). ``paper-code/ours`` = paper-code ms / ``paper-flavor ms``.

Peers always include forming the task vectors and adding ``base`` back, as a real merge does.
They run at ``--peers-size`` (default: ``--size``); if that differs, ``ours`` in the ratios is
re-timed at the peers' size and the table says so. Under the tables: how often the matching
flavor's output differs from each peer's (exact comparison; bf16 peers compute in bf16).

Peak extra memory: in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers go
back to the OS and every large temporary is counted), after building the inputs and ``out`` and
a warm-up call on tiny inputs, ``/proc/self/clear_refs`` is written ``5`` (resets VmHWM to the
current RSS), ``ties_merge`` runs once at full size, and peak extra = VmHWM after - VmHWM right
after the reset, reported in units of one input tensor (n * element size).

GPU mode (``--gpu``; sizes ``--gpu-sizes``, default 1M and 4M; fp32 and bf16; T = 4): the same
programs on CUDA tensors (the Triton kernels), timed with ``triton.testing.do_bench`` (medians),
beside the floor (``benchmarks/gpu_mode.py``: read every input once, write out once) and the
peers on the same device; ``--json PATH`` writes the figures.

Targets from the issue: ties_merge/floor <= 5, peft/ours and mergekit/ours >= 50, peak extra
<= 2 input tensors. They are checked at the end (``ok`` / ``MISS``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import mtmerge
from mtmerge import _library

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_merge.py`: tests.peers lives in the repo root
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_mode import bench_ms, floor_ms, markdown_table, require_gpu, write_json  # noqa: E402
from tests.peers import mergekit_ties, mergekit_ties_copy, peft_merge_utils, ties_paper  # noqa: E402

OURS_FOR_PEER = {"peft": "ties_merge", "mergekit": "mergekit-flavor", "paper-code": "paper-flavor"}
PEER_FLAVOR = {"peft": None, "mergekit": "mergekit", "paper-code": "paper"}

Merge = Callable[[Tensor, list[Tensor], float], Tensor]


# ---- timing ----------------------------------------------------------------------------------


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1, budget: float = math.inf) -> float:
    """Median of ``repeats`` timed calls after ``warmup`` calls; stops early (after at least
    one timed call) once the timed calls have used ``budget`` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(max(1, repeats)):
        times.append(_seconds(fn))
        if sum(times) >= budget:
            break
    return statistics.median(times)


# ---- inputs ----------------------------------------------------------------------------------


def make_inputs(numel: int, tasks: int, dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """Base ~ N(0, 0.02^2); each fine-tuned tensor = base + N(0, 0.002^2) (independent signs)."""
    gen = torch.Generator().manual_seed(seed)
    base32 = torch.randn(numel, generator=gen).mul_(0.02)
    fts = [(base32 + torch.randn(numel, generator=gen).mul_(0.002)).to(dtype) for _ in range(tasks)]
    return base32.to(dtype), fts


# ---- the floor -------------------------------------------------------------------------------


def _word_view(x: Tensor) -> Tensor:
    """The bytes of ``x`` as int32 words (int16 when they do not divide into words)."""
    flat = x.reshape(-1)
    if (flat.numel() * flat.element_size()) % 4 == 0:
        return flat.view(torch.int32)
    return flat.view(torch.int16)


def floor_programs(base: Tensor, fts: list[Tensor], buf: Tensor) -> dict[str, Callable[[], object]]:
    """Torch programs that read base + T inputs once and write one output into ``buf``."""
    inputs = [base, *fts]

    def reads_sum() -> None:
        for x in inputs:
            x.sum()
        buf.zero_()

    def reads_amax() -> None:
        for x in inputs:
            _word_view(x).amax()
        buf.zero_()

    def addcmul_chain() -> None:
        if len(fts) == 1:
            torch.add(base, fts[0], out=buf)
            return
        torch.addcmul(base, fts[0], fts[1], out=buf)
        rest = fts[2:]
        for i in range(0, len(rest) - 1, 2):
            buf.addcmul_(rest[i], rest[i + 1])
        if len(rest) % 2:
            buf.add_(rest[-1])

    return {"sum+zero_": reads_sum, "int32-amax+zero_": reads_amax, "addcmul chain": addcmul_chain}


# ---- ours ------------------------------------------------------------------------------------


def our_programs(base: Tensor, fts: list[Tensor], density: float, out: Tensor) -> dict[str, Callable[[], object]]:
    return {
        "ties_merge": lambda: mtmerge.ties_merge(base, fts, density, out=out),
        "task_arithmetic": lambda: mtmerge.task_arithmetic(base, fts, out=out),
        "mergekit-flavor": lambda: mtmerge.ties_merge(base, fts, density, flavor="mergekit", out=out),
        "paper-flavor": lambda: mtmerge.ties_merge(base, fts, density, flavor="paper", out=out),
    }


# ---- peers (kept once in tests/peers/) --------------------------------------------------------


def load_peers() -> tuple[dict[str, Merge], list[str]]:
    """The peers (each forms ``ft - base`` and adds ``base`` back) and one label line each."""
    merges: dict[str, Merge] = {}
    lines = []
    if peft_merge_utils.MERGE_UTILS is not None:
        merges["peft"] = peft_merge_utils.ties_merge
        lines.append(f"- peft: {peft_merge_utils.LABEL} (real package)")
    else:
        lines.append(f"- peft: skipped ({peft_merge_utils.UNAVAILABLE})")
    if mergekit_ties.AVAILABLE:
        merges["mergekit"] = lambda base, fts, d: mergekit_ties.ties_merge(base, fts, [1.0] * len(fts), [d] * len(fts))
        lines.append(f"- mergekit: {mergekit_ties.LABEL} (real package)")
    else:
        merges["mergekit"] = lambda base, fts, d: mergekit_ties_copy.ties_merge(base, fts, [1.0] * len(fts),
                                                                                [d] * len(fts))
        lines.append(f"- mergekit: {mergekit_ties_copy.LABEL}; the package is unavailable: {mergekit_ties.UNAVAILABLE}")
    merges["paper-code"] = ties_paper.ties_merge
    lines.append(f"- paper-code: {ties_paper.LABEL}")
    return merges, lines


# ---- peak memory (subprocess) ----------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def child_peak(numel: int, tasks: int, density: float, dtypes: list[str], threads: int) -> dict[str, Any]:
    """Runs in the subprocess: peak extra bytes of one ``ties_merge`` per dtype."""
    torch.set_num_threads(threads)
    result: dict[str, Any] = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        tiny_base, tiny_fts = make_inputs(1024, tasks, dtype)
        mtmerge.ties_merge(tiny_base, tiny_fts, density)  # lazy init, thread pools: not charged
        base, fts = make_inputs(numel, tasks, dtype)
        out = torch.zeros_like(base)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError as exc:
            result[name] = {"error": f"cannot reset VmHWM via /proc/self/clear_refs: {exc}"}
            continue
        before = _status_kib("VmHWM")
        mtmerge.ties_merge(base, fts, density, out=out)
        extra = (_status_kib("VmHWM") - before) * 1024
        result[name] = {"extra_bytes": extra, "input_bytes": base.numel() * base.element_size()}
        del base, fts, out
    return result


def measure_peak(numel: int, tasks: int, density: float, dtypes: list[str], threads: int) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-peak", "--size", str(numel), "--tasks",
           str(tasks), "--density", str(density), "--threads", str(threads), "--dtypes", *dtypes]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return {name: {"error": f"subprocess failed: {proc.stderr.strip()[-400:]}"} for name in dtypes}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- one case --------------------------------------------------------------------------------


@dataclass
class Row:
    dtype: str
    threads: int
    times: dict[str, float] = field(default_factory=dict)  # name -> seconds
    floor_parts: dict[str, float] = field(default_factory=dict)
    ours_at_peer_size: dict[str, float] = field(default_factory=dict)
    mismatch: dict[str, str] = field(default_factory=dict)  # peer -> description


@dataclass
class Settings:
    size: int
    peers_size: int
    tasks: int
    density: float
    repeats: int
    peer_repeats: int
    budget: float
    peer_budget: float


def _mismatch(ours: Tensor, theirs: Tensor) -> str:
    ours32, theirs32 = ours.float(), theirs.float().reshape(ours.shape)
    differ = int((ours32 != theirs32).sum())
    diff = (ours32 - theirs32).abs().max().item()
    return f"{differ:,} of {ours.numel():,} entries differ ({differ / ours.numel():.2%}), max |diff| {diff:.3g}"


def run_case(dtype_name: str, threads: int, s: Settings, peers: dict[str, Merge]) -> Row:
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    row = Row(dtype_name, threads)
    base, fts = make_inputs(s.size, s.tasks, dtype)
    out = torch.empty_like(base)
    # The floor at t threads: the cheapest candidate run with 1 or t threads (moving the bytes
    # with fewer threads is always an option, and it keeps a contended core from inflating it).
    for floor_threads in sorted({1, threads}):
        torch.set_num_threads(floor_threads)
        for name, fn in floor_programs(base, fts, out).items():
            row.floor_parts[f"{name} @{floor_threads}t"] = median_seconds(fn, s.repeats, budget=s.budget)
    torch.set_num_threads(threads)
    row.times["floor"] = min(row.floor_parts.values())
    for name, fn in our_programs(base, fts, s.density, out).items():
        row.times[name] = median_seconds(fn, s.repeats, budget=s.budget)
    ks = [int(s.density * base.numel())] * len(fts)
    row.times["selection"] = median_seconds(
        lambda: torch.ops.mtmerge.delta_threshold(base=base, finetuned=fts, ks=ks, selection="exact",
                                                  allow_nonfinite=False, consensus=None), s.repeats, budget=s.budget)
    if not peers:
        return row
    if s.peers_size != s.size:
        del base, fts, out
        base, fts = make_inputs(s.peers_size, s.tasks, dtype)
        out = torch.empty_like(base)
        for name, fn in our_programs(base, fts, s.density, out).items():
            row.ours_at_peer_size[name] = median_seconds(fn, s.repeats, budget=s.budget)
    else:
        row.ours_at_peer_size = {k: row.times[k] for k in OURS_FOR_PEER.values()}
    for name, merge in peers.items():
        result: list[Tensor] = []

        def call(merge: Merge = merge, result: list[Tensor] = result) -> None:
            result[:] = [merge(base, fts, s.density)]

        row.times[name] = median_seconds(call, s.peer_repeats, warmup=0, budget=s.peer_budget)
        ours = mtmerge.ties_merge(base, fts, s.density, flavor=PEER_FLAVOR[name])
        row.mismatch[name] = _mismatch(ours, result[0])
        del result[:], ours
    return row


# ---- report ----------------------------------------------------------------------------------


def _ms(seconds: float | None, digits: int = 2) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.1f}"


def format_table(rows: list[Row], peer_note: str) -> str:
    cols = ["dtype", "threads", "floor ms", "ties_merge ms", "ties_merge/floor", "task_arithmetic ms",
            "mergekit-flavor ms", "paper-flavor ms", "peft ms", f"peft/ours{peer_note}", "mergekit ms",
            f"mergekit/ours{peer_note}", "paper-code ms", f"paper-code/ours{peer_note}"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if i > 1 else "---" for i in range(len(cols))) + "|"]
    for r in rows:
        t, o = r.times, r.ours_at_peer_size
        cells = [r.dtype, str(r.threads), _ms(t["floor"]), _ms(t["ties_merge"]),
                 _ratio(t["ties_merge"], t["floor"]), _ms(t["task_arithmetic"]), _ms(t["mergekit-flavor"]),
                 _ms(t["paper-flavor"])]
        for peer in ("peft", "mergekit", "paper-code"):
            cells += [_ms(t.get(peer), 0), _ratio(t.get(peer), o.get(OURS_FOR_PEER[peer]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check(ok: bool) -> str:
    return "ok" if ok else "MISS"


# ---- GPU mode ----------------------------------------------------------------------------------


def gpu_main(args: argparse.Namespace) -> dict[str, Any]:
    """Every program on CUDA tensors, timed by do_bench; returns the figures."""
    device_name = require_gpu(args.device)
    backend = _library.backends()["merge"]
    print(f"mtmerge {mtmerge.__version__}, torch {torch.__version__}, {device_name}; CUDA backends: merge_fused = "
          f"{backend['merge_fused']['cuda']}, delta_threshold = {backend['delta_threshold']['cuda']}")
    peers, peer_lines = ({}, []) if args.no_peers else load_peers()
    if peer_lines:
        print("Peers (on the GPU too):\n" + "\n".join(peer_lines))
    rows = []
    for dtype_name in args.dtypes:
        for size in args.gpu_sizes:
            dtype = getattr(torch, dtype_name)
            cpu_base, cpu_fts = make_inputs(size, args.tasks, dtype)
            base, fts = cpu_base.to(args.device), [f.to(args.device) for f in cpu_fts]
            del cpu_base, cpu_fts
            out = torch.empty_like(base)
            times = {"floor": floor_ms([base, *fts], out)}
            for name, fn in our_programs(base, fts, args.density, out).items():
                times[name] = bench_ms(fn)
            ks = [int(args.density * size)] * len(fts)
            times["selection"] = bench_ms(lambda base=base, fts=fts, ks=ks: torch.ops.mtmerge.delta_threshold(
                base=base, finetuned=fts, ks=ks, selection="exact", allow_nonfinite=False, consensus=None))
            for name, merge in peers.items():
                times[name] = bench_ms(lambda merge=merge, base=base, fts=fts: merge(base, fts, args.density),
                                       warmup=2, rep=20)
            rows.append({"dtype": dtype_name, "size": size, "tasks": args.tasks, "ms": times})
            del base, fts, out
            if args.device == "cuda":
                torch.cuda.empty_cache()
    columns = ["dtype", "n", "floor ms", "ties_merge ms", "ties_merge/floor", "task_arithmetic ms",
               "mergekit-flavor ms", "paper-flavor ms", "selection ms", *(f"{p} ms" for p in peers),
               *(f"{p}/ours" for p in peers)]
    table = []
    for r in rows:
        t = r["ms"]
        table.append([r["dtype"], r["size"], t["floor"], t["ties_merge"], t["ties_merge"] / t["floor"],
                      t["task_arithmetic"], t["mergekit-flavor"], t["paper-flavor"], t["selection"],
                      *(t[p] for p in peers), *(t[p] / t[OURS_FOR_PEER[p]] for p in peers)])
    print(f"\nGPU, T = {args.tasks}, density {args.density}, out preallocated; do_bench medians in ms\n")
    print(markdown_table(columns, table))
    result = {"bench": "merge", "device": device_name, "torch": torch.__version__, "rows": rows}
    write_json(args.json, result)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16 * 1024 * 1024, help="elements per tensor")
    parser.add_argument("--tasks", type=int, default=4, help="fine-tuned tensors T")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=11, help="timed repeats of the floor and our ops")
    parser.add_argument("--budget", type=float, default=10.0,
                        help="stop repeating one measurement after this many seconds (at least 1 call)")
    parser.add_argument("--no-peers", action="store_true", help="skip peft, mergekit and the paper's code")
    parser.add_argument("--peers-size", type=int, default=None, help="elements per tensor for peers (default --size)")
    parser.add_argument("--peer-repeats", type=int, default=3)
    parser.add_argument("--peer-budget", type=float, default=30.0)
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocess")
    parser.add_argument("--quick", action="store_true", help="1M elements, peers at 256K, 3 repeats: a smoke run")
    parser.add_argument("--child-peak", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true", help="GPU mode: Triton on CUDA timed by do_bench")
    parser.add_argument("--gpu-sizes", type=int, nargs="+", default=[1 << 20, 1 << 22],
                        help="elements per tensor in GPU mode")
    parser.add_argument("--json", default=None, help="write the GPU mode's figures to this file")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="GPU mode's device (cpu: a smoke run of the script, not GPU figures)")
    args = parser.parse_args(argv)
    if args.gpu:
        gpu_main(args)
        return
    if args.child_peak:
        print(json.dumps(child_peak(args.size, args.tasks, args.density, args.dtypes, args.threads[0])))
        return
    if args.quick:
        args.size, args.repeats, args.peer_repeats, args.budget, args.peer_budget = 1 << 20, 3, 1, 1.0, 1.0
        args.peers_size = 1 << 18 if args.peers_size is None else min(args.peers_size, args.size)
    peers_size = args.size if args.peers_size is None else args.peers_size
    settings = Settings(args.size, peers_size, args.tasks, args.density, args.repeats, args.peer_repeats,
                        args.budget, args.peer_budget)

    peers: dict[str, Merge] = {}
    peer_lines: list[str] = []
    if not args.no_peers:
        peers, peer_lines = load_peers()

    backend = _library.backends()["merge"]
    print(f"mtmerge {mtmerge.__version__}, torch {torch.__version__}; CPU backends: merge_fused = "
          f"{backend['merge_fused']['cpu']}, delta_threshold = {backend['delta_threshold']['cpu']}")
    print(f"T = {args.tasks} tensors of {args.size:,} elements, density {args.density}, out preallocated; "
          f"medians (ours: {args.repeats} repeats after 1 warm-up, <= {args.budget:g} s each; peers: "
          f"{args.peer_repeats} repeats, no warm-up, <= {args.peer_budget:g} s each)")
    peer_note = ""
    if peers:
        print("Peers (each forms ft - base and adds base back):")
        print("\n".join(peer_lines))
        if peers_size != args.size:
            peer_note = " †"
            print(f"† peers ran on {peers_size:,} elements per tensor, not {args.size:,}: their ms and the "
                  f"ratios are at {peers_size:,} (ours re-timed at that size for the ratios)")
    else:
        print("Peers: skipped (--no-peers)")

    rows: list[Row] = []
    for dtype_name in args.dtypes:
        dtype_rows = [run_case(dtype_name, threads, settings, peers) for threads in args.threads]
        rows += dtype_rows
        print(f"\n### {dtype_name}\n")
        print(format_table(dtype_rows, peer_note))
        print()
        for r in dtype_rows:
            parts = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in r.floor_parts.items())
            print(f"- floor candidates for {r.threads} thread(s), ms: {parts}")
        for r in dtype_rows:
            sel = r.times["selection"]
            print(f"- {r.threads} thread(s): ties_merge's selection pass alone (delta_threshold op) {sel * 1e3:.2f} ms"
                  f" = {sel / r.times['floor']:.1f} x floor, {sel / r.times['ties_merge']:.0%} of ties_merge")
        for r in dtype_rows[-1:]:
            for peer, text in r.mismatch.items():
                flavor = PEER_FLAVOR[peer] or "default (peft)"
                print(f"- ties_merge flavor {flavor} vs {peer} ({r.threads} thread(s)): {text}")

    peak: dict[str, Any] = {}
    if not args.no_peak:
        peak_threads = max(args.threads)
        peak = measure_peak(args.size, args.tasks, args.density, args.dtypes, peak_threads)
        print(f"\nPeak extra memory of one ties_merge ({args.size:,} elements, {peak_threads} thread(s), "
              "VmHWM in a fresh subprocess):")
        for name, p in peak.items():
            if "error" in p:
                print(f"- {name}: n/a ({p['error']})")
            else:
                print(f"- {name}: {p['extra_bytes'] / 2**20:.1f} MiB = {p['extra_bytes'] / p['input_bytes']:.2f} x "
                      f"one input tensor ({p['input_bytes'] / 2**20:.1f} MiB)")

    print("\nTargets:")
    for r in rows:
        t, o = r.times, r.ours_at_peer_size
        to_floor = t["ties_merge"] / t["floor"]
        checks = [f"ties_merge/floor {to_floor:.1f} <= 5 {_check(to_floor <= 5)}"]
        for peer in ("peft", "mergekit"):
            if peer in t:
                ratio = t[peer] / o[OURS_FOR_PEER[peer]]
                checks.append(f"{peer}/ours {ratio:.0f} >= 50 {_check(ratio >= 50)}")
        print(f"- {r.dtype}, {r.threads} thread(s): " + "; ".join(checks))
    for name, p in peak.items():
        if "error" not in p:
            ratio = p["extra_bytes"] / p["input_bytes"]
            print(f"- {name}: peak extra {ratio:.2f} x input <= 2 {_check(ratio <= 2)}")


if __name__ == "__main__":
    main()
