"""Benchmark: the low-rank attention family (``multi_lora``, ``linformer_attention``, ``lama_pool``)
vs PEFT, torch SDPA, the best torch composition, the reference and the machine's floor.

Three sections, every program on the same tensors in one process, reported as ratios (which
survive the noise of a shared machine better than absolute times). Times are medians of several
repeats after one warm-up call (a program slower than ``--budget``: that one call).

    python benchmarks/bench_lowrank.py                      # all sections, float32, full sizes
    python benchmarks/bench_lowrank.py --sections lora --dtypes float32 bfloat16 --threads 1 2
    python benchmarks/bench_lowrank.py --quick --json lowrank.json   # tiny sizes: a smoke run
    python benchmarks/bench_lowrank.py --gpu                # GPU mode: Triton on CUDA, do_bench

**lora**: a LoRA-wrapped linear layer, in = out = 2048 (no bias), 8 adapters of rank 16
(alpha 32), saved to disk by peft and loaded by both sides; S = 8 sequences, one adapter per
sequence (all 8 active), T = 8 (one token per sequence: decoding) and 512 tokens in all.

* ``ours``: ``MultiLoRALinear.from_peft(linear, dirs)(x, task_ids)`` = the base GEMM
  (``F.linear``) + ``mtmerge.multi_lora`` on its output;
* ``peft``: peft's mixed-adapter batch ``model(x, adapter_names=[...])`` on the same adapters
  (the base once, then a Python loop over the distinct adapters; peft keeps adapters of a
  bf16 base in float32);
* ``base``: the base GEMM alone; ``floor``: one program running the base GEMM, then reading the
  active adapters' A and B bytes once (``amax`` over their int words) -- any LoRA layer does
  at least this.

Before each timed call (untimed) a buffer twice the L3 size is written, so weights come from
DRAM as when a model cycles through its layers (``--no-flush`` turns this off). Target:
``ours/floor <= 1.1`` at every T.

**linformer**: ``q``, ``k``, ``v`` ``[1, 8, N, 64]``, ``E``, ``F`` ``[256, N]``, N = 1024 ..
8192, forward (no grad) and forward + backward (``torch.autograd.grad`` of q, k, v, E, F with a
fixed ``grad_out``):

* ``ours``: ``mtmerge.linformer_attention(q, k, v, E, F)``; ``ours+mask``: the same with a
  ``key_padding_mask`` whose last N/8 positions are padding (the composition has no mask);
* ``comp``: the best composition of torch ops: ``E @ k``, ``F @ v`` (``torch.matmul``, E
  broadcast over batch and heads), then ``F.scaled_dot_product_attention``;
* ``sdpa``: full ``F.scaled_dot_product_attention(q, k, v)`` over all N keys (gradients of q,
  k, v only).

Target: ``ours`` and ``ours+mask`` no slower than ``comp`` at any N, forward and backward.

**lama**: ``h [16, 512, 768]``, ``m = 16`` heads, a mask with the last 64 tokens of every other
row padded, context = the masked mean (computed inside):

* ``ours``: ``mtmerge.lama_pool(h, P, Q, mask=mask)`` and its autograd backward (h, P, Q);
* ``ref``: ``mtmerge.reference.lowrank.lama_pool`` and, for forward + backward, that forward
  plus the reference's hand-written ``lama_pool_backward``;
* ``eager``: autograd through the reference forward (what a plain PyTorch user runs; forward +
  backward only).

Target: ``ref/ours >= 2``, forward and forward + backward.

Each row also gives the largest relative difference of ``ours`` against its peer (``peft``,
``comp`` without mask, ``ref``). The header names the ISA (``lscpu`` flags) and which backend
each op runs (``mtmerge._library.backends()``: C++ kernels or, before they are built, the
reference -- then ``ours`` is the reference and the ratios say so).

GPU mode (``--gpu``): the same programs on CUDA tensors (``torch.ops.mtmerge.*`` run the Triton
kernels), timed by ``triton.testing.do_bench`` medians (``benchmarks/gpu_mode.py``);
``--device cpu`` runs that code path on CPU tensors as a smoke test. ``--json PATH`` writes the
figures in both modes. ``--quick``: tiny sizes of every section, 3 repeats.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import mtmerge
from mtmerge import _library
from mtmerge.reference import lowrank as ref_lowrank

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_lowrank.py`
    sys.path.insert(0, str(ROOT))

from benchmarks import _common as common  # noqa: E402
from benchmarks._common import Measure, as_words, check, rel_diff  # noqa: E402
from benchmarks.gpu_mode import markdown_table, require_gpu, write_json  # noqa: E402
from mtmerge.nn.multi_lora import MultiLoRALinear  # noqa: E402

SECTIONS = ("lora", "linformer", "lama")
LORA_TARGET = 1.1
LAMA_TARGET = 2.0
OPS = ("multi_lora", "linformer_attention", "lama_pool")


@dataclass(frozen=True)
class Sizes:
    """Every section's shapes (full or ``--quick``)."""

    lora_features: int = 2048
    lora_adapters: int = 8
    lora_rank: int = 16
    lora_tokens: tuple[int, ...] = (8, 512)
    lin_heads: int = 8
    lin_head_dim: int = 64
    lin_rank: int = 256
    lin_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    lama_batch: int = 16
    lama_tokens: int = 512
    lama_dim: int = 768
    lama_heads: int = 16


FULL = Sizes()
QUICK = Sizes(lora_features=128, lora_adapters=4, lora_rank=8, lora_tokens=(8, 64), lin_heads=2, lin_head_dim=16,
              lin_rank=32, lin_lengths=(128, 256), lama_batch=2, lama_tokens=64, lama_dim=32, lama_heads=4)


@dataclass
class Row:
    section: str
    dtype: str
    threads: int | None
    shape: dict[str, int]
    ms: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    max_rel_diff: float | None = None
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Timing:
    measure: Measure  # a program -> ms at the current thread count
    device: str


def _time_all(row: Row, programs: dict[str, Callable[[], object]], timing: Timing, required: Sequence[str]) -> None:
    """Time every program into ``row.ms``; a peer that fails is reported, ours re-raises."""
    common.time_programs(row.ms, row.errors, programs, timing.measure, required)


def _ratio(row: Row, num: str, den: str) -> None:
    if num in row.ms and den in row.ms:
        row.ratios[f"{num}/{den}"] = row.ms[num] / row.ms[den]


# ---- lora ---------------------------------------------------------------------------------------------


def _peft_peer():
    from benchmarks.gpu_mode import add_repo_root_to_path

    add_repo_root_to_path()
    from tests.peers import peft_lora

    return peft_lora


def lora_rows(sizes: Sizes, dtype: torch.dtype, threads: int | None, timing: Timing) -> list[Row]:
    """Adapters saved by peft and loaded by both sides; without peft (a machine that lacks it),
    random adapters in ``MultiLoRALinear`` only and the peft column reported as unavailable."""
    peer = _peft_peer()
    n, num_adapters, r = sizes.lora_features, sizes.lora_adapters, sizes.lora_rank
    torch.manual_seed(0)
    linear = nn.Linear(n, n, bias=False)
    model = None
    if peer.PEFT is None:
        linear = linear.to(device=timing.device, dtype=dtype)
        layer = MultiLoRALinear(linear, num_adapters, r, alpha=2 * r, shared_adapter=False, seed=0).eval()
        with torch.no_grad():
            layer.lora_B.normal_(0.0, 0.02)
        names = [f"adapter{i}" for i in range(num_adapters)]
        layer.task_names = names
    else:
        with tempfile.TemporaryDirectory() as tmp:
            dirs = [peer.save_random_adapter(linear, Path(tmp) / f"adapter{i}", r=r, alpha=2 * r, seed=i, std=0.02)
                    for i in range(num_adapters)]
            names = [d.name for d in dirs]
            linear = linear.to(device=timing.device, dtype=dtype)
            model = peer.load_mixed(linear, dirs, names).to(timing.device)
            layer = MultiLoRALinear.from_peft(linear, dirs).eval()
    return [lora_row(layer, model, names, tokens, threads, timing, peer) for tokens in sizes.lora_tokens]


def lora_row(layer: MultiLoRALinear, model: nn.Module | None, names: list[str], tokens: int, threads: int | None,
             timing: Timing, peer) -> Row:
    """One T: ``min(L, T)`` sequences of ``T / S`` tokens, sequence ``i`` on adapter ``i % L``."""
    n, num_adapters, r = layer.in_features, layer.num_tasks, layer.r
    seqs = min(num_adapters, tokens)
    gen = torch.Generator(timing.device).manual_seed(tokens)
    x = torch.randn(seqs, tokens // seqs, n, generator=gen, device=timing.device).to(layer.lora_A.dtype)
    adapter_names = [names[i % num_adapters] for i in range(seqs)]
    ids = layer.task_ids_for(adapter_names)
    active = len(set(adapter_names))
    weight = layer.base_layer.weight
    words = [as_words(layer.lora_A[:active]), as_words(layer.lora_B[:active])]
    row = Row("lora", str(x.dtype).removeprefix("torch."), threads,
              {"in": n, "out": layer.out_features, "adapters": num_adapters, "rank": r,
               "tokens": x.shape[0] * x.shape[1], "sequences": seqs, "active": active})
    keep: dict[str, Tensor] = {}

    def ours() -> None:
        keep["ours"] = layer(x, ids)

    def peft() -> None:
        keep["peft"] = peer.mixed_forward(model, x, adapter_names)

    programs = {"base": lambda: F.linear(x, weight),
                "floor": lambda: (F.linear(x, weight), [w.amax() for w in words]),
                "ours": ours}
    if model is not None:
        programs["peft"] = peft
    else:
        row.errors["peft"] = f"unavailable: {peer.UNAVAILABLE}"
    with torch.no_grad():
        _time_all(row, programs, timing, required=("base", "floor", "ours"))
    if "peft" in keep:
        row.max_rel_diff = rel_diff(keep["ours"], keep["peft"])
    for name in ("ours", "peft", "base"):
        _ratio(row, name, "floor")
    _ratio(row, "peft", "ours")
    return row


# ---- linformer ----------------------------------------------------------------------------------------


def composition(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F_: Tensor) -> Tensor:
    """Linformer as torch ops: ``E @ k``, ``F @ v`` (E broadcast over batch and heads), SDPA."""
    return F.scaled_dot_product_attention(q, torch.matmul(E, k), torch.matmul(F_, v))


def linformer_rows(sizes: Sizes, dtype: torch.dtype, threads: int | None, timing: Timing) -> list[Row]:
    return [linformer_row(sizes, n, dtype, threads, timing) for n in sizes.lin_lengths]


def linformer_row(sizes: Sizes, n: int, dtype: torch.dtype, threads: int | None, timing: Timing) -> Row:
    """One N: q, k, v ``[1, Hh, N, d]``, E, F ``[r, N]`` ~ N(0, 1/N), the mask's last N/8 padded."""
    heads, d, r = sizes.lin_heads, sizes.lin_head_dim, sizes.lin_rank
    dev = timing.device
    gen = torch.Generator(dev).manual_seed(n)

    def rand(*shape: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, device=dev) * std).to(dtype)

    q, k, v = rand(1, heads, n, d), rand(1, heads, n, d), rand(1, heads, n, d)
    E, F_ = rand(r, n, std=n ** -0.5), rand(r, n, std=n ** -0.5)
    grad_out = rand(1, heads, n, d)
    mask = torch.zeros(1, n, dtype=torch.bool, device=dev)
    mask[:, n - n // 8:] = True
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, E, F_)]
    qg, kg, vg, Eg, Fg = leaves
    row = Row("linformer", str(dtype).removeprefix("torch."), threads,
              {"batch": 1, "heads": heads, "head_dim": d, "rank": r, "N": n})
    lin = mtmerge.linformer_attention
    keep: dict[str, Tensor] = {}

    def fwd(fn: Callable[[], Tensor], name: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                keep[name] = fn()

        return run

    def fb(fn: Callable[[], Tensor], inputs: Sequence[Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(fn(), inputs, grad_out)

    programs = {
        "ours": fwd(lambda: lin(q, k, v, E, F_), "ours"),
        "ours+mask": fwd(lambda: lin(q, k, v, E, F_, key_padding_mask=mask), "ours+mask"),
        "comp": fwd(lambda: composition(q, k, v, E, F_), "comp"),
        "sdpa": fwd(lambda: F.scaled_dot_product_attention(q, k, v), "sdpa"),
        "ours_fb": fb(lambda: lin(qg, kg, vg, Eg, Fg), leaves),
        "ours+mask_fb": fb(lambda: lin(qg, kg, vg, Eg, Fg, key_padding_mask=mask), leaves),
        "comp_fb": fb(lambda: composition(qg, kg, vg, Eg, Fg), leaves),
        "sdpa_fb": fb(lambda: F.scaled_dot_product_attention(qg, kg, vg), leaves[:3]),
    }
    _time_all(row, programs, timing, required=("ours", "ours+mask", "ours_fb", "ours+mask_fb"))
    if "comp" in keep:
        row.max_rel_diff = rel_diff(keep["ours"], keep["comp"])
    for suffix in ("", "_fb"):
        for name in ("ours", "ours+mask", "sdpa"):
            _ratio(row, name + suffix, "comp" + suffix)
    return row


# ---- lama ---------------------------------------------------------------------------------------------


def lama_rows(sizes: Sizes, dtype: torch.dtype, threads: int | None, timing: Timing) -> list[Row]:
    b, t, dim, m = sizes.lama_batch, sizes.lama_tokens, sizes.lama_dim, sizes.lama_heads
    dev = timing.device
    gen = torch.Generator(dev).manual_seed(3)
    h = torch.randn(b, t, dim, generator=gen, device=dev).to(dtype)
    P = (torch.randn(dim, m, generator=gen, device=dev) * dim ** -0.5).to(dtype)
    Q = (torch.randn(dim, m, generator=gen, device=dev) * dim ** -0.5).to(dtype)
    mask = torch.ones(b, t, dtype=torch.bool, device=dev)
    mask[::2, t - t // 8:] = False
    grad_attn = torch.randn(b, m, t, generator=gen, device=dev)
    grad_pooled = torch.randn(b, m, dim, generator=gen, device=dev).to(dtype)
    leaves = [x.detach().clone().requires_grad_() for x in (h, P, Q)]
    hg, Pg, Qg = leaves
    row = Row("lama", str(dtype).removeprefix("torch."), threads, {"batch": b, "tokens": t, "dim": dim, "heads": m})
    keep: dict[str, Tensor] = {}

    def ours() -> None:
        with torch.no_grad():
            keep["ours"] = mtmerge.lama_pool(h, P, Q, mask=mask).pooled

    def ref() -> None:
        keep["ref"] = ref_lowrank.lama_pool(h, P, Q, mask, None)[1]

    def ours_fb() -> object:
        attn, pooled = mtmerge.lama_pool(hg, Pg, Qg, mask=mask)
        return torch.autograd.grad((attn, pooled), leaves, (grad_attn.to(attn.dtype), grad_pooled))

    def ref_fb() -> object:
        attn, _ = ref_lowrank.lama_pool(h, P, Q, mask, None)
        return ref_lowrank.lama_pool_backward(grad_attn.to(attn.dtype), grad_pooled, h, P, Q, mask, None)

    def eager_fb() -> object:
        attn, pooled = ref_lowrank.lama_pool(hg, Pg, Qg, mask, None)
        return torch.autograd.grad((attn, pooled), leaves, (grad_attn.to(attn.dtype), grad_pooled))

    with torch.no_grad():
        _time_all(row, {"ours": ours, "ref": ref}, timing, required=("ours",))
    _time_all(row, {"ours_fb": ours_fb, "ref_fb": ref_fb, "eager_fb": eager_fb}, timing, required=("ours_fb",))
    if "ref" in keep:
        row.max_rel_diff = rel_diff(keep["ours"], keep["ref"])
    _ratio(row, "ref", "ours")
    _ratio(row, "ref_fb", "ours_fb")
    _ratio(row, "eager_fb", "ours_fb")
    return [row]


RUNNERS = {"lora": lora_rows, "linformer": linformer_rows, "lama": lama_rows}


# ---- report -------------------------------------------------------------------------------------------

TABLES = {
    "lora": (["T", "seqs", "active"], lambda r: [r.shape["tokens"], r.shape["sequences"], r.shape["active"]],
             ["ours", "peft", "base", "floor"], ["ours/floor", "peft/floor", "base/floor", "peft/ours"]),
    "linformer": (["N"], lambda r: [r.shape["N"]],
                  ["ours", "ours+mask", "comp", "sdpa", "ours_fb", "ours+mask_fb", "comp_fb", "sdpa_fb"],
                  ["ours/comp", "ours+mask/comp", "sdpa/comp", "ours_fb/comp_fb", "ours+mask_fb/comp_fb",
                   "sdpa_fb/comp_fb"]),
    "lama": (["B", "T", "D", "m"], lambda r: [r.shape["batch"], r.shape["tokens"], r.shape["dim"], r.shape["heads"]],
             ["ours", "ref", "ours_fb", "ref_fb", "eager_fb"], ["ref/ours", "ref_fb/ours_fb", "eager_fb/ours_fb"]),
}
DIFF_PEER = {"lora": "peft", "linformer": "comp (no mask)", "lama": "ref"}


def print_tables(rows: list[Row]) -> None:
    for (section, dtype), group in common.grouped(rows, lambda r: (r.section, r.dtype)).items():
        keys, cells, times, ratios = TABLES[section]
        shape = ", ".join(f"{k}={v}" for k, v in group[0].shape.items() if k not in ("tokens", "sequences", "active",
                                                                                       "N"))
        print(f"\n### {section} ({shape}), {dtype}\n")
        columns = ["threads", *keys, *(f"{t} ms" for t in times), *ratios, f"max rel diff vs {DIFF_PEER[section]}"]
        table = [[r.threads if r.threads is not None else "-", *cells(r), *(r.ms.get(t, "-") for t in times),
                  *(r.ratios.get(x, "-") for x in ratios),
                  f"{r.max_rel_diff:.1e}" if r.max_rel_diff is not None else "-"] for r in group]
        print(markdown_table(columns, table))
        for r in group:
            for name, err in r.errors.items():
                print(f"- {r.shape}: {name} failed: {err}")


def target_checks(r: Row) -> tuple[str, list[str]]:
    """The row's label and its checks of the issue's targets (``ok`` / ``MISS``)."""
    checks = []
    if r.section == "lora":
        checks.append(f"ours/floor {r.ratios['ours/floor']:.2f} {check(r.ratios['ours/floor'] <= LORA_TARGET)}")
        label = f"T={r.shape['tokens']}"
    elif r.section == "linformer":
        for key in ("ours/comp", "ours+mask/comp", "ours_fb/comp_fb", "ours+mask_fb/comp_fb"):
            if key in r.ratios:
                checks.append(f"{key} {r.ratios[key]:.2f} {check(r.ratios[key] <= 1.0)}")
        label = f"N={r.shape['N']}"
    else:
        for key in ("ref/ours", "ref_fb/ours_fb"):
            if key in r.ratios:
                checks.append(f"{key} {r.ratios[key]:.2f} {check(r.ratios[key] >= LAMA_TARGET)}")
        label = f"B={r.shape['batch']} T={r.shape['tokens']}"
    return f"{r.section}, {r.dtype}, {r.threads} thread(s), {label}", checks


def print_targets(rows: list[Row]) -> list[str]:
    """One line per row: the issue's targets, ``ok`` / ``MISS``; returns the misses."""
    return common.print_targets(f"lora: ours/floor <= {LORA_TARGET}; linformer: ours and ours+mask <= comp, fwd and "
                                f"fwd+bwd; lama: ref/ours >= {LAMA_TARGET}, fwd and fwd+bwd", map(target_checks, rows))


def backend_labels(device: str) -> dict[str, str]:
    try:
        table = _library.backends()["lowrank"]
        return {op: table[op][device] for op in OPS}
    except (KeyError, TypeError):
        return dict.fromkeys(OPS, "not registered (the lowrank family is missing)")


def payload(args: argparse.Namespace, rows: list[Row], device_name: str, extra: dict[str, Any]) -> dict[str, Any]:
    peer = _peft_peer()
    return {"bench": "lowrank", "device": device_name, "torch": torch.__version__, "peft": peer.LABEL or
            peer.UNAVAILABLE, "ours_backend": backend_labels(args.device), "quick": bool(args.quick), **extra,
            "rows": [asdict(r) for r in rows]}


# ---- modes --------------------------------------------------------------------------------------------


def run_all(args: argparse.Namespace, thread_counts: Sequence[int | None], timing: Timing) -> list[Row]:
    sizes = QUICK if args.quick else FULL
    if args.lengths:
        sizes = Sizes(**{**asdict(sizes), "lin_lengths": tuple(args.lengths)})
    if args.tokens:
        sizes = Sizes(**{**asdict(sizes), "lora_tokens": tuple(args.tokens)})
    rows: list[Row] = []
    for threads in thread_counts:
        if threads is not None:
            torch.set_num_threads(threads)
        for section in args.sections:
            for dtype_name in args.dtypes:
                rows += RUNNERS[section](sizes, getattr(torch, dtype_name), threads, timing)
                if timing.device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def header(device: str) -> str:
    labels = backend_labels(device)
    return "; ".join(f"{op} on {device}: {label}" for op, label in labels.items())


def gpu_main(args: argparse.Namespace) -> dict[str, Any]:
    device_name = require_gpu(args.device)
    print(common.gpu_header(device_name, header(args.device), args))
    timing = Timing(common.gpu_measure(args), args.device)
    rows = run_all(args, [None], timing)
    print_tables(rows)
    print_targets(rows)
    result = payload(args, rows, device_name, {})
    write_json(args.json, result)
    return result


def cpu_main(args: argparse.Namespace) -> dict[str, Any]:
    isa = common.isa_summary()
    flush_bytes, flush = common.cache_flush(not args.no_flush)
    print(common.cpu_header(header("cpu"), isa, args, flush_bytes, flushed="lora: ",
                            notes=[f"peft: {_peft_peer().LABEL or _peft_peer().UNAVAILABLE}"]))
    plain = Timing(common.cpu_measure(args), "cpu")
    flushed = Timing(common.cpu_measure(args, flush), "cpu")
    rows: list[Row] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for section in args.sections:
            sub = argparse.Namespace(**{**vars(args), "sections": [section]})
            rows += run_all(sub, [threads], flushed if section == "lora" else plain)
    rows.sort(key=lambda r: (SECTIONS.index(r.section), args.dtypes.index(r.dtype), r.threads or 0))
    print_tables(rows)
    print(f"\nLoad average at the end: {common.load_average()}")
    print_targets(rows)
    result = payload(args, rows, "cpu", common.cpu_figures(isa, flush_bytes))
    write_json(args.json, result)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="lora: T values (default 8 512)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="linformer: N values (default 1024 2048 4096 8192)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes of every section, 3 repeats: a smoke run")
    common.add_mode_args(parser, flush_help="lora: ")
    args = parser.parse_args(argv)
    return common.run_mode(args, cpu_main, gpu_main)


if __name__ == "__main__":
    main()
