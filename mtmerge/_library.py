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
    # The merge pipeline's building blocks (semantics: mtmerge/reference/merge.py). Task
    # vectors are finetuned[t] - base, formed on the fly; base=None means finetuned already
    # holds task vectors.
    "delta_threshold": (
        "delta_threshold(Tensor? base, Tensor[] finetuned, int[] ks, str selection='exact', "
        "bool allow_nonfinite=False, Tensor? consensus=None) -> (Tensor, Tensor)",
        ref_merge.delta_threshold,
        "mtmerge.kernels.merge:delta_threshold",
    ),
    "tie_cutoffs": (
        "tie_cutoffs(Tensor? base, Tensor[] finetuned, Tensor thresholds, Tensor ties_kept, "
        "Tensor? consensus=None) -> Tensor",
        ref_merge.tie_cutoffs,
        "mtmerge.kernels.merge:tie_cutoffs",
    ),
    "dare_abs_sums": (
        "dare_abs_sums(Tensor? base, Tensor[] finetuned, int seed, int[] dare_keep, int task_offset=0, "
        "int index_offset=0) -> Tensor",
        ref_merge.dare_abs_sums,
        "mtmerge.kernels.merge:dare_abs_sums",
    ),
    "elect_sign_total": (
        "elect_sign_total(Tensor? base, Tensor[] finetuned, float[] weights, float[] scales, Tensor thresholds, "
        "Tensor tie_cutoffs, int seed, int[] dare_keep, str elect='sum', bool elect_weighted=False, "
        "Tensor? consensus=None, int index_offset=0) -> Tensor",
        ref_merge.elect_sign_total,
        "mtmerge.kernels.merge:elect_sign_total",
    ),
    "merge_fused": (
        "merge_fused(Tensor? base, Tensor[] finetuned, float[] weights, float[] scales, Tensor thresholds, "
        "Tensor tie_cutoffs, int seed, int[] dare_keep, Tensor? consensus, str elect, bool elect_weighted, "
        "int zero_fill, str merge, str divisor, float lam, bool allow_nonfinite, Tensor(a!) out, "
        "int task_offset=0, bool with_base=True, int index_offset=0) -> ()",
        ref_merge.merge_fused,
        "mtmerge.kernels.merge:merge_fused",
    ),
    "tall_masks": (
        "tall_masks(Tensor? base, Tensor[] finetuned, Tensor merged, float[] lams) -> Tensor",
        ref_merge.tall_masks,
        "mtmerge.kernels.merge:tall_masks",
    ),
    "magnitude_histogram": (
        "magnitude_histogram(Tensor? base, Tensor[] finetuned, int shift, int bits, int[] prefixes, "
        "int prefix_shift=31, Tensor? consensus=None) -> Tensor",
        ref_merge.magnitude_histogram,
        "mtmerge.kernels.merge:magnitude_histogram",
    ),
    "consensus_mask": (
        "consensus_mask(Tensor masks, int k=2) -> Tensor",
        ref_merge.consensus_mask,
        "mtmerge.kernels.merge:consensus_mask",
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


def _per_task(finetuned, dtype):
    return finetuned[0].new_empty((len(finetuned),), dtype=dtype)


@torch.library.register_fake(f"{NAMESPACE}::delta_threshold")
def _delta_threshold_fake(base, finetuned, ks, selection="exact", allow_nonfinite=False, consensus=None):
    return _per_task(finetuned, torch.float32), _per_task(finetuned, torch.int64)


@torch.library.register_fake(f"{NAMESPACE}::tie_cutoffs")
def _tie_cutoffs_fake(base, finetuned, thresholds, ties_kept, consensus=None):
    return _per_task(finetuned, torch.int64)


@torch.library.register_fake(f"{NAMESPACE}::dare_abs_sums")
def _dare_abs_sums_fake(base, finetuned, seed, dare_keep, task_offset=0, index_offset=0):
    return finetuned[0].new_empty((len(finetuned), 2), dtype=torch.float64)


@torch.library.register_fake(f"{NAMESPACE}::elect_sign_total")
def _elect_sign_total_fake(base, finetuned, weights, scales, thresholds, tie_cutoffs, seed, dare_keep,
                           elect="sum", elect_weighted=False, consensus=None, index_offset=0):
    return finetuned[0].new_empty((), dtype=torch.int64)


@torch.library.register_fake(f"{NAMESPACE}::merge_fused")
def _merge_fused_fake(base, finetuned, weights, scales, thresholds, tie_cutoffs, seed, dare_keep, consensus,
                      elect, elect_weighted, zero_fill, merge, divisor, lam, allow_nonfinite, out, task_offset=0,
                      with_base=True, index_offset=0):
    return None


@torch.library.register_fake(f"{NAMESPACE}::tall_masks")
def _tall_masks_fake(base, finetuned, merged, lams):
    return merged.new_empty((len(finetuned), (merged.numel() + 7) // 8), dtype=torch.uint8)


@torch.library.register_fake(f"{NAMESPACE}::magnitude_histogram")
def _magnitude_histogram_fake(base, finetuned, shift, bits, prefixes, prefix_shift=31, consensus=None):
    return finetuned[0].new_empty((len(finetuned), 1 << bits), dtype=torch.int64)


@torch.library.register_fake(f"{NAMESPACE}::consensus_mask")
def _consensus_mask_fake(masks, k=2):
    return masks.new_empty((masks.shape[-1],), dtype=torch.uint8)


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
