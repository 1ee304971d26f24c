// The low-rank attention family's only CPU registration: every op's C++ kernel (declared in ops.h).
// The schemas are defined in Python (mtmerge/ops/_lowrank_ops.py) before mtmerge._C is loaded.
#include <torch/library.h>

#include "lowrank/ops.h"

TORCH_LIBRARY_IMPL(mtmerge, CPU, m) {
  using namespace mtmerge::lowrank;
  m.impl("lama_pool", &lama_pool_cpu);
  m.impl("lama_pool_backward", &lama_pool_backward_cpu);
  m.impl("linformer_attention", &linformer_attention_cpu);
  m.impl("linformer_attention_backward", &linformer_attention_backward_cpu);
  m.impl("multi_lora", &multi_lora_cpu);
  m.impl("multi_lora_backward", &multi_lora_backward_cpu);
}
