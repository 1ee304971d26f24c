"""mtmerge: compiled kernels for multi-task models (merging, sparse MoE routing, low-rank attention).

Every op is a ``torch.library`` op in the ``mtmerge`` namespace with a C++ CPU kernel, a
Triton GPU kernel and a PyTorch reference; see ``mtmerge info`` for which one runs here.
"""

from mtmerge import _library
from mtmerge.ops.lowrank import LamaOutput, lama_pool, linformer_attention, multi_lora
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
from mtmerge.ops.moe import (
    AlignOutput,
    GateOutput,
    TaskGateOutput,
    load_balancing_loss,
    moe_align,
    moe_experts,
    moe_task_gate,
    moe_topk_gate,
    router_z_loss,
)

__version__ = "0.1.0"

_MERGING = ("MergeConfig", "MergeSummary", "merge_checkpoints")


def __getattr__(name: str):
    """The checkpoint pipeline (``mtmerge.merging``) is imported on first use."""
    if name in _MERGING:
        from mtmerge import merging

        return getattr(merging, name)
    raise AttributeError(f"module 'mtmerge' has no attribute {name!r}")


__all__ = [
    "FLAVORS",
    "AlignOutput",
    "GateOutput",
    "LamaOutput",
    "MagnitudeThreshold",
    "MergeConfig",
    "MergeSummary",
    "TaskGateOutput",
    "TiesKnobs",
    "__version__",
    "_library",
    "consensus_mask",
    "consensus_merge",
    "dare",
    "dare_linear",
    "dare_ties",
    "lama_pool",
    "linformer_attention",
    "load_balancing_loss",
    "magnitude_prune",
    "magnitude_threshold",
    "merge_checkpoints",
    "moe_align",
    "moe_experts",
    "moe_task_gate",
    "moe_topk_gate",
    "multi_lora",
    "router_z_loss",
    "tall_masks",
    "task_arithmetic",
    "ties",
    "ties_merge",
    "topk_mask",
]
