// What the MoE and low-rank CPU kernels share: their defensive checks (the public wrappers have
// already validated, with errors naming their arguments; these guard the kernels' memory
// accesses), the guard every kernel runs under, and a reusable scratch buffer.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

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

// A growable scratch buffer of one dtype: get() returns a contiguous [rows, cols] tensor,
// reallocating only to grow; reused by the work items a thread runs.
struct Scratch {
  at::Tensor t;
  at::Tensor get(at::ScalarType st, int64_t rows, int64_t cols) {
    const int64_t n = rows * cols;
    if (!t.defined() || t.scalar_type() != st || t.numel() < n) t = at::empty({std::max<int64_t>(n, 1)}, at::dtype(st));
    return t.narrow(0, 0, n).view({rows, cols});
  }
};

}  // namespace
}  // namespace mtmerge
