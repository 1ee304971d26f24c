"""Op machinery: registers a family's op specs with ``torch.library`` and loads ``mtmerge._C``.

Every op is described once by an :class:`OpSpec` in its family's spec module
(``mtmerge/ops/_merge_ops.py``, later ``_moe_ops.py``, ``_lowrank_ops.py``). Registering a
family gives each op, in the ``mtmerge`` namespace (``torch.ops.mtmerge.<name>``):

* **CPU** -> the C++ kernel in ``mtmerge._C``: ``csrc/<family>/bindings.cpp`` registers it with
  ``TORCH_LIBRARY_IMPL(mtmerge, CPU, m)`` when :func:`load_extension` imports ``_C``; no Python
  sits between the dispatcher and the kernel.
* **CUDA** -> the spec's GPU implementation: a Triton launcher (imported on first use, so
  importing mtmerge never imports triton), or a native CUDA kernel registered by ``_C``.
* **every other backend, and CPU when ``_C`` is missing** -> the PyTorch reference, registered
  as ``CompositeExplicitAutograd``; backend-specific kernels take precedence over it.
* **Meta / fake tensors** -> the spec's fake, which checks shapes with ``torch._check`` and
  returns output metadata, so the ops trace under ``torch.compile`` and ``opcheck``.
* **Autograd** -> the spec's ``setup_context`` + ``backward``, for ops that train.

If ``_C`` cannot be loaded (not built, or ``MTMERGE_NO_EXTENSION=1``), one warning is issued
and the CPU ops run on the reference. :func:`backends` reports what each op uses, by family
(``mtmerge info`` prints it).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

NAMESPACE = "mtmerge"


@dataclass(frozen=True)
class Autograd:
    """An op's derivative: ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``
    (see ``torch.library.register_autograd``); the backward is itself built from ops."""

    setup_context: Callable[..., None]
    backward: Callable[..., Any]


@dataclass(frozen=True)
class OpSpec:
    """Everything the dispatcher needs to know about one op, written once.

    Attributes
    ----------
    schema : str
        The full schema, ``"name(Tensor x, ...) -> Tensor"``.
    reference : callable
        The PyTorch reference (``mtmerge/reference/<family>.py``): the truth, and the
        implementation everywhere no kernel is registered.
    fake : callable
        Shape function for fake/meta tensors; validates with ``torch._check``.
    gpu : str or None
        ``"triton:module:function"`` (a Triton launcher), ``"cuda"`` (a native CUDA kernel
        registered by ``_C`` from ``csrc/cuda``) or None (the reference runs on CUDA too).
    autograd : Autograd or None
        The derivative, for ops that train; None for ops that do not.
    """

    schema: str
    reference: Callable[..., Any]
    fake: Callable[..., Any]
    gpu: str | None = None
    autograd: Autograd | None = None

    @property
    def name(self) -> str:
        return self.schema.split("(", 1)[0].strip()


_lib = torch.library.Library(NAMESPACE, "DEF")
_FAMILIES: dict[str, dict[str, OpSpec]] = {}


def triton_available() -> tuple[bool, str]:
    """Whether triton imports here, and its version or the import error."""
    try:
        triton = importlib.import_module("triton")
    except ImportError as exc:
        return False, str(exc)
    return True, triton.__version__


def _triton_launcher(spec: OpSpec) -> Callable[..., Any]:
    """The CUDA implementation of ``spec``: its Triton launcher, imported on first call."""
    _, module_name, func_name = spec.gpu.split(":")

    def launch(*args, **kwargs):
        ok, why = triton_available()
        if not ok:
            warnings.warn(f"triton is not installed ({why}); mtmerge::{spec.name} runs on the reference on CUDA",
                          RuntimeWarning, stacklevel=2)
            return spec.reference(*args, **kwargs)
        return getattr(importlib.import_module(module_name), func_name)(*args, **kwargs)

    launch.__name__ = f"{spec.name}_cuda"
    return launch


def register_family(family: str, specs: Sequence[OpSpec]) -> None:
    """Define every op of ``family`` in the ``mtmerge`` namespace with all its implementations.

    Call once per family, before :func:`load_extension` (``_C``'s CPU kernels attach to these
    schemas).
    """
    if family in _FAMILIES:
        raise RuntimeError(f"op family {family!r} is already registered")
    table = {}
    for spec in specs:
        name = spec.name
        if any(name in ops for ops in _FAMILIES.values()) or name in table:
            raise RuntimeError(f"op {name!r} is defined twice")
        _lib.define(spec.schema)
        qualified = f"{NAMESPACE}::{name}"
        _lib.impl(name, spec.reference, "CompositeExplicitAutograd")
        torch.library.register_fake(qualified, spec.fake, lib=_lib)
        if spec.gpu is not None and spec.gpu.startswith("triton:"):
            _lib.impl(name, _triton_launcher(spec), "CUDA")
        elif spec.gpu not in (None, "cuda"):
            raise ValueError(f"{name}: gpu must be 'triton:module:function', 'cuda' or None, got {spec.gpu!r}")
        if spec.autograd is not None:
            torch.library.register_autograd(qualified, spec.autograd.backward,
                                            setup_context=spec.autograd.setup_context, lib=_lib)
        table[name] = spec
    _FAMILIES[family] = table


# ---- CPU: the compiled extension ------------------------------------------------------------

_C: Any = None
EXTENSION_ERROR: str | None = "not loaded yet"


def load_extension() -> Any:
    """Import ``mtmerge._C`` once (it registers the CPU kernels); warn once if it is missing."""
    global _C, EXTENSION_ERROR
    if EXTENSION_ERROR != "not loaded yet":
        return _C
    if os.environ.get("MTMERGE_NO_EXTENSION", "0") == "1":
        _C, EXTENSION_ERROR = None, "MTMERGE_NO_EXTENSION=1 is set"
    else:
        try:
            _C, EXTENSION_ERROR = importlib.import_module("mtmerge._C"), None
        except (ImportError, OSError, RuntimeError) as exc:  # RuntimeError: a stale build's schemas disagree
            _C, EXTENSION_ERROR = None, str(exc)
    if _C is None:
        warnings.warn(
            f"mtmerge._C is not available ({EXTENSION_ERROR}); mtmerge CPU ops run on the slow PyTorch "
            "reference. Build it with: pip install --no-build-isolation .",
            RuntimeWarning,
            stacklevel=2,
        )
    return _C


# ---- reports --------------------------------------------------------------------------------


def cpu_kernel_registered(name: str) -> bool:
    """True when a CPU-specific kernel (the C++ one) is registered for ``mtmerge::name``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CPU")


def _cuda_backend(spec: OpSpec, triton_ok: bool) -> str:
    if spec.gpu is None:
        return "reference (PyTorch)"
    if spec.gpu == "cuda":
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{spec.name}", "CUDA")
        return "CUDA C++ (mtmerge._C)" if registered else "reference (CUDA kernels not built)"
    return "Triton (mtmerge.kernels)" if triton_ok else "reference (triton missing)"


def backends() -> dict[str, dict[str, dict[str, str]]]:
    """``{family: {op: {"cpu": ..., "cuda": ..., "other": ..., "autograd": ...}}}``: which
    implementation each op dispatches to, per device type."""
    triton_ok, _ = triton_available()
    return {
        family: {
            name: {
                "cpu": "C++ (mtmerge._C)" if cpu_kernel_registered(name) else "reference (PyTorch)",
                "cuda": _cuda_backend(spec, triton_ok),
                "other": "reference (PyTorch)",
                "autograd": "yes" if spec.autograd is not None else "no",
            }
            for name, spec in ops.items()
        }
        for family, ops in _FAMILIES.items()
    }


def families() -> dict[str, list[str]]:
    """The registered families and their op names, in registration order."""
    return {family: list(ops) for family, ops in _FAMILIES.items()}


def op_names() -> list[str]:
    """Every registered op, all families."""
    return [name for ops in _FAMILIES.values() for name in ops]


def spec(name: str) -> OpSpec:
    """The :class:`OpSpec` of op ``name``."""
    for ops in _FAMILIES.values():
        if name in ops:
            return ops[name]
    raise KeyError(f"no mtmerge op named {name!r}")
