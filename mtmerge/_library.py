"""The op registry: every ``mtmerge`` op's schema, defined once, and its implementations.

Each op is a ``torch.library`` op in the ``mtmerge`` namespace (``torch.ops.mtmerge.<name>``):

* **CPU** -> the C++ kernel in ``mtmerge._C``. The C++ sources register themselves with
  ``TORCH_LIBRARY_IMPL(mtmerge, CPU, m)`` when ``_C`` is loaded, which this module does right
  after defining the schemas; no Python sits between the dispatcher and the kernel.
* **CUDA** -> the Triton launcher in ``mtmerge.kernels`` (imported on first use, so importing
  mtmerge never imports triton).
* **every other backend, and CPU when ``_C`` is missing** -> the PyTorch reference in
  ``mtmerge.reference``, registered as ``CompositeExplicitAutograd``; backend-specific kernels
  take precedence over it.
* **Meta / fake tensors** -> shape functions, so the ops trace under ``torch.compile``.

If ``_C`` cannot be loaded (not built, or ``MTMERGE_NO_EXTENSION=1``), one warning is issued
at import and the CPU ops run on the reference. ``backends()`` reports what each op uses
(``mtmerge info`` prints it).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from mtmerge.reference import merge as ref_merge

NAMESPACE = "mtmerge"

# name -> (schema, reference implementation, Triton launcher "module:function")
_OPS: dict[str, tuple[str, Callable[..., Any], str]] = {
    "magnitude_threshold": (
        "magnitude_threshold(Tensor[] xs, int k, str selection='exact') -> (Tensor, Tensor)",
        ref_merge.magnitude_threshold,
        "mtmerge.kernels.merge:magnitude_threshold",
    ),
    "threshold_mask": (
        "threshold_mask(Tensor[] xs, Tensor threshold, Tensor ties_kept, str selection='exact', "
        "bool packed=False) -> Tensor[]",
        ref_merge.threshold_mask,
        "mtmerge.kernels.merge:threshold_mask",
    ),
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, (_schema, _reference, _) in _OPS.items():
    _lib.define(_schema)
    _lib.impl(_name, _reference, "CompositeExplicitAutograd")


# ---- fake (meta) implementations: output metadata only --------------------------------------


@torch.library.register_fake(f"{NAMESPACE}::magnitude_threshold")
def _magnitude_threshold_fake(xs, k, selection="exact"):
    return xs[0].new_empty(()), xs[0].new_empty((), dtype=torch.int64)


@torch.library.register_fake(f"{NAMESPACE}::threshold_mask")
def _threshold_mask_fake(xs, threshold, ties_kept, selection="exact", packed=False):
    if packed:
        return [x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8) for x in xs]
    return [x.new_empty(x.shape, dtype=torch.bool) for x in xs]


# ---- CPU: the compiled extension ------------------------------------------------------------


def _load_extension() -> tuple[Any, str | None]:
    """Import ``mtmerge._C`` (which registers the CPU kernels); return it and why it failed."""
    if os.environ.get("MTMERGE_NO_EXTENSION", "0") == "1":
        return None, "MTMERGE_NO_EXTENSION=1 is set"
    try:
        return importlib.import_module("mtmerge._C"), None
    except ImportError as exc:
        return None, str(exc)


_C, EXTENSION_ERROR = _load_extension()
if _C is None:
    warnings.warn(
        f"mtmerge._C is not available ({EXTENSION_ERROR}); mtmerge CPU ops run on the slow PyTorch "
        "reference. Build it with: pip install --no-build-isolation .",
        RuntimeWarning,
        stacklevel=2,
    )


# ---- CUDA: Triton launchers -----------------------------------------------------------------


def triton_available() -> tuple[bool, str]:
    """Whether triton imports here, and its version or the import error."""
    try:
        triton = importlib.import_module("triton")
    except ImportError as exc:
        return False, str(exc)
    return True, triton.__version__


def _triton_launcher(name: str) -> Callable[..., Any]:
    module_name, func_name = _OPS[name][2].split(":")
    reference = _OPS[name][1]

    def launch(*args, **kwargs):
        ok, why = triton_available()
        if not ok:
            warnings.warn(f"triton is not installed ({why}); mtmerge::{name} runs on the reference on CUDA",
                          RuntimeWarning, stacklevel=2)
            return reference(*args, **kwargs)
        return getattr(importlib.import_module(module_name), func_name)(*args, **kwargs)

    launch.__name__ = f"{name}_cuda"
    return launch


for _name in _OPS:
    _lib.impl(_name, _triton_launcher(_name), "CUDA")


def cpu_kernel_registered(name: str) -> bool:
    """True when a CPU-specific kernel (the C++ one) is registered for ``mtmerge::name``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CPU")


def backends() -> dict[str, dict[str, str]]:
    """Which implementation each op dispatches to, per device type."""
    triton_ok, _ = triton_available()
    table = {}
    for name in _OPS:
        table[name] = {
            "cpu": "C++ (mtmerge._C)" if cpu_kernel_registered(name) else "reference (PyTorch)",
            "cuda": "Triton (mtmerge.kernels)" if triton_ok else "reference (triton missing)",
            "other": "reference (PyTorch)",
        }
    return table


def op_names() -> list[str]:
    return list(_OPS)
