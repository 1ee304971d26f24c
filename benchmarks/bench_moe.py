"""Benchmark: MoE experts (``mtmerge.moe_experts``) vs transformers' experts and the machine's floor.

Two configurations, Mixtral-like (H = 1024, F = 2048, E = 8, k = 2) and fine-grained (H = 1024,
F = 256, E = 64, k = 8), at T = 1, 8, 64, 512 and 2048 tokens, float32 and bfloat16, forward and
forward + backward, SiLU experts. Everything runs in one process on the same tensors and the report
gives ratios, which survive the noise of a shared machine better than absolute times. Times are
medians of several repeats after one warm-up call (a program slower than ``--budget``: that one call).

    python benchmarks/bench_moe.py                        # both configs, fp32 + bf16, all T
    python benchmarks/bench_moe.py --threads 1 2 --json moe.json
    python benchmarks/bench_moe.py --configs fine --dtypes bfloat16 --tokens 64 512
    python benchmarks/bench_moe.py --quick                # tiny experts, T = 1 and 16: a smoke run
    python benchmarks/bench_moe.py --gpu                  # GPU mode: Triton on CUDA, do_bench

Programs (all on the same weights, inputs and routing: random logits, softmax, top-k, the k
weights renormalized, as Mixtral routes):

* ``ours``: ``mtmerge.moe_experts(x, gate_up, down, weights, ids)`` (the public op; on CPU the
  C++ kernel when ``mtmerge._C`` has it, else the PyTorch reference: the header says which).
* ``eager``: transformers' ``MixtralExperts`` with ``config._experts_implementation = "eager"``
  (a Python loop over the hit experts, ``F.linear`` per expert, ``index_add_``).
* ``grouped_mm``: the same module with ``"grouped_mm"`` (sort the slots by expert, two
  ``torch.nn.functional.grouped_mm`` calls; the header says when transformers takes its fallback
  loop instead).

Forward runs under ``torch.no_grad()``; forward + backward is the forward with autograd on
``x``, the routing weights, ``gate_up`` and ``down``, then ``torch.autograd.grad`` with a fixed
``grad_out`` (no ``.grad`` accumulation is charged to anyone).

Preallocated and shared by every program, built once per config / dtype (weights) or per T
(the rest): ``gate_up`` [E, 2F, H], ``down`` [E, H, F] (the transformers modules hold these very
Parameters), ``x`` [T, H], the routing ``weights`` [T, k] (x's dtype, as Mixtral's router returns
them) and ``ids`` [T, k] (int64, from ``torch.topk``), ``grad_out`` [T, H], and the floor's
matmul operands and output. Outputs and gradients are allocated by each call (no program here
takes an ``out=``).

The floor, measured in the same run, is the larger of:

* ``read floor``: reading each *activated* expert's weights once, i.e. the bytes of
  ``gate_up[:n]`` and ``down[:n]`` where n = the number of distinct experts in ``ids`` (the same
  byte count as the activated experts; contiguous slices so it is two streaming passes), read as
  int32 words by ``amax``;
* ``gemm floor``: one dense ``torch.matmul`` with the same FLOPs as the forward, [T*k, H] @
  [H, 3F] in the same dtype (2 T k H 2F + 2 T k F H = 6 T k H F), weight stored [3F, H] as
  ``F.linear`` reads it, output preallocated.

Each is the cheaper of 1 thread and the row's thread count (an op may always use fewer threads,
and on a shared machine a contended core can make 2 threads slower than 1); the candidates are
listed under the table.

Caches: a model cycles through its layers, so an expert's weights come from DRAM; before each
timed call (not timed) a buffer twice the L3 size is written (``--no-flush`` turns this off).

Columns (one markdown table per config and dtype, one row per thread count and T): T, active
experts, ours / eager / grouped_mm forward ms, read floor / gemm floor / floor ms, ours/floor,
eager/floor, grouped/floor, then forward + backward ms of the three and fb/fwd for ours. Under
each table: the largest |ours - eager| relative to max |eager| (forward outputs).

Targets from the issue, checked at the end (``ok`` / ``MISS``): forward within 1.3x of the floor
at every T, never slower than either transformers backend (forward and forward + backward), and
forward + backward within 3.5x of forward.

GPU mode (``--gpu``): the same programs and floors on CUDA tensors (``torch.ops.mtmerge.*`` run
the Triton kernels), timed by ``triton.testing.do_bench`` medians (``benchmarks/gpu_mode.py``);
``--device cpu`` runs that code path on CPU tensors as a smoke test. ``--json PATH`` writes the
figures in both modes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import mtmerge
from mtmerge import _library

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_moe.py`
    sys.path.insert(0, str(ROOT))

from benchmarks import _common as common  # noqa: E402
from benchmarks._common import Measure, as_words, check  # noqa: E402
from benchmarks.gpu_mode import markdown_table, require_gpu, write_json  # noqa: E402

IMPLS = ("ours", "eager", "grouped_mm")
TOKENS = (1, 8, 64, 512, 2048)
FLOOR_TARGET = 1.3
FB_TARGET = 3.5


@dataclass(frozen=True)
class Config:
    name: str
    hidden: int
    ffn: int
    experts: int
    k: int


CONFIGS = {
    "mixtral": Config("mixtral", 1024, 2048, 8, 2),
    "fine": Config("fine-grained", 1024, 256, 64, 8),
}
QUICK = Config("quick", 128, 64, 8, 2)


# ---- inputs ----------------------------------------------------------------------------------------


def make_weights(cfg: Config, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[nn.Parameter, nn.Parameter]:
    """gate_up [E, 2F, H] and down [E, H, F] ~ N(0, 0.02^2), as Parameters (autograd on)."""
    gen = torch.Generator(device).manual_seed(seed)
    gate_up = torch.randn(cfg.experts, 2 * cfg.ffn, cfg.hidden, generator=gen, device=device).mul_(0.02)
    down = torch.randn(cfg.experts, cfg.hidden, cfg.ffn, generator=gen, device=device).mul_(0.02)
    return nn.Parameter(gate_up.to(dtype)), nn.Parameter(down.to(dtype))


@dataclass
class Batch:
    """One T's inputs, shared by every program (``xg`` / ``wg``: the same values with autograd)."""

    x: Tensor
    weights: Tensor
    ids: Tensor
    grad_out: Tensor
    xg: Tensor
    wg: Tensor


def make_batch(cfg: Config, tokens: int, dtype: torch.dtype, device: str) -> Batch:
    """x ~ N(0, 1); routing from random logits: softmax, top-k, renormalized (Mixtral's router)."""
    gen = torch.Generator(device).manual_seed(1000 + tokens)
    x = torch.randn(tokens, cfg.hidden, generator=gen, device=device).to(dtype)
    logits = torch.randn(tokens, cfg.experts, generator=gen, device=device)
    top, ids = torch.topk(logits.softmax(-1), cfg.k, dim=-1)
    weights = (top / top.sum(-1, keepdim=True)).to(dtype)
    grad_out = torch.randn(tokens, cfg.hidden, generator=gen, device=device).to(dtype)
    return Batch(x, weights, ids, grad_out, x.detach().clone().requires_grad_(),
                 weights.detach().clone().requires_grad_())


# ---- the programs ----------------------------------------------------------------------------------


def transformers_experts(cfg: Config, gate_up: nn.Parameter, down: nn.Parameter, impl: str) -> nn.Module:
    """transformers' ``MixtralExperts`` running ``impl`` ("eager" or "grouped_mm") on our Parameters."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=cfg.hidden, intermediate_size=cfg.ffn, num_local_experts=cfg.experts,
                           num_experts_per_tok=cfg.k, hidden_act="silu")
    config._experts_implementation = impl
    with torch.device("meta"):  # no full-size throwaway weights
        module = MixtralExperts(config)
    module.gate_up_proj = gate_up
    module.down_proj = down
    return module


def grouped_mm_path(gate_up: Tensor, x: Tensor) -> str:
    """Which kernel transformers' grouped_mm experts take for these tensors."""
    try:
        from transformers.integrations import moe as tf_moe

        offs = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
        if tf_moe._can_use_grouped_mm(x, gate_up.transpose(-2, -1), offs):
            fn = "torch.nn.functional.grouped_mm" if hasattr(nn.functional, "grouped_mm") else "torch._grouped_mm"
            return f"{fn} (x {str(x.dtype).removeprefix('torch.')})"
        return "transformers' grouped_mm_fallback (a torch.mm loop)"
    except Exception as exc:  # a label only
        return f"unknown ({type(exc).__name__}: {exc})"


Program = Callable[[Tensor, Tensor], Tensor]  # (x, routing weights) -> y


def programs(gate_up: nn.Parameter, down: nn.Parameter, ids: Tensor, modules: dict[str, nn.Module]
             ) -> dict[str, Program]:
    moe_experts = mtmerge.moe_experts
    progs: dict[str, Program] = {"ours": lambda x, w: moe_experts(x, gate_up, down, w, ids)}
    for name, module in modules.items():
        progs[name] = lambda x, w, module=module: module(x, ids, w)
    return progs


def forward(prog: Program, b: Batch, keep: dict[str, Tensor], name: str) -> Callable[[], object]:
    def run() -> None:
        with torch.no_grad():
            keep[name] = prog(b.x, b.weights)

    return run


def forward_backward(prog: Program, b: Batch, gate_up: Tensor, down: Tensor) -> Callable[[], object]:
    def run() -> tuple[Tensor, ...]:
        y = prog(b.xg, b.wg)
        return torch.autograd.grad(y, (b.xg, b.wg, gate_up, down), b.grad_out)

    return run


# ---- the floor --------------------------------------------------------------------------------------


def read_floor_program(gate_up: Tensor, down: Tensor, active: int) -> Callable[[], object]:
    """Reads ``active`` experts' gate_up and down bytes once (int32 ``amax`` over contiguous slices)."""
    words = [as_words(gate_up[:active]), as_words(down[:active])]
    return lambda: [w.amax() for w in words]


def gemm_floor_program(cfg: Config, slots: int, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """One dense matmul with the forward's FLOPs: [slots, H] @ [3F, H]^T into a preallocated output."""
    gen = torch.Generator(device).manual_seed(7)
    a = torch.randn(max(slots, 1), cfg.hidden, generator=gen, device=device).to(dtype)
    w = torch.randn(3 * cfg.ffn, cfg.hidden, generator=gen, device=device).mul_(0.02).to(dtype)
    out = torch.empty(a.shape[0], 3 * cfg.ffn, dtype=dtype, device=device)
    return lambda: torch.matmul(a, w.t(), out=out)


# ---- one row --------------------------------------------------------------------------------------


@dataclass
class Row:
    config: str
    hidden: int
    ffn: int
    experts: int
    k: int
    dtype: str
    threads: int | None
    tokens: int
    active_experts: int
    read_bytes: int
    flops: int
    ms: dict[str, float] = field(default_factory=dict)
    floor_parts: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    max_rel_diff_vs_eager: float | None = None
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Timing:
    measure: Measure  # a program -> ms at the current thread count
    floor_threads: list[int]  # CPU: the thread counts the read floor tries; GPU: []
    fb_max_tokens: int | None


def run_row(cfg: Config, dtype: torch.dtype, tokens: int, threads: int | None, gate_up: nn.Parameter,
            down: nn.Parameter, modules: dict[str, nn.Module], device: str, timing: Timing) -> Row:
    b = make_batch(cfg, tokens, dtype, device)
    active = int(torch.unique(b.ids).numel()) if tokens else 0
    elsize = gate_up.element_size()
    row = Row(cfg.name, cfg.hidden, cfg.ffn, cfg.experts, cfg.k, str(dtype).removeprefix("torch."), threads, tokens,
              active, active * 3 * cfg.ffn * cfg.hidden * elsize, 6 * tokens * cfg.k * cfg.hidden * cfg.ffn)

    floors = {"read": read_floor_program(gate_up, down, active),
              "gemm": gemm_floor_program(cfg, tokens * cfg.k, dtype, device)}
    for floor_threads in timing.floor_threads or [None]:
        if floor_threads is not None:
            torch.set_num_threads(floor_threads)
        for kind, fn in floors.items():
            row.floor_parts[f"{kind} @{floor_threads}t" if floor_threads else kind] = timing.measure(fn)
    if threads is not None:
        torch.set_num_threads(threads)
    for kind in floors:
        row.ms[f"{kind}_floor"] = min(v for k, v in row.floor_parts.items() if k.startswith(kind))
    row.ms["floor"] = max(row.ms["read_floor"], row.ms["gemm_floor"])

    keep: dict[str, Tensor] = {}
    do_fb = timing.fb_max_tokens is None or tokens <= timing.fb_max_tokens
    runs: dict[str, Callable[[], object]] = {}
    for name, prog in programs(gate_up, down, b.ids, modules).items():
        runs[name] = forward(prog, b, keep, name)
        if do_fb:
            runs[f"{name}_fb"] = forward_backward(prog, b, gate_up, down)
    common.time_programs(row.ms, row.errors, runs, timing.measure, required=("ours", "ours_fb"))
    if "ours" in keep and "eager" in keep:
        row.max_rel_diff_vs_eager = common.rel_diff(keep["ours"], keep["eager"])
    for name in IMPLS:
        if name in row.ms:
            row.ratios[f"{name}/floor"] = row.ms[name] / row.ms["floor"]
    if "ours_fb" in row.ms:
        row.ratios["ours_fb/ours"] = row.ms["ours_fb"] / row.ms["ours"]
    return row


def run_config(cfg: Config, dtype_name: str, thread_counts: Sequence[int | None], tokens: Sequence[int], device: str,
               timing: Timing) -> tuple[list[Row], str]:
    dtype = getattr(torch, dtype_name)
    gate_up, down = make_weights(cfg, dtype, device)
    modules = {impl: transformers_experts(cfg, gate_up, down, impl) for impl in ("eager", "grouped_mm")}
    probe = torch.zeros(1, cfg.hidden, dtype=dtype, device=device)
    path = grouped_mm_path(gate_up, probe)
    rows = []
    for threads in thread_counts:
        if threads is not None:
            torch.set_num_threads(threads)
        for t in tokens:
            start = time.perf_counter()
            rows.append(run_row(cfg, dtype, t, threads, gate_up, down, modules, device, timing))
            print(f"[bench_moe] {cfg.name} {dtype_name} threads={threads} T={t}: {time.perf_counter() - start:.1f} s",
                  file=sys.stderr, flush=True)
    del gate_up, down, modules
    return rows, path


# ---- report ----------------------------------------------------------------------------------------

COLUMNS = ["threads", "T", "active", "ours ms", "eager ms", "grouped_mm ms", "read floor ms", "gemm floor ms",
           "floor ms", "ours/floor", "eager/floor", "grouped/floor", "ours fb ms", "eager fb ms", "grouped_mm fb ms",
           "ours fb/fwd"]


def table_cells(r: Row) -> list[Any]:
    def ms(key: str) -> Any:
        return r.ms.get(key, "-")

    def ratio(key: str) -> Any:
        return r.ratios.get(key, "-")

    return [r.threads if r.threads is not None else "-", r.tokens, r.active_experts, ms("ours"), ms("eager"),
            ms("grouped_mm"), ms("read_floor"), ms("gemm_floor"), ms("floor"), ratio("ours/floor"),
            ratio("eager/floor"), ratio("grouped_mm/floor"), ms("ours_fb"), ms("eager_fb"), ms("grouped_mm_fb"),
            ratio("ours_fb/ours")]


def print_tables(rows: list[Row], paths: dict[tuple[str, str], str]) -> None:
    for (config, dtype), group in common.grouped(rows, lambda r: (r.config, r.dtype)).items():
        r0 = group[0]
        print(f"\n### {config} (H={r0.hidden}, F={r0.ffn}, E={r0.experts}, k={r0.k}), {dtype}\n")
        print(markdown_table(COLUMNS, [table_cells(r) for r in group]))
        print()
        print(f"- grouped_mm ran {paths[(config, dtype)]}")
        diffs = [r.max_rel_diff_vs_eager for r in group if r.max_rel_diff_vs_eager is not None]
        if diffs:
            print(f"- forward outputs: max |ours - eager| / max |eager| over the rows = {max(diffs):.2e}")
        for r in group:
            if r.threads is not None:
                parts = ", ".join(f"{k} {v:.3f}" for k, v in r.floor_parts.items())
                print(f"- T={r.tokens}, {r.threads} thread(s): floor candidates, ms: {parts}")
        for r in group:
            for name, err in r.errors.items():
                print(f"- T={r.tokens}: {name} failed: {err}")


def target_checks(r: Row) -> tuple[str, list[str]]:
    """The row's label and its checks of the issue's targets (``ok`` / ``MISS``)."""
    checks = []
    to_floor = r.ratios["ours/floor"]
    checks.append(f"ours/floor {to_floor:.2f} {check(to_floor <= FLOOR_TARGET)}")
    for peer in ("eager", "grouped_mm"):
        for suffix, label in (("", "fwd"), ("_fb", "fb")):
            if peer + suffix in r.ms and "ours" + suffix in r.ms:
                speedup = r.ms[peer + suffix] / r.ms["ours" + suffix]
                checks.append(f"{peer}/ours {label} {speedup:.2f} {check(speedup >= 1)}")
    if "ours_fb/ours" in r.ratios:
        fb = r.ratios["ours_fb/ours"]
        checks.append(f"fb/fwd {fb:.2f} {check(fb <= FB_TARGET)}")
    return f"{r.config}, {r.dtype}, {r.threads} thread(s), T={r.tokens}", checks


def print_targets(rows: list[Row]) -> list[str]:
    """One line per row: the issue's targets, ``ok`` / ``MISS``; returns the misses."""
    return common.print_targets("forward <= 1.3x floor; ours <= eager and grouped_mm, fwd and fwd+bwd; fwd+bwd <= "
                                "3.5x fwd", map(target_checks, rows))


def backend_label(device: str) -> str:
    try:
        return _library.backends()["moe"]["moe_experts"][device]
    except (KeyError, TypeError):
        return "not registered (the moe family is missing)"


def payload(args: argparse.Namespace, rows: list[Row], paths: dict[tuple[str, str], str], device_name: str,
            extra: dict[str, Any]) -> dict[str, Any]:
    import transformers

    return {"bench": "moe", "device": device_name, "torch": torch.__version__,
            "transformers": transformers.__version__, "ours_backend": backend_label(args.device),
            "grouped_mm_path": {f"{c}/{d}": p for (c, d), p in paths.items()}, **extra,
            "preallocated": ["gate_up", "down", "x", "weights", "ids", "grad_out", "gemm floor operands and output"],
            "rows": [asdict(r) for r in rows]}


# ---- modes --------------------------------------------------------------------------------------------


def select_configs(args: argparse.Namespace) -> list[Config]:
    custom = [args.hidden, args.ffn, args.experts, args.topk]
    if any(v is not None for v in custom):
        base = QUICK if args.quick else CONFIGS["mixtral"]
        return [Config("custom", args.hidden or base.hidden, args.ffn or base.ffn, args.experts or base.experts,
                       args.topk or base.k)]
    if args.quick:
        return [QUICK]
    return [CONFIGS[name] for name in args.configs]


def run_all(args: argparse.Namespace, thread_counts: Sequence[int | None], timing: Timing
            ) -> tuple[list[Row], dict[tuple[str, str], str]]:
    rows: list[Row] = []
    paths: dict[tuple[str, str], str] = {}
    for cfg in select_configs(args):
        for dtype_name in args.dtypes:
            cfg_rows, path = run_config(cfg, dtype_name, thread_counts, args.tokens, args.device, timing)
            rows += cfg_rows
            paths[(cfg.name, dtype_name)] = path
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return rows, paths


def gpu_main(args: argparse.Namespace) -> dict[str, Any]:
    device_name = require_gpu(args.device)
    print(common.gpu_header(device_name, f"moe_experts on {args.device}: {backend_label(args.device)}", args))
    timing = Timing(common.gpu_measure(args), [], args.fb_max_tokens)
    rows, paths = run_all(args, [None], timing)
    print_tables(rows, paths)
    print_targets(rows)
    result = payload(args, rows, paths, device_name, {})
    write_json(args.json, result)
    return result


def cpu_main(args: argparse.Namespace) -> dict[str, Any]:
    isa = common.isa_summary()
    flush_bytes, flush = common.cache_flush(not args.no_flush)
    print(common.cpu_header(f"moe_experts on CPU: {backend_label('cpu')}", isa, args, flush_bytes))
    print("Preallocated, shared by every program: gate_up, down (the transformers modules hold these Parameters), "
          "x, routing weights (x's dtype) and ids (int64), grad_out, the gemm floor's operands and output; "
          "outputs and gradients are allocated by each call")
    if args.fb_max_tokens is not None:
        print(f"Forward + backward only for T <= {args.fb_max_tokens} (--fb-max-tokens)")
    timing = Timing(common.cpu_measure(args, flush), [], args.fb_max_tokens)

    rows: list[Row] = []
    paths: dict[tuple[str, str], str] = {}
    for threads in args.threads:
        timing.floor_threads = sorted({1, threads})  # see the read floor in the docstring
        part_rows, part_paths = run_all(args, [threads], timing)
        rows += part_rows
        paths.update(part_paths)
    order = {c.name: i for i, c in enumerate(select_configs(args))}
    rows.sort(key=lambda r: (order[r.config], args.dtypes.index(r.dtype), r.threads or 0, r.tokens))
    print_tables(rows, paths)
    print(f"\nLoad average at the end: {common.load_average()}")
    print_targets(rows)
    result = payload(args, rows, paths, "cpu", common.cpu_figures(isa, flush_bytes))
    write_json(args.json, result)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--hidden", type=int, default=None, help="a custom config's H (replaces --configs)")
    parser.add_argument("--ffn", type=int, default=None, help="a custom config's F")
    parser.add_argument("--experts", type=int, default=None, help="a custom config's E")
    parser.add_argument("--topk", type=int, default=None, help="a custom config's k")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help=f"T values (default {list(TOKENS)})")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--fb-max-tokens", type=int, default=None, help="forward + backward only up to this T")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: H={QUICK.hidden} F={QUICK.ffn} E={QUICK.experts} k={QUICK.k} unless given, "
                             "T = 1 and 16 unless given, 3 repeats")
    common.add_mode_args(parser)
    args = parser.parse_args(argv)
    if not hasattr(mtmerge, "moe_experts"):
        raise SystemExit("mtmerge.moe_experts is missing: this mtmerge has no moe family")
    if args.tokens is None:
        args.tokens = [1, 16] if args.quick else list(TOKENS)
    return common.run_mode(args, cpu_main, gpu_main)


if __name__ == "__main__":
    main()
