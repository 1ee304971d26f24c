"""The ``mtmerge`` command (also ``python -m mtmerge``).

Subcommands: ``info`` (build facts, op backends), ``merge CONFIG.yaml -o OUT_DIR`` (the
streaming checkpoint merge, :func:`mtmerge.merge_checkpoints`; under ``torchrun`` it runs
distributed) and ``demo`` (the bundled demo, the package ``mtmerge/demo/``, imported only when run).
Errors a user can fix (bad config, mismatched checkpoints, existing output, disk space) print
one line and exit with 1, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any


def collect_info() -> dict[str, Any]:
    """Versions, build facts, the backend of every op, CPU features, threads, Triton/CUDA."""
    import torch

    import mtmerge
    from mtmerge import _library

    build = dict(_library._C.build_info()) if _library._C is not None else None
    if build is not None:
        build["cpu_features"] = dict(build["cpu_features"])
        build["multiversioned_isas"] = list(build["multiversioned_isas"])
    triton_ok, triton_detail = _library.triton_available()
    return {
        "mtmerge": mtmerge.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": {"torch": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "extension": build if build is not None else {"error": _library.EXTENSION_ERROR},
        "triton": {"usable": triton_ok, "detail": triton_detail,
                   "interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"},
        "cuda": {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                 "devices": torch.cuda.device_count()},
        "ops": _library.backends(),  # {family: {op: {device: backend}}}
    }


def _print_info(info: dict[str, Any]) -> None:
    print(f"mtmerge {info['mtmerge']}  torch {info['torch']}  python {info['python']}  ({info['platform']})")
    threads = info["threads"]
    print(f"threads: torch {threads['torch']}, cpus {threads['cpu_count']}; "
          f"torch CPU capability {info['torch_cpu_capability']}")
    ext = info["extension"]
    if "error" in ext:
        print(f"extension mtmerge._C: MISSING ({ext['error']}) -> CPU ops use the PyTorch reference")
    else:
        features = ", ".join(name for name, on in ext["cpu_features"].items() if on) or "baseline only"
        print(f"extension mtmerge._C: {ext['compiler']}; flags {ext['cxx_flags']}")
        print(f"  OpenMP {'on' if ext['openmp'] else 'OFF'} (max threads {ext['openmp_max_threads']}); "
              f"ISA clones {'/'.join(ext['multiversioned_isas'])}; CPU has {features}; "
              f"CUDA kernels {'built' if ext['cuda'] else 'not built'}")
    tri = info["triton"]
    print(f"triton: {'usable ' + tri['detail'] if tri['usable'] else 'not installed'}"
          f"{' (TRITON_INTERPRET=1)' if tri['interpret'] else ''}")
    cuda = info["cuda"]
    print(f"cuda: {'available, ' + str(cuda['devices']) + ' device(s)' if cuda['available'] else 'not available'}"
          f" (torch built with CUDA {cuda['torch_cuda']})")
    print("ops, by family:")
    width = max((len(name) for ops in info["ops"].values() for name in ops), default=0)
    for family, ops in info["ops"].items():
        print(f"  {family}:")
        for name, where in ops.items():
            grad = "  autograd" if where["autograd"] == "yes" else ""
            print(f"    {name:<{width}}  cpu: {where['cpu']:<22}  cuda: {where['cuda']}{grad}")


def _cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def _error(command: str, exc: BaseException) -> int:
    message = str(exc).strip() or type(exc).__name__
    lines = message.splitlines()
    print(f"mtmerge {command}: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)
    return 1


def _raise_on_sigterm(signum, frame):  # torchrun stops the other ranks with SIGTERM
    raise SystemExit(128 + signum)


def _cmd_merge(args: argparse.Namespace) -> int:
    import signal
    import threading

    from mtmerge.merging import merge_checkpoints

    if args.output is None and not args.dry_run:
        return _error("merge", ValueError("-o/--output OUT_DIR is required (or --dry-run)"))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = merge_checkpoints(args.config, args.output, overwrite=args.overwrite,
                                    max_shard_size=args.max_shard_size, dry_run=args.dry_run,
                                    progress=False if args.no_progress else None, chunk_bytes=args.chunk_size)
    except (ValueError, TypeError, OSError) as exc:  # OSError: FileNotFoundError, FileExistsError, disk space
        return _error("merge", exc) if rank == 0 else 1
    except KeyboardInterrupt:
        print("mtmerge merge: interrupted; no output was written", file=sys.stderr)
        return 130
    if rank == 0:
        print(summary)
    return 0


def _cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        from mtmerge import demo
    except ModuleNotFoundError as exc:
        if exc.name in ("mtmerge.demo",):
            return _error("demo", RuntimeError("the demo is not available in this installation (mtmerge.demo "
                                               "is missing)"))
        return _error("demo", RuntimeError(f"the demo needs {exc.name}: pip install 'mtmerge[demo]'"))
    parser = argparse.ArgumentParser(prog="mtmerge demo", description="Run the bundled demo.")
    demo.add_arguments(parser)
    return demo.run(parser.parse_args(extra))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtmerge", description="Compiled kernels for multi-task models.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, build facts and the backend each op uses")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=_cmd_info)

    merge = sub.add_parser(
        "merge", help="merge safetensors checkpoints as a mergekit-style YAML config says",
        description="Merge local safetensors checkpoints (task_arithmetic, ties, dare_ties, dare_linear, "
                    "consensus_ties, consensus_task_arithmetic), streaming with bounded memory. Run it under "
                    "`torchrun --nproc-per-node N -m mtmerge merge ...` to split the work across processes.")
    merge.add_argument("config", help="the YAML config (mergekit's format: models, base_model, merge_method, "
                                      "parameters, dtype, out_dtype)")
    merge.add_argument("-o", "--output", metavar="OUT_DIR", help="output directory (created atomically)")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists, once the merge is "
                                                                "complete")
    merge.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB = 5*10^9 bytes)")
    merge.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    merge.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    merge.add_argument("--chunk-size", default=None, metavar="SIZE",
                       help="process tensors bigger than this in chunks (default 256MiB); peak memory is about "
                            "(models + 2) x SIZE")
    merge.set_defaults(func=_cmd_merge)

    demo = sub.add_parser("demo", add_help=False, help="run the bundled demo (mtmerge demo --help for its options)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "demo":
        return args.func(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
