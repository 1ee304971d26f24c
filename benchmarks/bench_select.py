"""Benchmark: exact top-k magnitude selection vs torch.kthvalue, torch.topk and the read floor.

All timings run in one process on the same tensor; the report gives ratios, which survive
the noise of a shared machine better than absolute times. Medians of several repeats.

    python benchmarks/bench_select.py                 # 16M elements, fp32 + bf16, k = 20%
    python benchmarks/bench_select.py --quick         # 1M elements, for the demo
    python benchmarks/bench_select.py --threads 1 2   # thread scaling
    python benchmarks/bench_select.py --gpu           # GPU mode: Triton on CUDA, do_bench

GPU mode (``--gpu``, sizes ``--gpu-sizes``, default 1M and 16M): the same selection on CUDA
tensors (the Triton kernels) against ``torch.kthvalue`` / ``torch.topk`` on the GPU and the read
floor, timed with ``triton.testing.do_bench``; ``--json PATH`` writes the figures.

Baselines (on a = |x| computed once beforehand, so they are not charged for the abs):
``torch.kthvalue(a, n - k + 1)`` (the same threshold), ``torch.topk(a, k)``, and the read
floor ``x.sum()`` (one pass over the input at memory speed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import mtmerge

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_mode import bench_ms, markdown_table, require_gpu, write_json  # noqa: E402


@dataclass(frozen=True)
class Case:
    numel: int
    dtype: torch.dtype
    density: float
    threads: int


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(case: Case, repeats: int, slow_repeats: int, with_baselines: bool) -> dict[str, float]:
    torch.set_num_threads(case.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.numel, generator=gen).to(case.dtype)
    a = x.abs()
    n = x.numel()
    k = int(case.density * n)
    result = {
        "read_floor": median_seconds(lambda: x.sum(), repeats),
        "threshold": median_seconds(lambda: mtmerge.magnitude_threshold(x, k), repeats),
        "topk_mask": median_seconds(lambda: mtmerge.topk_mask(x, k), repeats),
        "topk_mask_packed": median_seconds(lambda: mtmerge.topk_mask(x, k, packed=True), repeats),
    }
    if with_baselines:
        result["torch.kthvalue"] = median_seconds(lambda: torch.kthvalue(a, n - k + 1), slow_repeats, warmup=0)
        result["torch.topk"] = median_seconds(lambda: torch.topk(a, k), slow_repeats, warmup=0)
        # the same answer, or the benchmark is meaningless
        expected = torch.kthvalue(a.float(), n - k + 1).values
        got = mtmerge.magnitude_threshold(x, k).threshold.float()
        if not torch.equal(expected, got):
            raise AssertionError(f"threshold mismatch: torch {expected.item()} vs mtmerge {got.item()}")
    return result


def format_table(rows: list[tuple[Case, dict[str, float]]]) -> str:
    header = (f"{'dtype':<9}{'numel':>10}{'thr':>4}{'floor ms':>10}{'select ms':>11}{'x floor':>9}"
              f"{'mask ms':>9}{'packed ms':>11}{'kthvalue ms':>13}{'kth/sel':>9}{'topk ms':>9}{'topk/sel':>10}")
    lines = [header, "-" * len(header)]
    for case, r in rows:
        sel = r["threshold"]
        kth = r.get("torch.kthvalue")
        topk = r.get("torch.topk")
        lines.append(
            f"{str(case.dtype).removeprefix('torch.'):<9}{case.numel:>10}{case.threads:>4}"
            f"{r['read_floor'] * 1e3:>10.2f}{sel * 1e3:>11.2f}{sel / r['read_floor']:>9.2f}"
            f"{r['topk_mask'] * 1e3:>9.2f}{r['topk_mask_packed'] * 1e3:>11.2f}"
            + (f"{kth * 1e3:>13.1f}{kth / sel:>9.1f}{topk * 1e3:>9.1f}{topk / sel:>10.1f}" if kth else "")
        )
    return "\n".join(lines)


def gpu_main(args: argparse.Namespace) -> dict:
    device_name = require_gpu(args.device)
    print(f"mtmerge {mtmerge.__version__}, torch {torch.__version__}, {device_name}; k = {args.density:.0%} of n; "
          "do_bench medians in ms")
    rows = []
    for dtype_name in args.dtypes:
        for n in args.gpu_sizes:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, generator=gen).to(getattr(torch, dtype_name)).to(args.device)
            a = x.abs()
            k = int(args.density * n)
            ms = {
                "read_floor": bench_ms(lambda x=x: x.sum()),
                "threshold": bench_ms(lambda x=x, k=k: mtmerge.magnitude_threshold(x, k)),
                "topk_mask": bench_ms(lambda x=x, k=k: mtmerge.topk_mask(x, k)),
                "topk_mask_packed": bench_ms(lambda x=x, k=k: mtmerge.topk_mask(x, k, packed=True)),
            }
            if not args.no_baselines:
                ms["torch.kthvalue"] = bench_ms(lambda a=a, n=n, k=k: torch.kthvalue(a.float(), n - k + 1))
                ms["torch.topk"] = bench_ms(lambda a=a, k=k: torch.topk(a, k))
                want = torch.kthvalue(a.float(), n - k + 1).values
                got = mtmerge.magnitude_threshold(x, k).threshold.float()
                if not torch.equal(want, got):
                    raise AssertionError(f"threshold mismatch on {args.device}: torch {want.item()} vs {got.item()}")
            rows.append({"dtype": dtype_name, "size": n, "ms": ms})
    table = [[r["dtype"], r["size"], r["ms"]["read_floor"], r["ms"]["threshold"],
              r["ms"]["threshold"] / r["ms"]["read_floor"], r["ms"]["topk_mask"], r["ms"]["topk_mask_packed"],
              r["ms"].get("torch.kthvalue", float("nan")), r["ms"].get("torch.topk", float("nan"))] for r in rows]
    print(markdown_table(["dtype", "n", "floor ms", "select ms", "x floor", "mask ms", "packed ms", "kthvalue ms",
                          "topk ms"], table))
    result = {"bench": "select", "device": device_name, "torch": torch.__version__, "rows": rows}
    write_json(args.json, result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--slow-repeats", type=int, default=3, help="repeats of kthvalue/topk")
    parser.add_argument("--no-baselines", action="store_true", help="skip kthvalue/topk (slow)")
    parser.add_argument("--quick", action="store_true", help="1M elements, few repeats")
    parser.add_argument("--gpu", action="store_true", help="GPU mode: Triton on CUDA timed by do_bench")
    parser.add_argument("--gpu-sizes", type=int, nargs="+", default=[1 << 20, 1 << 24])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="GPU mode's device (cpu: a smoke run of the script, not GPU figures)")
    parser.add_argument("--json", default=None, help="write the GPU mode's figures to this file")
    args = parser.parse_args(argv)
    if args.gpu:
        gpu_main(args)
        return
    if args.quick:
        args.numel, args.repeats, args.slow_repeats = 1 << 20, 5, 1

    print(f"mtmerge {mtmerge.__version__}, torch {torch.__version__}; k = {args.density:.0%} of numel; "
          f"times are medians; 'x floor' = select / read floor (x.sum())")
    rows = []
    for dtype_name in args.dtypes:
        for threads in args.threads:
            case = Case(args.numel, getattr(torch, dtype_name), args.density, threads)
            rows.append((case, run_case(case, args.repeats, args.slow_repeats, not args.no_baselines)))
    print(format_table(rows))


if __name__ == "__main__":
    main()
