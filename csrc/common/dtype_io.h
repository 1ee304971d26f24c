// float32 views of float32 / bfloat16 / float16 storage, a sub-block at a time: the loads and
// stores every CPU kernel that computes in float32 shares (merge, MoE, low-rank).
//
// Header-only, in an anonymous namespace: each translation unit gets its own copy and its own
// ISA clones (MTMERGE_CLONES, common/simd.h). Tensors passed in must be contiguous CPU tensors
// of one of the three dtypes (the callers check).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/simd.h"

namespace mtmerge {
namespace {

MTMERGE_ALWAYS_INLINE uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

MTMERGE_ALWAYS_INLINE float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// ---- per-dtype conversion loops (vectorizable, one clone per ISA) ----------------------------

MTMERGE_CLONES void load_f32(const float* src, int64_t len, float* dst) { std::memcpy(dst, src, len * sizeof(float)); }

MTMERGE_CLONES void load_bf16(const uint16_t* src, int64_t len, float* dst) {
  for (int64_t i = 0; i < len; ++i) dst[i] = bits_float(uint32_t(src[i]) << 16);  // exact widening
}

MTMERGE_CLONES void load_f16(const uint16_t* src, int64_t len, float* dst) {
  for (int64_t i = 0; i < len; ++i) dst[i] = c10::detail::fp16_ieee_to_fp32_value(src[i]);
}

MTMERGE_CLONES void store_bf16(const float* src, int64_t len, uint16_t* dst) {
  for (int64_t i = 0; i < len; ++i) dst[i] = c10::detail::round_to_nearest_even(src[i]);
}

MTMERGE_CLONES void store_f16(const float* src, int64_t len, uint16_t* dst) {
  for (int64_t i = 0; i < len; ++i) dst[i] = c10::detail::fp16_ieee_from_fp32_value(src[i]);
}

// ---- tensor-level helpers --------------------------------------------------------------------

// Entries [off, off + len) of a contiguous float tensor as float32.
void load_floats(const at::Tensor& t, int64_t off, int64_t len, float* dst) {
  switch (t.scalar_type()) {
    case at::kFloat:
      load_f32(t.const_data_ptr<float>() + off, len, dst);
      break;
    case at::kBFloat16:
      load_bf16(static_cast<const uint16_t*>(t.const_data_ptr()) + off, len, dst);
      break;
    default:
      load_f16(static_cast<const uint16_t*>(t.const_data_ptr()) + off, len, dst);
      break;
  }
}

// The same entries as a float32 pointer: float32 tensors are read in place (no copy),
// others are converted into buf.
const float* floats_of(const at::Tensor& t, int64_t off, int64_t len, float* buf) {
  if (t.scalar_type() == at::kFloat) return t.const_data_ptr<float>() + off;
  load_floats(t, off, len, buf);
  return buf;
}

// Asks for the next sub-block [next, next + len) of an input stream (n entries) early: with
// T + 1 streams read a sub-block at a time, the hardware prefetcher alone leaves loads waiting.
void prefetch_next(const at::Tensor& t, int64_t next, int64_t len, int64_t n) {
  const int64_t stop = std::min(n, next + len);
  const char* p = static_cast<const char*>(t.const_data_ptr());
  const int64_t item = int64_t(t.element_size());
  for (int64_t i = next * item; i < stop * item; i += 64) __builtin_prefetch(p + i);
}

// Writes float32 values into entries [off, off + len) of a contiguous float tensor (rounding
// to nearest even for bfloat16 / float16).
void store_floats(at::Tensor& t, int64_t off, int64_t len, const float* src) {
  switch (t.scalar_type()) {
    case at::kFloat:
      std::memcpy(t.mutable_data_ptr<float>() + off, src, len * sizeof(float));
      break;
    case at::kBFloat16:
      store_bf16(src, len, static_cast<uint16_t*>(t.mutable_data_ptr()) + off);
      break;
    default:
      store_f16(src, len, static_cast<uint16_t*>(t.mutable_data_ptr()) + off);
      break;
  }
}

}  // namespace
}  // namespace mtmerge
