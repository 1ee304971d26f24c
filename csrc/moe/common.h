// Pieces the MoE kernels share: argument checks, the slot sort by expert, the GLU activations
// and their derivatives (fp32, vectorizable, one clone per ISA), float rows of any dtype, and
// a cost-balanced parallel loop over work items.
//
// Header-only, in an anonymous namespace like common/dtype_io.h: each translation unit gets its
// own copy and its own ISA clones.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/constants.h"
#include "common/dtype_io.h"
#include "common/kernel_common.h"
#include "common/simd.h"

namespace mtmerge {
namespace {

// ---- checks and small inputs ------------------------------------------------------------------

// The checks every experts kernel repeats (the public wrapper has already validated, with
// ValueErrors naming its arguments); they guard the kernels' memory accesses.
void check_experts_args(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                        const at::Tensor& weights, const at::Tensor& ids, const std::optional<at::Tensor>& gu_bias,
                        const std::optional<at::Tensor>& d_bias) {
  for (const at::Tensor* t : {&x, &gate_up, &down, &weights, &ids}) check_cpu(*t, "moe_experts inputs");
  check_float(x, "x");
  check_float(weights, "weights");
  check_index(ids, "ids");
  TORCH_CHECK(x.dim() == 2, "x must be [T, H], got ", x.sizes());
  TORCH_CHECK(gate_up.dim() == 3 && gate_up.size(1) % 2 == 0 && gate_up.size(2) == x.size(1),
              "gate_up must be [E, 2F, H] with H = ", x.size(1), ", got ", gate_up.sizes());
  const int64_t E = gate_up.size(0), F = gate_up.size(1) / 2, H = x.size(1);
  TORCH_CHECK(down.dim() == 3 && down.size(0) == E && down.size(1) == H && down.size(2) == F,
              "down must be [E, H, F] = [", E, ", ", H, ", ", F, "], got ", down.sizes());
  TORCH_CHECK(gate_up.scalar_type() == x.scalar_type() && down.scalar_type() == x.scalar_type(),
              "gate_up and down must have x's dtype ", x.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0), "ids must be [T, k] with T = ", x.size(0), ", got ",
              ids.sizes());
  TORCH_CHECK(weights.sizes() == ids.sizes(), "weights must have ids' shape ", ids.sizes(), ", got ",
              weights.sizes());
  if (gu_bias) {
    check_cpu(*gu_bias, "gate_up_bias");
    TORCH_CHECK(gu_bias->dim() == 2 && gu_bias->size(0) == E && gu_bias->size(1) == 2 * F &&
                    gu_bias->scalar_type() == x.scalar_type(),
                "gate_up_bias must be [E, 2F] of x's dtype, got ", gu_bias->sizes(), " ", gu_bias->scalar_type());
  }
  if (d_bias) {
    check_cpu(*d_bias, "down_bias");
    TORCH_CHECK(d_bias->dim() == 2 && d_bias->size(0) == E && d_bias->size(1) == H &&
                    d_bias->scalar_type() == x.scalar_type(),
                "down_bias must be [E, H] of x's dtype, got ", d_bias->sizes(), " ", d_bias->scalar_type());
  }
}

// The compute dtype of the family: float64 for float64 inputs, float32 otherwise.
at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// ids as a contiguous int64 tensor (a copy only for int32 or strided ids: they are small).
at::Tensor ids_int64(const at::Tensor& ids) { return ids.to(at::kLong).contiguous(); }

MTMERGE_ALWAYS_INLINE bool valid_expert(int64_t e, int64_t num_experts) { return e >= 0 && e < num_experts; }

// ---- the slot sort ----------------------------------------------------------------------------

// Counting sort of the slots s = 0..n-1 by expert ids[s] (stable: increasing s within an
// expert), keeping an expert's first `capacity` slots (-1: all). Writes the kept slots of expert
// 0, 1, ..., E-1 and then every other slot in increasing s into sorted[n], the kept counts as
// offsets[E + 1], and returns the number of valid slots that were not kept. Ids outside [0, E)
// are unrouted; memory is only ever indexed by a checked id.
int64_t sort_by_expert(const int64_t* ids, int64_t n, int64_t num_experts, int64_t capacity, int64_t* sorted,
                       int64_t* offsets) {
  const int64_t cap = capacity < 0 ? n : capacity;
  std::vector<int64_t> count(num_experts, 0);
  int64_t dropped = 0;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t e = ids[s];
    if (!valid_expert(e, num_experts)) continue;
    if (count[e] < cap) {
      ++count[e];
    } else {
      ++dropped;
    }
  }
  offsets[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) offsets[e + 1] = offsets[e] + count[e];
  std::vector<int64_t> next(offsets, offsets + num_experts);
  int64_t rest = offsets[num_experts];  // the unkept slots go after every kept one
  for (int64_t s = 0; s < n; ++s) {
    const int64_t e = ids[s];
    if (valid_expert(e, num_experts) && next[e] < offsets[e + 1]) {
      sorted[next[e]++] = s;
    } else {
      sorted[rest++] = s;
    }
  }
  return dropped;
}

// The routed slots grouped by expert: rows [begin[g], begin[g + 1]) of every per-row buffer
// belong to expert expert[g]; row r holds slot slot_of_row[r]; row_of_slot[s] = -1 for an
// unrouted slot.
struct SlotGroups {
  std::vector<int64_t> slot_of_row, row_of_slot, expert, begin;
  int64_t rows() const { return int64_t(slot_of_row.size()); }
  int64_t groups() const { return int64_t(expert.size()); }
  int64_t size(int64_t g) const { return begin[g + 1] - begin[g]; }
};

constexpr int64_t kDecodeSlots = 16;  // at most this many slots, each on its own expert: no sort

SlotGroups group_slots(const int64_t* ids, int64_t n, int64_t num_experts) {
  SlotGroups sg;
  sg.row_of_slot.assign(n, -1);
  sg.begin.push_back(0);
  if (n <= kDecodeSlots) {  // decode: when no expert repeats, every routed slot is its own group
    bool distinct = true;
    for (int64_t s = 0; s < n && distinct; ++s) {
      if (!valid_expert(ids[s], num_experts)) continue;
      for (int64_t p = 0; p < s; ++p) distinct = distinct && ids[p] != ids[s];
    }
    if (distinct) {
      for (int64_t s = 0; s < n; ++s) {
        if (!valid_expert(ids[s], num_experts)) continue;
        sg.row_of_slot[s] = sg.rows();
        sg.slot_of_row.push_back(s);
        sg.expert.push_back(ids[s]);
        sg.begin.push_back(sg.rows());
      }
      return sg;
    }
  }
  std::vector<int64_t> sorted(n), offsets(num_experts + 1);
  sort_by_expert(ids, n, num_experts, -1, sorted.data(), offsets.data());
  sg.slot_of_row.assign(sorted.begin(), sorted.begin() + offsets[num_experts]);
  for (int64_t r = 0; r < sg.rows(); ++r) sg.row_of_slot[sg.slot_of_row[r]] = r;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    sg.expert.push_back(e);
    sg.begin.push_back(offsets[e + 1]);
  }
  return sg;
}

// ---- work items on threads ---------------------------------------------------------------------

// Runs body(item, scratch) for items 0..cost.size()-1: each thread takes one contiguous run of
// items of about equal total cost and one set of scratch buffers. GEMMs inside run single-
// threaded (BLAS does not nest into a parallel region), so an item's result never depends on
// the thread count; items must write disjoint outputs.
template <int kBuffers, typename Body>
void parallel_items(const std::vector<double>& cost, const Body& body) {
  const int64_t n = int64_t(cost.size());
  if (n == 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  auto run = [&](int64_t lo, int64_t hi) {
    Scratch scratch[kBuffers];
    for (int64_t i = lo; i < hi; ++i) body(i, scratch);
  };
  if (threads <= 1 || at::in_parallel_region()) {
    run(0, n);
    return;
  }
  // bounds[p]: the first item whose cost midpoint lies in thread p's share of the total
  std::vector<double> prefix(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost[i];
  std::vector<int64_t> bounds(threads + 1, n);
  bounds[0] = 0;
  for (int64_t p = 1, i = 0; p < threads; ++p) {
    const double share = prefix[n] * double(p) / double(threads);
    while (i < n && prefix[i] + 0.5 * cost[i] < share) ++i;
    bounds[p] = i;
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) run(bounds[p], bounds[p + 1]);
  });
}

// ---- float rows of any float dtype --------------------------------------------------------------

// dst[i] = src[i * stride] as the compute type (float, or double for double).
template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* src, int64_t stride, int64_t n, acc_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) {
      std::memcpy(dst, src, n * sizeof(acc_t));
      return;
    }
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (stride == 1) return load_bf16(reinterpret_cast<const uint16_t*>(src), n, dst);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (stride == 1) return load_f16(reinterpret_cast<const uint16_t*>(src), n, dst);
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = acc_t(src[i * stride]);
}

// dst[i * stride] = src[i], rounded to scalar_t (nearest even).
template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, int64_t n, scalar_t* dst, int64_t stride) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) {
      std::memcpy(dst, src, n * sizeof(acc_t));
      return;
    }
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (stride == 1) return store_bf16(src, n, reinterpret_cast<uint16_t*>(dst));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (stride == 1) return store_f16(src, n, reinterpret_cast<uint16_t*>(dst));
  }
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = scalar_t(src[i]);
}

// ---- math ---------------------------------------------------------------------------------------

// e^x in float32 with plain arithmetic the compiler vectorizes (std::exp does not): x = n ln2 + r
// with |r| <= ln2 / 2 (ln2 split in two so n * hi is exact), e^r by its Taylor series to r^7
// (relative error ~1e-8 before rounding), 2^n put into the exponent bits. Inputs are clamped to
// [-87, 88] so 2^n stays a normal float: results below e^-87 (~1.6e-38) come out as ~e^-87.
MTMERGE_ALWAYS_INLINE float vexp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2) via 1.5 * 2^23
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_float(uint32_t(int32_t(n) + 127) << 23);
}
MTMERGE_ALWAYS_INLINE double vexp(double x) { return std::exp(x); }

// erf(z) by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7).
MTMERGE_ALWAYS_INLINE float verf(float z) {
  const float az = std::fabs(z);
  const float t = 1.0f / (1.0f + 0.3275911f * az);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                                      t * 1.061405429f))));
  return std::copysign(1.0f - poly * vexp(-az * az), z);
}
MTMERGE_ALWAYS_INLINE double verf(double z) { return std::erf(z); }

// tanh(y) = 1 - 2 / (e^{2y} + 1): exact limits +-1, absolute error ~1e-7 near 0.
MTMERGE_ALWAYS_INLINE float vtanh(float y) { return 1.0f - 2.0f / (vexp(2.0f * y) + 1.0f); }
MTMERGE_ALWAYS_INLINE double vtanh(double y) { return std::tanh(y); }

template <typename acc_t>
MTMERGE_ALWAYS_INLINE acc_t vsigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + vexp(-x));
}

// ---- GLU activations ----------------------------------------------------------------------------

enum class Act { kSilu, kGelu, kGeluTanh, kRelu, kGptOss };

using constants::kGptOssAlpha;  // gpt-oss's clamped GLU (mtmerge/_constants.py)
using constants::kGptOssLimit;
constexpr double kGeluTanhC = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kGeluTanhA = 0.044715;
constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

Act parse_activation(c10::string_view name) {
  if (name == "silu") return Act::kSilu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "relu") return Act::kRelu;
  TORCH_CHECK(name == "gpt_oss", "activation must be silu, gelu, gelu_tanh, relu or gpt_oss, got ", name);
  return Act::kGptOss;
}

// a[i] = act(g[i]) * u[i] (gpt_oss: its clamped GLU). One loop per activation so each vectorizes.
template <typename acc_t>
MTMERGE_ALWAYS_INLINE void glu_loop(Act act, const acc_t* g, const acc_t* u, int64_t n, acc_t* a) {
  const acc_t half = acc_t(0.5), one = acc_t(1);
  switch (act) {
    case Act::kSilu:
      for (int64_t i = 0; i < n; ++i) a[i] = g[i] * vsigmoid(g[i]) * u[i];
      break;
    case Act::kGelu:
      for (int64_t i = 0; i < n; ++i) a[i] = half * g[i] * (one + verf(g[i] * acc_t(kSqrtHalf))) * u[i];
      break;
    case Act::kGeluTanh:
      for (int64_t i = 0; i < n; ++i) {
        const acc_t y = acc_t(kGeluTanhC) * (g[i] + acc_t(kGeluTanhA) * g[i] * g[i] * g[i]);
        a[i] = half * g[i] * (one + vtanh(y)) * u[i];
      }
      break;
    case Act::kRelu:
      for (int64_t i = 0; i < n; ++i) a[i] = (g[i] > acc_t(0) ? g[i] : acc_t(0)) * u[i];
      break;
    case Act::kGptOss:
      for (int64_t i = 0; i < n; ++i) {
        const acc_t gc = std::min(g[i], acc_t(kGptOssLimit));
        const acc_t uc = std::min(std::max(u[i], acc_t(-kGptOssLimit)), acc_t(kGptOssLimit));
        a[i] = (uc + one) * (gc * vsigmoid(gc * acc_t(kGptOssAlpha)));
      }
      break;
  }
}

// The derivative: gg[i] = d/dg, gu[i] = d/du of sum_i ga[i] * a[i] (clamps pass the gradient
// inside their closed range, torch.clamp's convention; relu has gradient 0 at 0).
template <typename acc_t>
MTMERGE_ALWAYS_INLINE void glu_backward_loop(Act act, const acc_t* g, const acc_t* u, const acc_t* ga, int64_t n,
                                             acc_t* gg, acc_t* gu) {
  const acc_t half = acc_t(0.5), one = acc_t(1), zero = acc_t(0);
  switch (act) {
    case Act::kSilu:
      for (int64_t i = 0; i < n; ++i) {
        const acc_t s = vsigmoid(g[i]);
        gg[i] = ga[i] * u[i] * (s * (one + g[i] * (one - s)));
        gu[i] = ga[i] * (g[i] * s);
      }
      break;
    case Act::kGelu:
      for (int64_t i = 0; i < n; ++i) {
        const acc_t cdf = half * (one + verf(g[i] * acc_t(kSqrtHalf)));
        const acc_t pdf = vexp(-half * g[i] * g[i]) * acc_t(kInvSqrt2Pi);
        gg[i] = ga[i] * u[i] * (cdf + g[i] * pdf);
        gu[i] = ga[i] * (g[i] * cdf);
      }
      break;
    case Act::kGeluTanh:
      for (int64_t i = 0; i < n; ++i) {
        const acc_t g2 = g[i] * g[i];
        const acc_t th = vtanh(acc_t(kGeluTanhC) * (g[i] + acc_t(kGeluTanhA) * g2 * g[i]));
        const acc_t d = half * (one + th) +
                        half * g[i] * (one - th * th) * acc_t(kGeluTanhC) * (one + acc_t(3 * kGeluTanhA) * g2);
        gg[i] = ga[i] * u[i] * d;
        gu[i] = ga[i] * (half * g[i] * (one + th));
      }
      break;
    case Act::kRelu:
      for (int64_t i = 0; i < n; ++i) {
        gg[i] = g[i] > zero ? ga[i] * u[i] : zero;
        gu[i] = ga[i] * (g[i] > zero ? g[i] : zero);
      }
      break;
    case Act::kGptOss:
      for (int64_t i = 0; i < n; ++i) {
        const acc_t lim = acc_t(kGptOssLimit);
        const acc_t gc = std::min(g[i], lim);
        const acc_t uc = std::min(std::max(u[i], -lim), lim);
        const acc_t s = vsigmoid(gc * acc_t(kGptOssAlpha));
        const acc_t d = s + gc * acc_t(kGptOssAlpha) * s * (one - s);
        gg[i] = g[i] <= lim ? ga[i] * (uc + one) * d : zero;
        gu[i] = (u[i] >= -lim && u[i] <= lim) ? ga[i] * (gc * s) : zero;
      }
      break;
  }
}

MTMERGE_CLONES void glu_f32(Act act, const float* g, const float* u, int64_t n, float* a) {
  glu_loop<float>(act, g, u, n, a);
}
MTMERGE_CLONES void glu_backward_f32(Act act, const float* g, const float* u, const float* ga, int64_t n, float* gg,
                                     float* gu) {
  glu_backward_loop<float>(act, g, u, ga, n, gg, gu);
}
void glu_rows(Act act, const float* g, const float* u, int64_t n, float* a) { glu_f32(act, g, u, n, a); }
void glu_rows(Act act, const double* g, const double* u, int64_t n, double* a) { glu_loop<double>(act, g, u, n, a); }
void glu_backward_rows(Act act, const float* g, const float* u, const float* ga, int64_t n, float* gg, float* gu) {
  glu_backward_f32(act, g, u, ga, n, gg, gu);
}
void glu_backward_rows(Act act, const double* g, const double* u, const double* ga, int64_t n, double* gg,
                       double* gu) {
  glu_backward_loop<double>(act, g, u, ga, n, gg, gu);
}

// ---- small vector loops ------------------------------------------------------------------------

// acc[i] += w * (o[i] + b[i]) (b may be null)
MTMERGE_CLONES void axpy_bias_f32(float w, const float* o, const float* b, int64_t n, float* acc) {
  if (b == nullptr) {
    for (int64_t i = 0; i < n; ++i) acc[i] += w * o[i];
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += w * (o[i] + b[i]);
  }
}
void axpy_bias(float w, const float* o, const float* b, int64_t n, float* acc) { axpy_bias_f32(w, o, b, n, acc); }
void axpy_bias(double w, const double* o, const double* b, int64_t n, double* acc) {
  if (b == nullptr) {
    for (int64_t i = 0; i < n; ++i) acc[i] += w * o[i];
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += w * (o[i] + b[i]);
  }
}

MTMERGE_CLONES void add_f32(const float* b, int64_t n, float* acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += b[i];
}
void add_rows(const float* b, int64_t n, float* acc) { add_f32(b, n, acc); }
void add_rows(const double* b, int64_t n, double* acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += b[i];
}

// Splits [0, n) into `parts` blocks of a width rounded up to a multiple of 16 (the last shorter).
std::vector<int64_t> column_blocks(int64_t n, int64_t parts) {
  const int64_t width = std::max<int64_t>(16, (((n + parts - 1) / parts) + 15) / 16 * 16);
  std::vector<int64_t> edges;
  for (int64_t c = 0; c < n; c += width) edges.push_back(c);
  edges.push_back(n);
  return edges;
}

}  // namespace
}  // namespace mtmerge
