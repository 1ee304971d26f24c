"""mtmerge: compiled kernels for multi-task models (merging, sparse MoE routing, low-rank attention).

Every op is a ``torch.library`` op in the ``mtmerge`` namespace with a C++ CPU kernel, a
Triton GPU kernel and a PyTorch reference; see ``mtmerge info`` for which one runs here.
"""

from mtmerge import _library
from mtmerge.ops.merge import MagnitudeThreshold, magnitude_threshold, topk_mask

__version__ = "0.1.0"

__all__ = [
    "MagnitudeThreshold",
    "__version__",
    "_library",
    "magnitude_threshold",
    "topk_mask",
]
