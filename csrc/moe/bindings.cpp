// The MoE family's only CPU registration: every op's C++ kernel (declared in ops.h).
// The schemas are defined in Python (mtmerge/ops/_moe_ops.py) before mtmerge._C is loaded.
#include <torch/library.h>

#include "moe/ops.h"

TORCH_LIBRARY_IMPL(mtmerge, CPU, m) {
  using namespace mtmerge::moe;
  m.impl("moe_topk_gate", &moe_topk_gate_cpu);
  m.impl("moe_task_gate", &moe_task_gate_cpu);
  m.impl("moe_align", &moe_align_cpu);
  m.impl("moe_experts", &moe_experts_cpu);
  m.impl("moe_experts_backward", &moe_experts_backward_cpu);
  m.impl("moe_load_balancing_loss", &moe_load_balancing_loss_cpu);
  m.impl("moe_router_z_loss", &moe_router_z_loss_cpu);
}
