// Small-M dot kernel of the experts: an expert with few rows (decode, fine-grained experts) is
// bound by reading its weights, which a BLAS GEMM at M = 1..16 does far from the memory's speed.
// Here each weight row is streamed once and dotted with every token row while it sits in L1.
//
// dots2(w0, w1, K, x, ldx, n, out): out[j] = <w0, x_j>, out[n + j] = <w1, x_j> for j < n, all
// float32 (weights float32 or bfloat16, widened in registers), x_j = x + j * ldx. Two weight rows
// a call (gate and up rows of one column, or two down rows), a tile of token rows at a time. Each
// dot keeps 16 lane sums (element k goes to lane k % 16), adds them in a fixed tree, then the
// tail k >= 16 * (K / 16) in order: the same order in every ISA version, whatever the thread
// count. The versions differ in the token tile (register pressure) and in FMA (see below).
//
// Version choice: the best of avx512f / avx2 / default for this CPU, capped by MTMERGE_MAX_ISA
// (the choice the merge family makes, read through merge::window_isa(), so mtmerge._C.window_isa()
// reports it); tests run each version in a subprocess.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include <c10/util/BFloat16.h>

#include "common/simd.h"
#include "merge/select_stats.h"

namespace mtmerge {
namespace {

// Lanes16 values never cross a non-inlined call, so GCC's note on their ABI does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float Lanes16 __attribute__((vector_size(64)));          // 1 zmm, 2 ymm or 4 xmm registers
typedef uint16_t Halves16 __attribute__((vector_size(32)));       // 16 bfloat16 bit patterns
typedef uint32_t Words16 __attribute__((vector_size(64)));

// 16 weights as float32: float32 loaded, bfloat16 widened exactly (its bits are a float's top half).
MTMERGE_ALWAYS_INLINE Lanes16 load16(const float* p) {
  Lanes16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
MTMERGE_ALWAYS_INLINE Lanes16 load16(const c10::BFloat16* p) {
  Halves16 h;
  std::memcpy(&h, p, sizeof h);
  const Words16 w = __builtin_convertvector(h, Words16) << 16;
  Lanes16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
MTMERGE_ALWAYS_INLINE float load1(const float* p) { return *p; }
MTMERGE_ALWAYS_INLINE float load1(const c10::BFloat16* p) { return float(*p); }

MTMERGE_ALWAYS_INLINE float sum16(Lanes16 v) {
  float s[16];
  std::memcpy(s, &v, sizeof s);
  for (int i = 0; i < 8; ++i) s[i] += s[i + 8];
  for (int i = 0; i < 4; ++i) s[i] += s[i + 4];
  return (s[0] + s[2]) + (s[1] + s[3]);
}

constexpr int64_t kPrefetchBytes = 2048;  // measured on Zen 4: 1-2 KiB ahead saves ~15% at 8 rows

// out[j] = <w0, x_j>, out[ldo + j] = <w1, x_j> for j < TM.
template <int TM, typename W>
MTMERGE_ALWAYS_INLINE void dot_tile(const W* w0, const W* w1, int64_t K, const float* x, int64_t ldx, float* out,
                                    int64_t ldo) {
  Lanes16 acc0[TM], acc1[TM];
#pragma GCC unroll 8
  for (int j = 0; j < TM; ++j) acc0[j] = acc1[j] = Lanes16{};
  const int64_t K16 = K / 16 * 16;
  for (int64_t k = 0; k < K16; k += 16) {
    // the weights come from memory once: ask for them kPrefetchBytes ahead (past a row's end is
    // the next row, usually the next call's; a prefetch never faults)
    __builtin_prefetch(reinterpret_cast<const char*>(w0 + k) + kPrefetchBytes);
    __builtin_prefetch(reinterpret_cast<const char*>(w1 + k) + kPrefetchBytes);
    const Lanes16 a = load16(w0 + k), b = load16(w1 + k);
#pragma GCC unroll 8
    for (int j = 0; j < TM; ++j) {
      const Lanes16 xv = load16(x + j * ldx + k);
      acc0[j] += a * xv;
      acc1[j] += b * xv;
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < TM; ++j) {
    float s0 = sum16(acc0[j]), s1 = sum16(acc1[j]);
    for (int64_t k = K16; k < K; ++k) {
      s0 += load1(w0 + k) * x[j * ldx + k];
      s1 += load1(w1 + k) * x[j * ldx + k];
    }
    out[j] = s0;
    out[ldo + j] = s1;
  }
}

template <int TM, typename W>
MTMERGE_ALWAYS_INLINE void dots2_body(const void* w0v, const void* w1v, int64_t K, const float* x, int64_t ldx,
                                      int64_t n, float* out) {
  const W *w0 = static_cast<const W*>(w0v), *w1 = static_cast<const W*>(w1v);
  int64_t j = 0;
  for (; j + TM <= n; j += TM) dot_tile<TM>(w0, w1, K, x + j * ldx, ldx, out + j, n);
  switch (n - j) {  // the last few token rows
    case 3:
      dot_tile<3>(w0, w1, K, x + j * ldx, ldx, out + j, n);
      break;
    case 2:
      dot_tile<2>(w0, w1, K, x + j * ldx, ldx, out + j, n);
      break;
    case 1:
      dot_tile<1>(w0, w1, K, x + j * ldx, ldx, out + j, n);
      break;
    default:
      break;
  }
}

// The weight rows are float32 or bfloat16 (float16 rows are widened by the caller).
using Dots2Fn = void (*)(const void*, const void*, int64_t, const float*, int64_t, int64_t, float*);

// The x86 versions may fuse multiply-adds (FMA: the build's -ffp-contract=off is lifted here
// only), so float32 bits may differ between versions; bfloat16 / float16 products are exact in
// float32, so there the avx512f and avx2 versions agree bit for bit (tested).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MTMERGE_MOE_DOTS_ISA 1
template <typename W>
__attribute__((target("avx512f,fma"), optimize("fp-contract=fast"))) void dots2_avx512(
    const void* w0, const void* w1, int64_t K, const float* x, int64_t ldx, int64_t n, float* out) {
  dots2_body<4, W>(w0, w1, K, x, ldx, n, out);  // 8 accumulators + 2 weights + 1 token: 11 of 32 zmm
}
template <typename W>
__attribute__((target("avx2,fma"), optimize("fp-contract=fast"))) void dots2_avx2(
    const void* w0, const void* w1, int64_t K, const float* x, int64_t ldx, int64_t n, float* out) {
  dots2_body<2, W>(w0, w1, K, x, ldx, n, out);  // 4 accumulators of 2 ymm each + 6 ymm loads
}
#else
#define MTMERGE_MOE_DOTS_ISA 0
#endif
template <typename W>
void dots2_default(const void* w0, const void* w1, int64_t K, const float* x, int64_t ldx, int64_t n, float* out) {
  dots2_body<2, W>(w0, w1, K, x, ldx, n, out);
}

template <typename W>
Dots2Fn dots2_fn() {
  static const Dots2Fn chosen = [] {
#if MTMERGE_MOE_DOTS_ISA
    switch (merge::window_isa()) {
      case merge::WindowIsa::kAvx512:
        return &dots2_avx512<W>;
      case merge::WindowIsa::kAvx2:
        return &dots2_avx2<W>;
      default:
        break;
    }
#endif
    return &dots2_default<W>;
  }();
  return chosen;
}

#pragma GCC diagnostic pop

// A float buffer per thread and slot that only grows: the small path runs per token and must not
// allocate (or page-fault fresh memory) on every call.
float* thread_floats(int slot, int64_t n) {
  thread_local std::vector<float> bufs[6];
  std::vector<float>& b = bufs[slot];
  if (int64_t(b.size()) < n) b.resize(size_t(n));
  return b.data();
}

}  // namespace
}  // namespace mtmerge
