"""The ``mtmerge`` command (also ``python -m mtmerge``)."""

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
        "ops": _library.backends(),
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
    print("ops:")
    width = max(len(name) for name in info["ops"])
    for name, where in info["ops"].items():
        print(f"  {name:<{width}}  cpu: {where['cpu']:<22}  cuda: {where['cuda']}")


def _cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtmerge", description="Compiled kernels for multi-task models.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, build facts and the backend each op uses")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
