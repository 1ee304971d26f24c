"""torch.distributed scale-out of mtmerge's layers.

* :class:`ExpertParallelMoE`: a token-choice MoE layer (:class:`mtmerge.nn.MoEFeedForward`'s
  math) with its experts sharded across the ranks of a process group; tokens are exchanged with
  ``torch.distributed.all_to_all_single`` (gloo on CPU, nccl on GPU), forward and backward.
* :func:`all_to_all`: the differentiable ``all_to_all_single`` it is built on.
"""

from mtmerge.distributed.expert_parallel import ExpertParallelMoE, all_to_all

__all__ = ["ExpertParallelMoE", "all_to_all"]
