"""Trainable layers built on mtmerge's ops.

* :class:`MoEFeedForward`: token-choice sparse MoE feed-forward layer (Mixtral-style).
* :class:`TaskMoE`: task-conditioned sparse MoE layer (M³ViT), one router per task.

Both return a :class:`MoEOutput` ``(output, router_logits, load_balancing_loss, router_z_loss)``.
"""

from mtmerge.nn.moe import MoEFeedForward, MoEOutput, TaskMoE, default_task_experts

__all__ = ["MoEFeedForward", "MoEOutput", "TaskMoE", "default_task_experts"]
