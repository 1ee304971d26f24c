// The inputs every task-vector op of the merge family shares: an optional base and T finetuned
// tensors (plus an optional packed consensus mask), validated and made contiguous, and the walk
// that yields the task vectors' magnitude keys a sub-block at a time.
//
// Task vectors tau_t = finetuned[t] - base are never stored: every pass recomputes them in
// float32 from the inputs, a sub-block at a time in L1-sized buffers. Without a base,
// finetuned[t] already holds tau_t.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common/dtype_io.h"
#include "common/simd.h"

namespace mtmerge {
namespace {

constexpr int64_t kSub = 512;             // elements per sub-block (T x 2 KB of scratch)
constexpr int64_t kMergeGrain = 1 << 15;  // elements per parallel task of the streaming passes
constexpr uint32_t kAbsMask = 0x7fffffffu;  // clears a float32's sign bit: its magnitude key

struct TaskInputs {
  c10::optional<at::Tensor> base;
  std::vector<at::Tensor> finetuned;
  const uint8_t* consensus = nullptr;
  at::Tensor consensus_holder;
  int64_t n = 0;
  int64_t tasks() const { return int64_t(finetuned.size()); }
};

// Wrong dtypes are TypeErrors; wrong shapes, sizes and values ValueErrors (every backend alike).
void check_float_dtype(const at::Tensor& t, const std::string& name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
                    " must be float32, bfloat16 or float16, got ", dt);
}

TaskInputs task_inputs(const c10::optional<at::Tensor>& base, at::TensorList finetuned,
                       const c10::optional<at::Tensor>& consensus) {
  TORCH_CHECK_VALUE(!finetuned.empty(), "finetuned must hold at least one tensor");
  TaskInputs in;
  const at::Tensor& ref = base.has_value() ? *base : finetuned[0];
  const std::string ref_name = base.has_value() ? "base" : "finetuned[0]";
  check_float_dtype(ref, ref_name);
  TORCH_CHECK_VALUE(ref.device().is_cpu(), ref_name, ": the CPU kernel needs CPU tensors, got ", ref.device());
  in.n = ref.numel();
  if (base.has_value()) in.base = base->contiguous();
  for (size_t t = 0; t < finetuned.size(); ++t) {
    const at::Tensor& f = finetuned[t];
    const std::string name = "finetuned[" + std::to_string(t) + "]";
    TORCH_CHECK_TYPE(f.scalar_type() == ref.scalar_type(), name, " has dtype ", f.scalar_type(), " but ", ref_name,
                      " has ", ref.scalar_type());
    TORCH_CHECK_VALUE(f.sizes() == ref.sizes(), name, " has shape ", f.sizes(), " but ", ref_name, " has ",
                      ref.sizes());
    TORCH_CHECK_VALUE(f.device() == ref.device(), name, " is on ", f.device(), " but ", ref_name, " is on ",
                      ref.device());
    in.finetuned.push_back(f.contiguous());
  }
  if (consensus.has_value()) {
    TORCH_CHECK_TYPE(consensus->scalar_type() == at::kByte, "consensus must be a packed uint8 mask, got ",
                     consensus->scalar_type());
    TORCH_CHECK_VALUE(consensus->numel() == (in.n + 7) / 8, "consensus must be a packed uint8 mask of ceil(n/8) = ",
                      (in.n + 7) / 8, " bytes, got ", consensus->numel());
    TORCH_CHECK_VALUE(consensus->device().is_cpu(), "consensus must be on the CPU");
    in.consensus_holder = consensus->contiguous();
    in.consensus = in.consensus_holder.const_data_ptr<uint8_t>();
  }
  return in;
}

// A per-task list argument as a vector, checking it has one entry per task.
template <typename T>
std::vector<T> per_task(c10::ArrayRef<T> values, int64_t tasks, const char* name) {
  TORCH_CHECK_VALUE(int64_t(values.size()) == tasks, name, " must have one entry per task (", tasks, "), got ",
                    values.size());
  return std::vector<T>(values.begin(), values.end());
}

// keep[i] &= bit (start + i) of the packed consensus mask.
void consensus_filter(const uint8_t* consensus, int64_t start, int64_t len, uint32_t* keep) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t j = start + i;
    keep[i] &= uint32_t((consensus[j >> 3] >> (j & 7)) & 1);
  }
}

MTMERGE_CLONES void subtract(const float* f, const float* b, int64_t len, float* d) {
  for (int64_t i = 0; i < len; ++i) d[i] = f[i] - b[i];
}

// Magnitude keys bits(|f - b|) of one sub-block.
MTMERGE_CLONES void delta_keys(const float* f, const float* b, int64_t len, uint32_t* keys) {
  for (int64_t i = 0; i < len; ++i) keys[i] = float_bits(f[i] - b[i]) & kAbsMask;
}

// Walks [begin, end) in sub-blocks of kBlock entries, reading base (and the consensus bits)
// once per sub-block: for each task t with want(t), fn(t, off, keys, len) gets the sub-block's
// magnitude keys bits(|finetuned[t] - base|), 0 outside the consensus mask.
template <int64_t kBlock, typename Want, typename Fn>
void for_each_task_keys(const TaskInputs& in, int64_t begin, int64_t end, Want&& want, Fn&& fn) {
  alignas(64) float f[kBlock], b[kBlock];
  alignas(64) uint32_t keys[kBlock], keep[kBlock];
  if (!in.base.has_value()) std::fill(b, b + kBlock, 0.0f);  // tau - 0 has the bits of tau
  for (int64_t off = begin; off < end; off += kBlock) {
    const int64_t len = std::min(kBlock, end - off);
    if (in.base.has_value()) prefetch_next(*in.base, off + len, len, in.n);
    const float* bp = in.base.has_value() ? floats_of(*in.base, off, len, b) : b;
    if (in.consensus) {
      std::fill(keep, keep + len, 1u);
      consensus_filter(in.consensus, off, len, keep);
    }
    for (int64_t t = 0; t < in.tasks(); ++t) {
      if (!want(t)) continue;
      prefetch_next(in.finetuned[t], off + len, len, in.n);
      delta_keys(floats_of(in.finetuned[t], off, len, f), bp, len, keys);
      if (in.consensus) {
        for (int64_t i = 0; i < len; ++i) keys[i] = keep[i] ? keys[i] : 0u;
      }
      fn(t, off, static_cast<const uint32_t*>(keys), len);
    }
  }
}

// One task's magnitude keys as a select.h source (total() and for_each_piece), computed on
// the fly piece by piece.
struct TaskKeySource {
  const TaskInputs* in;
  int64_t task;

  int64_t total() const { return in->n; }

  template <typename Fn>
  void for_each_piece(int64_t begin, int64_t end, Fn&& fn) const {
    for_each_task_keys<kSub>(*in, begin, end, [&](int64_t t) { return t == task; },
                             [&](int64_t, int64_t, const uint32_t* keys, int64_t len) { fn(keys, len); });
  }
};

}  // namespace
}  // namespace mtmerge
