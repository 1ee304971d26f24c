"""mtmerge: compiled kernels for multi-task models (merging, sparse MoE routing, low-rank attention).

Every op is a ``torch.library`` op in the ``mtmerge`` namespace with a C++ CPU kernel, a
Triton GPU kernel and a PyTorch reference; see ``mtmerge info`` for which one runs here.
"""

from mtmerge import _library
from mtmerge.ops.merge import (
    FLAVORS,
    MagnitudeThreshold,
    TiesKnobs,
    consensus_mask,
    consensus_merge,
    dare,
    dare_linear,
    dare_ties,
    magnitude_prune,
    magnitude_threshold,
    tall_masks,
    task_arithmetic,
    ties,
    ties_merge,
    topk_mask,
)

__version__ = "0.1.0"

__all__ = [
    "FLAVORS",
    "MagnitudeThreshold",
    "TiesKnobs",
    "__version__",
    "_library",
    "consensus_mask",
    "consensus_merge",
    "dare",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "magnitude_threshold",
    "tall_masks",
    "task_arithmetic",
    "ties",
    "ties_merge",
    "topk_mask",
]
