"""Benchmark: fused TIES merge vs the memory-traffic floor, peft, mergekit and the TIES paper's code.

T fine-tuned tensors of n elements (default T = 4, n = 16M, density 0.2), fp32 and bf16, output
into a preallocated ``out``. Everything is timed in one process on the same inputs and the
report gives ratios, which survive the noise of a shared machine better than absolute times.
Times are medians of several repeats after one warm-up call (peers: no warm-up, fewer repeats).

    python benchmarks/bench_merge.py                  # 16M x 4, fp32 + bf16, 1 and 2 threads, peers
    python benchmarks/bench_merge.py --quick          # 1M x 4, peers at 256K, 3 repeats: a smoke run
    python benchmarks/bench_merge.py --no-peers --size 4194304 --threads 2

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
  loaded from the installed package file (importing ``peft`` itself needs transformers).
  ``peft/ours`` = peft ms / ``ties_merge ms`` (the same knobs).
* ``mergekit ms``: mergekit's ``ties`` (``GeneralizedTaskArithmeticMerge.merge_group`` with
  sign consensus "sum", magnitude sparsification, normalize, lambda 1) when mergekit imports;
  otherwise a faithful inline copy of its math (``sparsify.magnitude`` via argsort, ``get_mask``,
  the consensus branch of ``merge_group``), labelled as such. ``mergekit/ours`` = mergekit ms /
  ``mergekit-flavor ms``.
* ``paper-code ms``: an inline copy of the math of the TIES paper's released code
  (``ties_merging_utils.py``: ``vstack`` and subtract, ``topk_values_mask`` with ``kthvalue`` and
  ``>=``, ``resolve_sign`` with majority zero signs, ``disjoint_merge`` mean, ``base + lam * tv``).
  ``paper-code/ours`` = paper-code ms / ``paper-flavor ms``.

Peers always include forming the task vectors and adding ``base`` back, as a real merge does.
They run at ``--peers-size`` (default: ``--size``); if that differs, ``ours`` in the ratios is
re-timed at the peers' size and the table says so. Under the tables: how often the matching
flavor's output differs from each peer's (exact comparison; bf16 peers compute in bf16).

Peak extra memory: in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers go
back to the OS and every large temporary is counted), after building the inputs and ``out`` and
a warm-up call on tiny inputs, ``/proc/self/clear_refs`` is written ``5`` (resets VmHWM to the
current RSS), ``ties_merge`` runs once at full size, and peak extra = VmHWM after - VmHWM right
after the reset, reported in units of one input tensor (n * element size).

Targets from the issue: ties_merge/floor <= 5, peft/ours and mergekit/ours >= 50, peak extra
<= 2 input tensors. They are checked at the end (``ok`` / ``MISS``).
"""

from __future__ import annotations

import argparse
import importlib.util
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
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

import mtmerge
from mtmerge import _library

MERGEKIT_INLINE = "mergekit (inline copy of its math)"
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


# ---- peers -----------------------------------------------------------------------------------


def load_peft_merge_utils() -> tuple[ModuleType | None, str]:
    """``peft/utils/merge_utils.py`` loaded straight from the installed file (it only needs
    torch; ``import peft`` would pull in transformers). Returns (module or None, description)."""
    spec = importlib.util.find_spec("peft")
    if spec is None or spec.origin is None:
        return None, "peft not installed"
    path = Path(spec.origin).parent / "utils" / "merge_utils.py"
    file_spec = importlib.util.spec_from_file_location("_bench_peft_merge_utils", path)
    if file_spec is None or file_spec.loader is None or not path.exists():
        return None, f"peft installed but {path} not found"
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except Exception as exc:  # any failure: report it, skip the peer
        return None, f"loading {path} failed: {exc!r}"
    version = "?"
    try:
        from importlib.metadata import version as dist_version

        version = dist_version("peft")
    except Exception:  # metadata is only for the label
        pass
    return module, f"peft {version} ({path})"


def peft_merge(merge_utils: ModuleType) -> Merge:
    def run(base: Tensor, fts: list[Tensor], density: float) -> Tensor:
        task_vectors = [ft - base for ft in fts]
        weights = torch.ones(len(fts), dtype=base.dtype)
        return base + merge_utils.ties(task_vectors, weights, density)

    return run


def mergekit_inline(base: Tensor, fts: list[Tensor], density: float) -> Tensor:
    """mergekit's ties (GeneralizedTaskArithmeticMerge, consensus "sum", magnitude, normalize,
    no rescale, lambda 1, weights 1), its math copied from mergekit 0.1.5."""
    deltas = base.new_empty((len(fts), *base.shape))
    for index, ft in enumerate(fts):
        delta = ft - base
        # sparsify.magnitude (density < 1 here; rescale_norm None -> tensor * mask)
        k = max(1, int(density * delta.numel()))
        mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
        w = delta.abs().reshape(-1)
        if w.device.type == "cpu":
            w = w.float()
        topk = torch.argsort(w, descending=True)[:k]
        mask[topk] = 1
        deltas[index] = delta * mask.reshape_as(delta)
        del delta
    weights = torch.ones(len(fts), dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    # get_mask(method="sum")
    sign = deltas.sign().to(base.dtype)
    sign_weight = deltas.sum(dim=0)
    majority_sign = (sign_weight >= 0).to(base.dtype) * 2 - 1
    del sign_weight
    consensus = sign == majority_sign
    mixed_delta = (deltas * consensus).sum(dim=0)
    divisor = (weights * consensus).sum(dim=0)
    divisor[divisor == 0] = 1
    mixed_delta /= divisor
    return (base + mixed_delta).to(base.dtype)


def load_mergekit() -> tuple[Merge, str]:
    """mergekit's own ties if it imports and agrees with the inline copy on a small input,
    else the inline copy. Returns (merge, label)."""
    try:
        from mergekit.merge_methods.base import TensorGroup
        from mergekit.merge_methods.generalized_task_arithmetic import (
            ConsensusMethod,
            GeneralizedTaskArithmeticMerge,
        )
        from mergekit.sparsify import SparsificationMethod

        method = GeneralizedTaskArithmeticMerge(
            consensus_method=ConsensusMethod.sum,
            sparsification_method=SparsificationMethod.magnitude,
            default_normalize=True,
            default_rescale=False,
            method_name="ties",
            method_pretty_name="TIES",
            method_reference_url="https://arxiv.org/abs/2306.01708",
        )

        def run(base: Tensor, fts: list[Tensor], density: float) -> Tensor:
            ids = list(range(len(fts)))
            group = TensorGroup.from_tensors([base, *fts], ids=["base", *ids], base_index=0)
            params: dict[str, Any] = {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0,
                                      "weight": dict.fromkeys(ids, 1.0), "density": dict.fromkeys(ids, density)}
            return method.merge_group(group, **params)

        small_base, small_fts = make_inputs(4096, 3, torch.float32, seed=1)
        if not torch.equal(run(small_base, small_fts, 0.2), mergekit_inline(small_base, small_fts, 0.2)):
            return mergekit_inline, f"{MERGEKIT_INLINE}: mergekit's merge_group disagrees with it on a test input"
    except Exception as exc:  # missing deps, another API version: use the copy
        return mergekit_inline, f"{MERGEKIT_INLINE}; mergekit unavailable: {exc!r}"
    from importlib.metadata import version as dist_version

    return run, f"mergekit {dist_version('mergekit')} (GeneralizedTaskArithmeticMerge.merge_group)"


def _paper_topk_values_mask(m: Tensor, k_frac: float) -> Tensor:
    if k_frac > 1:
        k_frac /= 100
    if m.dim() == 1:
        m = m.unsqueeze(0)
    _, d = m.shape
    k = d - int(d * k_frac)  # keep the top int(d * K): threshold at the (d - k)-th smallest
    kth_values, _ = m.abs().kthvalue(k, dim=1, keepdim=True)
    mask = m.abs() >= kth_values
    return m * mask


def _paper_resolve_sign(tv: Tensor) -> Tensor:
    sign_to_mult = torch.sign(tv.sum(dim=0))
    majority_sign = torch.sign(sign_to_mult.sum())
    sign_to_mult[sign_to_mult == 0] = majority_sign
    return sign_to_mult


def _paper_disjoint_merge_mean(tv: Tensor, sign_to_mult: Tensor) -> Tensor:
    rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, tv > 0, tv < 0)
    selected_entries = tv * rows_to_keep
    non_zero_counts = (selected_entries != 0).sum(dim=0).float()
    return torch.sum(selected_entries, dim=0) / torch.clamp(non_zero_counts, min=1)


def paper_code(base: Tensor, fts: list[Tensor], density: float, lam: float = 1.0) -> Tensor:
    """The TIES paper's released code (ties_merging_utils.py + its merge script), inline."""
    flat_ptm = base.reshape(-1)
    flat_ft = torch.vstack([ft.reshape(-1) for ft in fts])
    tv_flat_checks = flat_ft - flat_ptm
    all_checks = tv_flat_checks.clone()  # ties_merging()
    updated_checks = _paper_topk_values_mask(all_checks, density)
    final_signs = _paper_resolve_sign(updated_checks)
    merged_tv = _paper_disjoint_merge_mean(updated_checks, final_signs)
    return (flat_ptm + lam * merged_tv).reshape(base.shape)


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
        lambda: torch.ops.mtmerge.delta_threshold(base, fts, ks, "exact", False, None), s.repeats, budget=s.budget)
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
    args = parser.parse_args(argv)
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
    peer_lines = []
    if not args.no_peers:
        merge_utils, peft_label = load_peft_merge_utils()
        if merge_utils is not None:
            peers["peft"] = peft_merge(merge_utils)
        mergekit_fn, mergekit_label = load_mergekit()
        peers["mergekit"] = mergekit_fn
        peers["paper-code"] = paper_code
        peer_lines = [f"- peft: {peft_label}", f"- mergekit: {mergekit_label}",
                      "- paper-code: inline copy of the TIES paper's ties_merging_utils.py math"]

    backend = _library.backends()
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
