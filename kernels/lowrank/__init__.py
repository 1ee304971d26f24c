"""Triton kernels of the low-rank attention family (installed as ``mtmerge.kernels.lowrank``).

Each launcher takes its op's schema (``mtmerge/ops/_lowrank_ops.py``, contract in docs/lowrank.md) as
its Python signature, so it is registered directly as the CUDA implementation of
``torch.ops.mtmerge.<name>``. Semantics: ``mtmerge/reference/lowrank.py``. Tested on CPU under
``TRITON_INTERPRET=1``.

* ``lama``: ``lama_pool`` and ``lama_pool_backward`` (head logits per block of tokens, one
  streaming online-softmax pass over T for the pooling, attn normalized in place)
* ``linformer``: ``linformer_attention`` and ``linformer_attention_backward`` (sequence
  projections as batched GEMMs, flash-style attention over the r projected keys, non-causal
  flash backward from the recomputed logsumexp)
* ``lora``: ``multi_lora`` and ``multi_lora_backward`` (stable counting sort of the tokens by
  adapter, fused shrink + expand, per-adapter weight gradients in token order)
* ``_common``: block sizes, autotune configs, the strided batched GEMM, mask arguments

Host reads: none. Every output size follows from the input shapes; tiles find their adapter from
device-side offsets. Reductions run in a fixed order (no float atomics): same bits on every run.
"""

from .lama import lama_pool, lama_pool_backward
from .linformer import linformer_attention, linformer_attention_backward
from .lora import multi_lora, multi_lora_backward

__all__ = [
    "lama_pool",
    "lama_pool_backward",
    "linformer_attention",
    "linformer_attention_backward",
    "multi_lora",
    "multi_lora_backward",
]
