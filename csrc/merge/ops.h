// The merge family's CPU kernels, one function per torch.ops.mtmerge op (registered in
// bindings.cpp). Schemas and their documentation: mtmerge/ops/_merge_ops.py; semantics:
// mtmerge/reference/merge.py; numeric constants and the layouts of task_trim / task_scalars /
// merge_scalars / rule: common/constants.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>
#include <vector>

namespace mtmerge::merge {

using OptTensor = c10::optional<at::Tensor>;

// select.cpp: exact top-k selection by magnitude over a list of tensors
std::tuple<at::Tensor, at::Tensor> magnitude_threshold_cpu(at::TensorList xs, int64_t k, c10::string_view selection);
std::vector<at::Tensor> threshold_mask_cpu(at::TensorList xs, const at::Tensor& threshold, const at::Tensor& ties_kept,
                                           c10::string_view selection, bool packed);

// trim.cpp: trim thresholds of task vectors
std::tuple<at::Tensor, at::Tensor> delta_threshold_cpu(const OptTensor& base, at::TensorList finetuned,
                                                       at::IntArrayRef ks, c10::string_view selection,
                                                       bool allow_nonfinite, const OptTensor& consensus);
at::Tensor tie_cutoffs_cpu(const OptTensor& base, at::TensorList finetuned, const at::Tensor& thresholds,
                           const at::Tensor& ties_kept, const OptTensor& consensus);
at::Tensor magnitude_histogram_cpu(const OptTensor& base, at::TensorList finetuned, int64_t shift, int64_t bits,
                                   at::IntArrayRef prefixes, int64_t prefix_shift, const OptTensor& consensus);

// fused.cpp: the fused trim / DARE / elect / merge pass and its helpers
at::Tensor dare_abs_sums_cpu(const OptTensor& base, at::TensorList finetuned, const at::Tensor& task_trim,
                             int64_t index_offset);
at::Tensor elect_sign_total_cpu(const OptTensor& base, at::TensorList finetuned, const at::Tensor& task_scalars,
                                const at::Tensor& task_trim, const OptTensor& consensus, at::IntArrayRef rule,
                                int64_t index_offset);
void merge_fused_cpu(const OptTensor& base, at::TensorList finetuned, const at::Tensor& task_scalars,
                     const at::Tensor& task_trim, const OptTensor& consensus, at::IntArrayRef rule,
                     const at::Tensor& merge_scalars, at::Tensor& out, int64_t index_offset);
at::Tensor task_arithmetic_cpu(const at::Tensor& base, at::TensorList finetuned, const at::Tensor& weights,
                               const at::Tensor& lam);

// masks.cpp: TALL masks and Consensus
at::Tensor tall_masks_cpu(const OptTensor& base, at::TensorList finetuned, const at::Tensor& merged,
                          at::ArrayRef<double> lams);
at::Tensor consensus_mask_cpu(const at::Tensor& masks, int64_t k);

}  // namespace mtmerge::merge
