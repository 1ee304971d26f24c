// The MoE family's CPU kernels, one function per torch.ops.mtmerge op (registered in bindings.cpp).
// Schemas and their documentation: mtmerge/ops/_moe_ops.py; semantics: mtmerge/reference/moe.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace mtmerge::moe {

using OptTensor = std::optional<at::Tensor>;

// routing.cpp: gates, the slot permutation and the auxiliary losses
std::tuple<at::Tensor, at::Tensor> moe_topk_gate_cpu(const at::Tensor& logits, int64_t k, c10::string_view scoring,
                                                     bool renormalize, const OptTensor& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_task_gate_cpu(const at::Tensor& x, const at::Tensor& router,
                                                                 const at::Tensor& task_ids, int64_t k,
                                                                 const OptTensor& expert_mask,
                                                                 c10::string_view scoring, bool renormalize);
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cpu(const at::Tensor& ids, int64_t num_experts,
                                                             int64_t capacity);
at::Tensor moe_load_balancing_loss_cpu(const at::Tensor& router_logits, const at::Tensor& ids, int64_t num_experts);
at::Tensor moe_router_z_loss_cpu(const at::Tensor& router_logits);

// experts.cpp: the routed experts' feed-forward
at::Tensor moe_experts_cpu(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                           const at::Tensor& weights, const at::Tensor& ids, c10::string_view activation,
                           const OptTensor& gate_up_bias, const OptTensor& down_bias);

// experts_backward.cpp: its gradients
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
    const at::Tensor& weights, const at::Tensor& ids, c10::string_view activation, const OptTensor& gate_up_bias,
    const OptTensor& down_bias);

}  // namespace mtmerge::moe
