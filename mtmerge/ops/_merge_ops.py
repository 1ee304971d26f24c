"""Op specs of the merge family: schema, reference, validating fake, GPU launcher, autograd.

Walk: public API in ``mtmerge/ops/merge.py`` -> these specs -> CPU kernels in ``csrc/merge/``
(registered by ``csrc/merge/bindings.cpp``), GPU kernels in ``kernels/merge/``, the math in
``mtmerge/reference/merge.py``. Argument layouts of ``task_trim``, ``task_scalars``,
``merge_scalars`` and ``rule`` are the constants in ``mtmerge/_constants.py``.

Task vectors are ``finetuned[t] - base``, formed on the fly; ``base=None`` means ``finetuned``
already holds task vectors.
"""

from __future__ import annotations

import torch

from mtmerge._constants import OUT_COLUMNS, RULE_LENGTH, SCALAR_COLUMNS, TRIM_COLUMNS
from mtmerge._library import Autograd, OpSpec
from mtmerge.reference import merge as ref

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _triton(name: str) -> str:
    return f"triton:mtmerge.kernels.merge:{name}"


# ---- fakes: check what the kernels rely on, return output metadata ---------------------------


def _check_tasks(base, finetuned, dtypes=_FLOATS) -> int:
    """The shared checks of the ops over ``(base, finetuned)``; returns n."""
    torch._check(len(finetuned) > 0, lambda: "finetuned must hold at least one tensor")
    ref_t = base if base is not None else finetuned[0]
    torch._check(ref_t.dtype in dtypes, lambda: f"inputs must be one of {dtypes}, got {ref_t.dtype}")
    for t, f in enumerate(finetuned):
        torch._check(f.shape == ref_t.shape, lambda t=t, f=f: f"finetuned[{t}] has shape {tuple(f.shape)}, "
                                                               f"expected {tuple(ref_t.shape)}")
        torch._check(f.dtype == ref_t.dtype, lambda t=t, f=f: f"finetuned[{t}] has dtype {f.dtype}, "
                                                               f"expected {ref_t.dtype}")
    return ref_t.numel()


def _check_per_task(x: torch.Tensor, name: str, tasks: int, columns: int, dtype: torch.dtype) -> None:
    torch._check(x.dtype == dtype, lambda: f"{name} must be {dtype}, got {x.dtype}")
    torch._check(tuple(x.shape) == (tasks, columns), lambda: f"{name} must have shape {(tasks, columns)}, "
                                                             f"got {tuple(x.shape)}")


def _check_consensus(consensus, n: int) -> None:
    if consensus is not None:
        torch._check(consensus.dtype == torch.uint8, lambda: f"consensus must be uint8, got {consensus.dtype}")
        torch._check(consensus.numel() == (n + 7) // 8,
                     lambda: f"consensus must hold ceil(n/8) = {(n + 7) // 8} bytes, got {consensus.numel()}")


def _per_task(finetuned, dtype):
    return finetuned[0].new_empty((len(finetuned),), dtype=dtype)


def _magnitude_threshold_fake(xs, k, selection="exact"):
    torch._check(len(xs) > 0, lambda: "xs must hold at least one tensor")
    return xs[0].new_empty(()), xs[0].new_empty((), dtype=torch.int64)


def _threshold_mask_fake(xs, threshold, ties_kept, selection="exact", packed=False):
    if packed:
        return [x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8) for x in xs]
    return [x.new_empty(x.shape, dtype=torch.bool) for x in xs]


def _delta_threshold_fake(base, finetuned, ks, selection="exact", allow_nonfinite=False, consensus=None):
    n = _check_tasks(base, finetuned)
    torch._check(len(ks) == len(finetuned), lambda: f"ks must have one entry per task ({len(finetuned)})")
    _check_consensus(consensus, n)
    return _per_task(finetuned, torch.float32), _per_task(finetuned, torch.int64)


def _tie_cutoffs_fake(base, finetuned, thresholds, ties_kept, consensus=None):
    n = _check_tasks(base, finetuned)
    _check_consensus(consensus, n)
    return _per_task(finetuned, torch.int64)


def _dare_abs_sums_fake(base, finetuned, task_trim, index_offset=0):
    _check_tasks(base, finetuned)
    _check_per_task(task_trim, "task_trim", len(finetuned), TRIM_COLUMNS, torch.int64)
    return finetuned[0].new_empty((len(finetuned), 2), dtype=torch.float64)


def _check_fused_args(base, finetuned, task_scalars, task_trim, consensus, rule) -> int:
    n = _check_tasks(base, finetuned)
    _check_per_task(task_scalars, "task_scalars", len(finetuned), SCALAR_COLUMNS, torch.float32)
    _check_per_task(task_trim, "task_trim", len(finetuned), TRIM_COLUMNS, torch.int64)
    _check_consensus(consensus, n)
    torch._check(len(rule) == RULE_LENGTH, lambda: f"rule must have {RULE_LENGTH} entries, got {len(rule)}")
    return n


def _elect_sign_total_fake(base, finetuned, task_scalars, task_trim, consensus, rule, index_offset=0):
    _check_fused_args(base, finetuned, task_scalars, task_trim, consensus, rule)
    return finetuned[0].new_empty((), dtype=torch.int64)


def _merge_fused_fake(base, finetuned, task_scalars, task_trim, consensus, rule, merge_scalars, out, index_offset=0):
    n = _check_fused_args(base, finetuned, task_scalars, task_trim, consensus, rule)
    torch._check(tuple(merge_scalars.shape) == (OUT_COLUMNS,) and merge_scalars.dtype == torch.float32,
                 lambda: f"merge_scalars must be float32 [{OUT_COLUMNS}]")
    torch._check(out.numel() == n, lambda: f"out must have {n} elements, got {out.numel()}")
    torch._check(out.dtype in _FLOATS, lambda: f"out must be a float tensor, got {out.dtype}")
    return None


def _task_arithmetic_fake(base, finetuned, weights, lam):
    _check_tasks(base, finetuned, dtypes=(*_FLOATS, torch.float64))
    torch._check(weights.dim() == 1 and weights.numel() == len(finetuned),
                 lambda: f"weights must be 1-D with one entry per task ({len(finetuned)})")
    torch._check(lam.dim() == 0, lambda: f"lam must be a 0-d tensor, got shape {tuple(lam.shape)}")
    return torch.empty_like(base, memory_format=torch.contiguous_format)


def _magnitude_histogram_fake(base, finetuned, shift, bits, prefixes, prefix_shift=31, consensus=None):
    n = _check_tasks(base, finetuned)
    torch._check(1 <= bits <= 16, lambda: f"bits must be in [1, 16], got {bits}")
    _check_consensus(consensus, n)
    return finetuned[0].new_empty((len(finetuned), 1 << bits), dtype=torch.int64)


def _tall_masks_fake(base, finetuned, merged, lams):
    n = _check_tasks(base, finetuned)
    torch._check(merged.numel() == n, lambda: f"merged must have {n} elements, got {merged.numel()}")
    torch._check(len(lams) == len(finetuned), lambda: f"lams must have one entry per task ({len(finetuned)})")
    return merged.new_empty((len(finetuned), (n + 7) // 8), dtype=torch.uint8)


def _consensus_mask_fake(masks, k=2):
    torch._check(masks.dim() == 2 and masks.dtype == torch.uint8, lambda: "masks must be uint8 [T, nbytes]")
    return masks.new_empty((masks.shape[-1],), dtype=torch.uint8)


# ---- autograd: task arithmetic with respect to everything (AdaMerging learns w and lam) -------


def _task_arithmetic_setup_context(ctx, inputs, output) -> None:
    base, finetuned, weights, lam = inputs
    ctx.num_tasks = len(finetuned)
    ctx.save_for_backward(base, weights, lam, *finetuned)


def _task_arithmetic_backward(ctx, grad):
    """out = b + lam * sum_t w_t (f_t - b):
    d/df_t = lam w_t g, d/db = (1 - lam sum_t w_t) g, d/dw_t = lam <g, f_t - b>,
    d/dlam = <g, sum_t w_t (f_t - b)> = sum_t w_t <g, f_t - b>."""
    base, weights, lam, *finetuned = ctx.saved_tensors
    g = grad.to(torch.promote_types(grad.dtype, torch.float32))
    w = weights.to(g.dtype)
    lam_g = lam.to(g.dtype).reshape(())
    dots = torch.stack([(g * (f.to(g.dtype) - base.to(g.dtype))).sum() for f in finetuned])
    grad_finetuned = [(g * (lam_g * w[t])).to(finetuned[t].dtype) for t in range(ctx.num_tasks)]
    grad_base = (g * (1 - lam_g * w.sum())).to(base.dtype)
    grad_weights = (lam_g * dots).to(weights.dtype)
    grad_lam = (w * dots).sum().reshape(lam.shape).to(lam.dtype)
    return grad_base, grad_finetuned, grad_weights, grad_lam


# ---- the family -------------------------------------------------------------------------------

MERGE_OPS: list[OpSpec] = [
    OpSpec("magnitude_threshold(Tensor[] xs, int k, str selection='exact') -> (Tensor, Tensor)",
           ref.magnitude_threshold, _magnitude_threshold_fake, _triton("magnitude_threshold")),
    OpSpec("threshold_mask(Tensor[] xs, Tensor threshold, Tensor ties_kept, str selection='exact', "
           "bool packed=False) -> Tensor[]",
           ref.threshold_mask, _threshold_mask_fake, _triton("threshold_mask")),
    OpSpec("delta_threshold(Tensor? base, Tensor[] finetuned, int[] ks, str selection='exact', "
           "bool allow_nonfinite=False, Tensor? consensus=None) -> (Tensor, Tensor)",
           ref.delta_threshold, _delta_threshold_fake, _triton("delta_threshold")),
    OpSpec("tie_cutoffs(Tensor? base, Tensor[] finetuned, Tensor thresholds, Tensor ties_kept, "
           "Tensor? consensus=None) -> Tensor",
           ref.tie_cutoffs, _tie_cutoffs_fake, _triton("tie_cutoffs")),
    OpSpec("dare_abs_sums(Tensor? base, Tensor[] finetuned, Tensor task_trim, int index_offset=0) -> Tensor",
           ref.dare_abs_sums, _dare_abs_sums_fake, _triton("dare_abs_sums")),
    OpSpec("elect_sign_total(Tensor? base, Tensor[] finetuned, Tensor task_scalars, Tensor task_trim, "
           "Tensor? consensus, int[] rule, int index_offset=0) -> Tensor",
           ref.elect_sign_total, _elect_sign_total_fake, _triton("elect_sign_total")),
    OpSpec("merge_fused(Tensor? base, Tensor[] finetuned, Tensor task_scalars, Tensor task_trim, "
           "Tensor? consensus, int[] rule, Tensor merge_scalars, Tensor(a!) out, int index_offset=0) -> ()",
           ref.merge_fused, _merge_fused_fake, _triton("merge_fused")),
    OpSpec("task_arithmetic(Tensor base, Tensor[] finetuned, Tensor weights, Tensor lam) -> Tensor",
           ref.task_arithmetic, _task_arithmetic_fake, _triton("task_arithmetic"),
           Autograd(_task_arithmetic_setup_context, _task_arithmetic_backward)),
    OpSpec("magnitude_histogram(Tensor? base, Tensor[] finetuned, int shift, int bits, int[] prefixes, "
           "int prefix_shift=31, Tensor? consensus=None) -> Tensor",
           ref.magnitude_histogram, _magnitude_histogram_fake, _triton("magnitude_histogram")),
    OpSpec("tall_masks(Tensor? base, Tensor[] finetuned, Tensor merged, float[] lams) -> Tensor",
           ref.tall_masks, _tall_masks_fake, _triton("tall_masks")),
    OpSpec("consensus_mask(Tensor masks, int k=2) -> Tensor",
           ref.consensus_mask, _consensus_mask_fake, _triton("consensus_mask")),
]
