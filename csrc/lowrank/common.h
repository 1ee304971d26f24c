// Pieces the low-rank kernels share: argument checks, fp32 scratch buffers, a work-item loop,
// and the vectorizable row helpers (softmax with a branch-free exp, lane-split sums).
//
// Header-only, in an anonymous namespace like common/dtype_io.h: each translation unit gets its
// own copy and its own ISA clones. "acc_t" is the compute type: float, or double for float64
// inputs (gradcheck).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/kernel_common.h"
#include "common/simd.h"

namespace mtmerge {
namespace {

void check_like(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(), ", got ",
              t.scalar_type());
}

void check_mask(const std::optional<at::Tensor>& mask, const char* name, int64_t rows, int64_t cols) {
  if (!mask) return;
  check_cpu(*mask, name);
  TORCH_CHECK(mask->scalar_type() == at::kBool, name, " must be bool, got ", mask->scalar_type());
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == rows && mask->size(1) == cols, name, " must be [", rows, ", ",
              cols, "], got ", mask->sizes());
}

at::ScalarType compute_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// `src` ([rows, cols], any dtype and strides) in the compute type, contiguous: src itself when it
// already is, else converted into `buf` (ATen's copy_ rounds nothing: widening only).
at::Tensor as_compute(const at::Tensor& src, at::ScalarType cd, Scratch& buf) {
  if (src.scalar_type() == cd && src.is_contiguous()) return src;
  at::Tensor dst = buf.get(cd, src.size(0), src.size(1));
  dst.copy_(src);
  return dst;
}

// Runs body(i, scratch) for items 0..n-1, each thread one contiguous run of items with its own
// scratch buffers. Items are cut by the data alone and GEMMs inside run single-threaded (BLAS
// does not nest into a parallel region), so results never depend on the thread count; items
// must write disjoint outputs.
template <int kBuffers, typename Body>
void parallel_items(int64_t n, const Body& body) {
  if (n <= 0) return;
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    Scratch scratch[kBuffers];
    for (int64_t i = lo; i < hi; ++i) body(i, scratch);
  });
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- row helpers ------------------------------------------------------------------------------

constexpr int kLanes = 16;  // independent accumulators: lets GCC vectorize float sums without -ffast-math

// exp(x) in float32, branch-free so loops over it vectorize: Cody-Waite range reduction and the
// Cephes expf polynomial (about 2 ulp); inputs clamped to [-87, 88], so 2^n stays a normal float.
MTMERGE_ALWAYS_INLINE float exp_f32(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float shifted = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds to an integer
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return y * two_n;
}

// In place over rows of s [rows, cols] (row stride ld): s = exp(s * scale - max_j(s * scale)),
// unnormalized, and inv[i] = 1 / (the row's sum). The max pass only reads (it vectorizes); the
// caller normalizes: the P rows themselves (normalize_rows) or, cheaper, the rows of P V.
MTMERGE_CLONES void exp_rows_f32(float* s, int64_t rows, int64_t cols, int64_t ld, float scale, float* inv) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    // lane-wise max in a GCC vector (an array of lanes does not vectorize: no max reduction
    // without -ffast-math); x > mx ? x : mx is std::max(mx, x), which skips NaN like MAXPS
    typedef float lanes_t __attribute__((vector_size(kLanes * sizeof(float))));
    lanes_t mx;
    for (int l = 0; l < kLanes; ++l) mx[l] = -INFINITY;
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
      lanes_t x;
      std::memcpy(&x, row + j, sizeof x);
      x *= scale;
      mx = x > mx ? x : mx;
    }
    float top = -INFINITY;
    for (; j < cols; ++j) top = std::max(top, row[j] * scale);
    for (int l = 0; l < kLanes; ++l) top = std::max(top, mx[l]);
    float sum[kLanes] = {};
    for (j = 0; j + kLanes <= cols; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float e = exp_f32(row[j + l] * scale - top);
        row[j + l] = e;
        sum[l] += e;
      }
    }
    float total = 0.0f;
    for (; j < cols; ++j) {
      row[j] = exp_f32(row[j] * scale - top);
      total += row[j];
    }
    for (int l = 0; l < kLanes; ++l) total += sum[l];
    inv[i] = 1.0f / total;
  }
}

void exp_rows_f64(double* s, int64_t rows, int64_t cols, int64_t ld, double scale, double* inv) {
  for (int64_t i = 0; i < rows; ++i) {
    double* row = s + i * ld;
    double top = -INFINITY;
    for (int64_t j = 0; j < cols; ++j) top = std::max(top, row[j] * scale);
    double total = 0.0;
    for (int64_t j = 0; j < cols; ++j) total += (row[j] = std::exp(row[j] * scale - top));
    inv[i] = 1.0 / total;
  }
}

template <typename acc_t>
void exp_rows(acc_t* s, int64_t rows, int64_t cols, int64_t ld, double scale, acc_t* inv) {
  if constexpr (std::is_same_v<acc_t, double>) {
    exp_rows_f64(s, rows, cols, ld, scale, inv);
  } else {
    exp_rows_f32(s, rows, cols, ld, float(scale), inv);
  }
}

// x[i, :] *= f[i] over rows of x [rows, cols] (row stride ld).
MTMERGE_CLONES void scale_rows_f32(float* x, int64_t rows, int64_t cols, int64_t ld, const float* f) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = x + i * ld;
    const float fi = f[i];
    for (int64_t j = 0; j < cols; ++j) row[j] *= fi;
  }
}

template <typename acc_t>
void scale_rows(acc_t* x, int64_t rows, int64_t cols, int64_t ld, const acc_t* f) {
  if constexpr (std::is_same_v<acc_t, double>) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) x[i * ld + j] *= f[i];
    }
  } else {
    scale_rows_f32(x, rows, cols, ld, f);
  }
}

// The softmax backward in place: g = p * (g - <p, g>) * scale per row (p, g [rows, cols]).
MTMERGE_CLONES void softmax_grad_rows_f32(const float* p, float* g, int64_t rows, int64_t cols, int64_t ld,
                                          float scale) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* pr = p + i * ld;
    float* gr = g + i * ld;
    float acc[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] += pr[j + l] * gr[j + l];
    }
    float dot = 0.0f;
    for (; j < cols; ++j) dot += pr[j] * gr[j];
    for (int l = 0; l < kLanes; ++l) dot += acc[l];
    for (j = 0; j < cols; ++j) gr[j] = pr[j] * (gr[j] - dot) * scale;
  }
}

void softmax_grad_rows_f64(const double* p, double* g, int64_t rows, int64_t cols, int64_t ld, double scale) {
  for (int64_t i = 0; i < rows; ++i) {
    const double* pr = p + i * ld;
    double* gr = g + i * ld;
    double dot = 0.0;
    for (int64_t j = 0; j < cols; ++j) dot += pr[j] * gr[j];
    for (int64_t j = 0; j < cols; ++j) gr[j] = pr[j] * (gr[j] - dot) * scale;
  }
}

template <typename acc_t>
void softmax_grad_rows(const acc_t* p, acc_t* g, int64_t rows, int64_t cols, int64_t ld, double scale) {
  if constexpr (std::is_same_v<acc_t, double>) {
    softmax_grad_rows_f64(p, g, rows, cols, ld, scale);
  } else {
    softmax_grad_rows_f32(p, g, rows, cols, ld, float(scale));
  }
}

// dst[i] += src[i] (vectorizes: no reduction).
template <typename acc_t>
MTMERGE_ALWAYS_INLINE void add_into(acc_t* dst, const acc_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace
}  // namespace mtmerge
