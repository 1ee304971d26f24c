// The defensive checks the MoE and low-rank CPU kernels share (the public wrappers have already
// validated, with errors naming their arguments; these guard the kernels' memory accesses), and
// the guard every kernel runs under.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>

namespace mtmerge {
namespace {

// Kernels run below autograd (the ops' autograd formulas are registered in Python) on detached
// inputs: the ATen calls they make (mm_out, to), also inside worker threads, neither record a
// graph nor refuse out= on inputs that require grad.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

void check_float(const at::Tensor& t, const char* name) {
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, name,
              " must be float32, bfloat16, float16 or float64, got ", st);
}

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name, " must be int32 or int64, got ",
              t.scalar_type());
}

}  // namespace
}  // namespace mtmerge
