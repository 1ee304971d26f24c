"""The checkpoint pipeline: ``mtmerge merge CONFIG.yaml -o OUT_DIR`` / :func:`merge_checkpoints`.

Streams local safetensors checkpoints (memory-mapped, one tensor chunk at a time) through the
fused merge ops and writes sharded safetensors atomically. Modules: ``config`` (mergekit-style
YAML), ``checkpoint`` (reading), ``plan`` (validation, chunking, layout, memory), ``writer``
(streaming shards, atomic output directory), ``engine`` (the passes over the chunks),
``streaming_topk`` (exact top-k over a stream of chunks: chunked tensors, scope global),
``distributed`` (torch.distributed), ``progress`` and ``run`` (the entry point).
"""

from mtmerge.merging.checkpoint import Checkpoint
from mtmerge.merging.config import METHODS, MergeConfig, load_config
from mtmerge.merging.engine import dare_seed
from mtmerge.merging.plan import MergePlan, build_plan
from mtmerge.merging.run import MergeSummary, merge_checkpoints

__all__ = [
    "METHODS",
    "Checkpoint",
    "MergeConfig",
    "MergePlan",
    "MergeSummary",
    "build_plan",
    "dare_seed",
    "load_config",
    "merge_checkpoints",
]
