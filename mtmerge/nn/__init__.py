"""Trainable layers built on mtmerge's ops.

* :class:`MoEFeedForward`: token-choice sparse MoE feed-forward layer (Mixtral-style).
* :class:`TaskMoE`: task-conditioned sparse MoE layer (M³ViT), one router per task.
* :class:`LAMAPooling`: LAMA's low-rank multi-head attention pooling (m heads, one pass over T).
* :class:`LinformerSelfAttention`: self-attention with keys/values projected along the sequence.
* :class:`MultiLoRALinear`: an ``nn.Linear`` with a shared LoRA adapter plus one per task (MTLoRA);
  ``from_peft`` loads PEFT adapters from disk.

The MoE layers return a :class:`MoEOutput` ``(output, router_logits, load_balancing_loss, router_z_loss)``.
"""

from mtmerge.nn.lowrank import LAMAPooling, LinformerSelfAttention
from mtmerge.nn.moe import MoEFeedForward, MoEOutput, TaskMoE, default_task_experts
from mtmerge.nn.multi_lora import MultiLoRALinear

__all__ = [
    "LAMAPooling",
    "LinformerSelfAttention",
    "MoEFeedForward",
    "MoEOutput",
    "MultiLoRALinear",
    "TaskMoE",
    "default_task_experts",
]
