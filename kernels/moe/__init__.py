"""Triton kernels of the MoE family (installed as ``mtmerge.kernels.moe``).

Each launcher takes its op's schema (``mtmerge/ops/_moe_ops.py``) as its Python signature, so it
is registered directly as the CUDA implementation of ``torch.ops.mtmerge.<name>``. Semantics:
``mtmerge/reference/moe.py``. Tested on CPU under ``TRITON_INTERPRET=1``.

* ``gate``: ``moe_topk_gate`` (scores, top-k by repeated argmax) and ``moe_task_gate``
* ``align``: ``moe_align``, the stable counting sort of the slots by expert (the native CUDA
  kernel of ``csrc/cuda/moe_align.cu`` when ``mtmerge._C`` has it)
* ``experts``: ``moe_experts`` and ``moe_experts_backward`` (grouped GEMMs over sorted slots,
  per-slot buffers, fixed-order combines)
* ``losses``: ``moe_load_balancing_loss`` and ``moe_router_z_loss``
* ``_common``: block sizes, autotune configs, tile schedule, activations

Host reads: none. Output sizes are static ([T * k], [E + 1], []); every tile finds its expert
from the device-side offsets.
"""

from .align import moe_align
from .experts import moe_experts, moe_experts_backward
from .gate import moe_task_gate, moe_topk_gate
from .losses import moe_load_balancing_loss, moe_router_z_loss

__all__ = [
    "moe_align",
    "moe_experts",
    "moe_experts_backward",
    "moe_load_balancing_loss",
    "moe_router_z_loss",
    "moe_task_gate",
    "moe_topk_gate",
]
