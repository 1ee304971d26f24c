"""Triton kernels of the merge family (installed as ``mtmerge.kernels.merge``).

Each launcher takes its op's schema (``mtmerge/ops/_merge_ops.py``) as its Python signature,
so it is registered directly as the CUDA implementation of ``torch.ops.mtmerge.<name>``.
Semantics: ``mtmerge/reference/merge.py``. Tested on CPU under ``TRITON_INTERPRET=1``.

One concern per module:

* ``select``: magnitude selection (radix select on the float bit patterns, state on the device)
* ``trim``: per-task trims of the task vectors (``delta_threshold``, ``tie_cutoffs``)
* ``dare``: DARE's L1 sums
* ``fused``: the fused merge, the elected-sign total and task arithmetic
* ``histogram``: digit histograms of the task vectors' magnitude keys
* ``masks``: TALL masks and Consensus
* ``_common``: device helpers, autotune configs, interpreter detection, argument checks

Host reads: none on an op's normal path. The exceptions are error checks that must reach the
host to raise ``ValueError``, one read each: the NaN count of ``magnitude_threshold``, the
NaN/Inf counts of ``delta_threshold`` and the NaN counts of ``tie_cutoffs`` (NaN in a selection
input is always an error), and the NaN/Inf pre-scan of ``merge_fused`` when
``rule[RULE_CHECK_FINITE] = 1``.
"""

from .dare import dare_abs_sums
from .fused import elect_sign_total, merge_fused, task_arithmetic
from .histogram import magnitude_histogram
from .masks import consensus_mask, tall_masks
from .select import magnitude_threshold, threshold_mask
from .trim import delta_threshold, tie_cutoffs

__all__ = [
    "consensus_mask",
    "dare_abs_sums",
    "delta_threshold",
    "elect_sign_total",
    "magnitude_histogram",
    "magnitude_threshold",
    "merge_fused",
    "tall_masks",
    "task_arithmetic",
    "threshold_mask",
    "tie_cutoffs",
]
