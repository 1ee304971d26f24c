"""Benchmark: exact top-k magnitude selection vs torch.kthvalue, torch.topk and the read floor.

All timings run in one process on the same tensor; the report gives ratios, which survive
the noise of a shared machine better than absolute times. Medians of several repeats.

    python benchmarks/bench_select.py                 # 16M elements, fp32 + bf16, k = 20%
    python benchmarks/bench_select.py --quick         # 1M elements, for the demo
    python benchmarks/bench_select.py --threads 1 2   # thread scaling

Baselines (on a = |x| computed once beforehand, so they are not charged for the abs):
``torch.kthvalue(a, n - k + 1)`` (the same threshold), ``torch.topk(a, k)``, and the read
floor ``x.sum()`` (one pass over the input at memory speed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import mtmerge


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
    args = parser.parse_args(argv)
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
