// The low-rank attention family's CPU kernels, one function per torch.ops.mtmerge op (registered
// in bindings.cpp). Schemas: mtmerge/ops/_lowrank_ops.py; semantics: mtmerge/reference/lowrank.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace mtmerge::lowrank {

using OptTensor = std::optional<at::Tensor>;

// lama.cpp: LAMA pooling
std::tuple<at::Tensor, at::Tensor> lama_pool_cpu(const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
                                                 const OptTensor& mask, const OptTensor& context);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lama_pool_backward_cpu(
    const at::Tensor& grad_attn, const at::Tensor& grad_pooled, const at::Tensor& h, const at::Tensor& P,
    const at::Tensor& Q, const OptTensor& mask, const OptTensor& context);

// linformer.cpp: Linformer attention
at::Tensor linformer_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& E,
                                   const at::Tensor& F, const OptTensor& key_padding_mask, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linformer_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& E,
    const at::Tensor& F, const OptTensor& key_padding_mask, double scale);

// multi_lora.cpp: one LoRA adapter per token
at::Tensor multi_lora_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& adapter_ids,
                          const at::Tensor& scale, const OptTensor& base);
std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_lora_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                       const at::Tensor& A, const at::Tensor& B,
                                                                       const at::Tensor& adapter_ids,
                                                                       const at::Tensor& scale);

}  // namespace mtmerge::lowrank
