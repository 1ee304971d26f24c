// The hot loops of the radix selection over magnitude keys (bit patterns of |x|): digit
// histograms, gathers of one bin, threshold compares (plain and bit-packed) and the sampled
// window pass (AVX-512 compress, AVX2 permutation table, or scalar, chosen at run time).
// Each is compiled per ISA (MTMERGE_CLONES). Used by select.h's selection drivers.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string_view>
#include <vector>

#include "common/constants.h"
#include "common/simd.h"
#include "merge/select_stats.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif


namespace mtmerge {
namespace {  // each translation unit gets its own copy (and its own ISA clones)

// ---------------------------------------------------------------------------------------
// Hot loops. Each is compiled per ISA (MTMERGE_CLONES); the bodies are templates on the key
// width (uint32_t for fp32, uint16_t for bf16/fp16), force-inlined into each clone.
// ---------------------------------------------------------------------------------------

// Counts digits of |x| keys: hist[(key >> shift) & digit_mask] for keys whose bits under
// prefix_mask equal prefix. Also counts keys above inf_key (NaN) when count_nan is set.
// Two interleaved sub-histograms halve the store-to-load dependency chains.
template <typename K>
MTMERGE_ALWAYS_INLINE void histogram_body(const K* keys, int64_t n, uint32_t abs_mask,
                                          uint32_t prefix, uint32_t prefix_mask, int shift,
                                          uint32_t digit_mask, uint32_t inf_key, int64_t* hist,
                                          int64_t* nan_count) {
  constexpr int64_t kFlushEvery = int64_t(1) << 30;  // keep uint32 sub-counts from overflowing
  const int64_t nbins = int64_t(digit_mask) + 1;
  std::vector<uint32_t> sub(2 * (nbins + 1));  // h0, h1, each with a spare bin for filtered-out keys
  uint32_t* h0 = sub.data();
  uint32_t* h1 = sub.data() + nbins + 1;
  int64_t nan = 0;
  for (int64_t start = 0; start < n; start += kFlushEvery) {
    const int64_t stop = std::min(n, start + kFlushEvery);
    std::fill(sub.begin(), sub.end(), 0u);
    if (prefix_mask == 0) {
      int64_t i = start;
      for (; i + 1 < stop; i += 2) {
        const uint32_t a = uint32_t(keys[i]) & abs_mask;
        const uint32_t b = uint32_t(keys[i + 1]) & abs_mask;
        nan += (a > inf_key) + (b > inf_key);
        ++h0[(a >> shift) & digit_mask];
        ++h1[(b >> shift) & digit_mask];
      }
      for (; i < stop; ++i) {
        const uint32_t a = uint32_t(keys[i]) & abs_mask;
        nan += a > inf_key;
        ++h0[(a >> shift) & digit_mask];
      }
    } else {
      // Branch-free filter: entries outside the prefix land in a spare bin past the end
      // (matches are data-dependent and mispredict badly as branches). Two interleaved
      // histograms here too: tie-heavy keys hit the same bin back to back.
      auto bin_of = [&](uint32_t a) {
        return (a & prefix_mask) == prefix ? (a >> shift) & digit_mask : uint32_t(nbins);
      };
      int64_t i = start;
      for (; i + 1 < stop; i += 2) {
        ++h0[bin_of(uint32_t(keys[i]) & abs_mask)];
        ++h1[bin_of(uint32_t(keys[i + 1]) & abs_mask)];
      }
      for (; i < stop; ++i) ++h0[bin_of(uint32_t(keys[i]) & abs_mask)];
    }
    for (int64_t b = 0; b < nbins; ++b) hist[b] += int64_t(h0[b]) + int64_t(h1[b]);
  }
  *nan_count += nan;
}

// Appends the |x| keys whose bits under prefix_mask equal prefix to out; returns how many.
template <typename K>
MTMERGE_ALWAYS_INLINE int64_t gather_body(const K* keys, int64_t n, uint32_t abs_mask,
                                          uint32_t prefix, uint32_t prefix_mask, K* out) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const K a = K(uint32_t(keys[i]) & abs_mask);
    out[count] = a;  // branch-free compaction: written always, kept only on a match
    count += (uint32_t(a) & prefix_mask) == prefix;
  }
  return count;
}

// out[i] = |x_i| > t (or >= t when geq), as bytes 0/1. Returns how many |x_i| == t.
template <typename K>
MTMERGE_ALWAYS_INLINE int64_t compare_body(const K* keys, int64_t n, uint32_t abs_mask, uint32_t t,
                                           bool geq, bool* out) {
  const uint32_t bound = geq ? t : t + 1;  // key > t  <=>  key >= t + 1 (t <= inf, no wrap)
  int64_t equal = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t a = uint32_t(keys[i]) & abs_mask;
    out[i] = a >= bound;
    equal += a == t;
  }
  return equal;
}

// Same comparison, bit-packed: bit j of out[i] is entry 8i+j (numpy bitorder="little").
template <typename K>
MTMERGE_ALWAYS_INLINE int64_t compare_packed_body(const K* keys, int64_t n, uint32_t abs_mask,
                                                  uint32_t t, bool geq, uint8_t* out) {
  const uint32_t bound = geq ? t : t + 1;
  const int64_t full_bytes = n / 8;
  int64_t equal = 0;
  for (int64_t i = 0; i < full_bytes; ++i) {
    uint32_t byte = 0;
    for (int j = 0; j < 8; ++j) {
      const uint32_t a = uint32_t(keys[8 * i + j]) & abs_mask;
      byte |= uint32_t(a >= bound) << j;
      equal += a == t;
    }
    out[i] = uint8_t(byte);
  }
  if (n % 8) {
    uint32_t byte = 0;
    for (int64_t j = 0; j < n % 8; ++j) {
      const uint32_t a = uint32_t(keys[8 * full_bytes + j]) & abs_mask;
      byte |= uint32_t(a >= bound) << j;
      equal += a == t;
    }
    out[full_bytes] = uint8_t(byte);
  }
  return equal;
}

#define MTMERGE_STAMP_KEY_LOOPS(K, SUFFIX)                                                        \
  MTMERGE_CLONES void histogram_##SUFFIX(const K* keys, int64_t n, uint32_t abs_mask,             \
                                         uint32_t prefix, uint32_t prefix_mask, int shift,        \
                                         uint32_t digit_mask, uint32_t inf_key, int64_t* hist,    \
                                         int64_t* nan_count) {                                    \
    histogram_body<K>(keys, n, abs_mask, prefix, prefix_mask, shift, digit_mask, inf_key, hist,   \
                      nan_count);                                                                 \
  }                                                                                               \
  MTMERGE_CLONES int64_t gather_##SUFFIX(const K* keys, int64_t n, uint32_t abs_mask,             \
                                         uint32_t prefix, uint32_t prefix_mask, K* out) {         \
    return gather_body<K>(keys, n, abs_mask, prefix, prefix_mask, out);                           \
  }                                                                                               \
  MTMERGE_CLONES int64_t compare_##SUFFIX(const K* keys, int64_t n, uint32_t abs_mask, uint32_t t, \
                                          bool geq, bool* out) {                                  \
    return compare_body<K>(keys, n, abs_mask, t, geq, out);                                       \
  }                                                                                               \
  MTMERGE_CLONES int64_t compare_packed_##SUFFIX(const K* keys, int64_t n, uint32_t abs_mask,     \
                                                 uint32_t t, bool geq, uint8_t* out) {            \
    return compare_packed_body<K>(keys, n, abs_mask, t, geq, out);                                \
  }

MTMERGE_STAMP_KEY_LOOPS(uint32_t, u32)
MTMERGE_STAMP_KEY_LOOPS(uint16_t, u16)
#undef MTMERGE_STAMP_KEY_LOOPS

// Window pass: one read of the data that counts keys above hi and NaN keys, and copies the
// keys in [lo, hi] (widened to uint32) to out. out needs room for count + n + 16 entries:
// the vector versions store whole registers past the kept entries.
struct WindowTally {
  int64_t above = 0;
  int64_t nan = 0;
  int64_t kept = 0;
};

template <typename K>
MTMERGE_ALWAYS_INLINE void window_scalar_body(const K* keys, int64_t n, uint32_t abs_mask, uint32_t lo,
                                              uint32_t hi, uint32_t inf_key, uint32_t* out, WindowTally& tally) {
  int64_t above = 0, nan = 0, kept = tally.kept;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t a = uint32_t(keys[i]) & abs_mask;
    above += a > hi;
    nan += a > inf_key;
    out[kept] = a;  // branch-free compaction
    kept += (a >= lo) & (a <= hi);
  }
  tally.above += above;
  tally.nan += nan;
  tally.kept = kept;
}

template <typename K>
void window_scalar(const K* keys, int64_t n, uint32_t abs_mask, uint32_t lo, uint32_t hi, uint32_t inf_key,
                   uint32_t* out, WindowTally& tally) {
  window_scalar_body<K>(keys, n, abs_mask, lo, hi, inf_key, out, tally);
}

#if defined(__x86_64__) && defined(__GNUC__)
// AVX-512: compare 16 keys at once, compress the kept ones into a register, store it whole.
template <typename K>
__attribute__((target("avx512f,popcnt"))) void window_avx512(const K* keys, int64_t n, uint32_t abs_mask,
                                                             uint32_t lo, uint32_t hi, uint32_t inf_key,
                                                             uint32_t* out, WindowTally& tally) {
  const __m512i vmask = _mm512_set1_epi32(int(abs_mask));
  const __m512i vlo = _mm512_set1_epi32(int(lo));
  const __m512i vhi = _mm512_set1_epi32(int(hi));
  const __m512i vinf = _mm512_set1_epi32(int(inf_key));
  int64_t above = 0, nan = 0, kept = tally.kept, i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i raw;
    if constexpr (sizeof(K) == 4) {
      raw = _mm512_loadu_si512(keys + i);
    } else {
      raw = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i)));
    }
    const __m512i a = _mm512_and_si512(raw, vmask);
    const __mmask16 gt_hi = _mm512_cmpgt_epu32_mask(a, vhi);
    const __mmask16 in_window = _mm512_cmpge_epu32_mask(a, vlo) & __mmask16(~gt_hi);
    above += __builtin_popcount(gt_hi);
    nan += __builtin_popcount(_mm512_cmpgt_epu32_mask(a, vinf));
    _mm512_storeu_si512(out + kept, _mm512_maskz_compress_epi32(in_window, a));
    kept += __builtin_popcount(in_window);
  }
  tally.above += above;
  tally.nan += nan;
  tally.kept = kept;
  window_scalar_body<K>(keys + i, n - i, abs_mask, lo, hi, inf_key, out, tally);
}

// AVX2 has no compress: a 256-entry table of lane permutations does it, 8 keys at a time.
struct CompressTable {
  alignas(32) int32_t lanes[256][8];
  CompressTable() {
    for (int m = 0; m < 256; ++m) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (m & (1 << lane)) lanes[m][next++] = lane;
      while (next < 8) lanes[m][next++] = 0;
    }
  }
};
const CompressTable kCompressTable;

template <typename K>
__attribute__((target("avx2,popcnt"))) void window_avx2(const K* keys, int64_t n, uint32_t abs_mask, uint32_t lo,
                                                        uint32_t hi, uint32_t inf_key, uint32_t* out,
                                                        WindowTally& tally) {
  // Keys are below 2^31 (sign bit cleared), so AVX2's signed compares order them correctly.
  const __m256i vmask = _mm256_set1_epi32(int(abs_mask));
  const __m256i vlo_minus_1 = _mm256_set1_epi32(int(lo) - 1);
  const __m256i vhi = _mm256_set1_epi32(int(hi));
  const __m256i vinf = _mm256_set1_epi32(int(inf_key));
  int64_t above = 0, nan = 0, kept = tally.kept, i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i raw;
    if constexpr (sizeof(K) == 4) {
      raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i));
    } else {
      raw = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + i)));
    }
    const __m256i a = _mm256_and_si256(raw, vmask);
    const __m256i gt_hi = _mm256_cmpgt_epi32(a, vhi);
    const __m256i in_window = _mm256_andnot_si256(gt_hi, _mm256_cmpgt_epi32(a, vlo_minus_1));
    const int m = _mm256_movemask_ps(_mm256_castsi256_ps(in_window));
    above += __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(gt_hi)));
    nan += __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(a, vinf))));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompressTable.lanes[m]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kept), _mm256_permutevar8x32_epi32(a, perm));
    kept += __builtin_popcount(m);
  }
  tally.above += above;
  tally.nan += nan;
  tally.kept = kept;
  window_scalar_body<K>(keys + i, n - i, abs_mask, lo, hi, inf_key, out, tally);
}
#endif

template <typename K>
using WindowFn = void (*)(const K*, int64_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t*, WindowTally&);

// The best window pass for this CPU, chosen once at run time. MTMERGE_MAX_ISA=avx2 or
// =default caps the choice (tests use it to run every version on one machine; see
// select_stats.h).
template <typename K>
WindowFn<K> best_window_fn() {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (merge::window_isa()) {
    case merge::WindowIsa::kAvx512:
      return &window_avx512<K>;
    case merge::WindowIsa::kAvx2:
      return &window_avx2<K>;
    default:
      break;
  }
#endif
  return &window_scalar<K>;
}

template <typename K>
WindowFn<K> window_fn() {
  static const WindowFn<K> chosen = best_window_fn<K>();
  return chosen;
}

// Overloads so the templated drivers below can call the stamped loops by key type.
struct Loops32 {
  static constexpr auto histogram = histogram_u32;
  static constexpr auto gather = gather_u32;
  static constexpr auto compare = compare_u32;
  static constexpr auto compare_packed = compare_packed_u32;
};
struct Loops16 {
  static constexpr auto histogram = histogram_u16;
  static constexpr auto gather = gather_u16;
  static constexpr auto compare = compare_u16;
  static constexpr auto compare_packed = compare_packed_u16;
};

}  // namespace
}  // namespace mtmerge
