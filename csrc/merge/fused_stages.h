// The fused merge's per-sub-block stages (used by fused.cpp only): tau_hat rows (trim, DARE,
// consensus, rescale), the election sums, the disjoint or linear merge and the output.
// Every loop is one ISA-cloned function (MTMERGE_CLONES) over at most kSub entries.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/constants.h"
#include "common/dtype_io.h"
#include "common/simd.h"
#include "merge/dare.h"
#include "merge/task_inputs.h"

namespace mtmerge {
namespace {

enum class Elect { kNone, kSum, kCount };
enum class MergeRule { kMean, kSum, kMax };

// Everything the pass needs per task and per merge, read from the op's arguments.
struct MergePlan {
  std::vector<float> weights, scales;
  std::vector<uint32_t> threshold_keys, dare_keep, dare_keys;
  std::vector<int64_t> cutoffs;  // flat index of the last tie kept (-1: none, kInt64Max: all)
  Elect elect = Elect::kSum;
  bool elect_weighted = false;
  float zero_fill = 1.0f;
  MergeRule merge = MergeRule::kMean;
  bool divide_by_weight = false;
  float lam = 1.0f;
  int64_t index_offset = 0;  // DARE numbers entry i as flat index index_offset + i
};

MTMERGE_ALWAYS_INLINE float sign_of(float x) { return float(x > 0.0f) - float(x < 0.0f); }

// keep[i] = the trim's decision for tau = d[i]: key above the threshold key, or equal to it at
// a flat index <= cutoff (ties are kept in flat order).
MTMERGE_CLONES void trim_sub_block(const float* __restrict d, uint32_t* __restrict keep, int64_t start, int64_t len,
                                   uint32_t t_key, int64_t cutoff) {
  // ties are kept at local positions i <= last_tie (a 32-bit bound: len <= kSub)
  const int32_t last_tie = int32_t(std::clamp<int64_t>(cutoff - start, -1, kSub));
  for (int32_t i = 0; i < int32_t(len); ++i) {
    const uint32_t key = float_bits(d[i]) & kAbsMask;
    keep[i] = uint32_t(key > t_key) | (uint32_t(key == t_key) & uint32_t(i <= last_tie));
  }
}

// tau_hat = keep ? tau * scale : 0, in place.
MTMERGE_CLONES void apply_keep(float* __restrict d, const uint32_t* __restrict keep, int64_t len, float scale) {
  for (int64_t i = 0; i < len; ++i) d[i] = keep[i] ? d[i] * scale : 0.0f;
}

// Elected values of one task added into the running sum s (weighted and/or signs).
MTMERGE_CLONES void elect_accumulate(const float* __restrict v, int64_t len, float w, bool weighted, bool count,
                                     float* __restrict s) {
  const float ew = weighted ? w : 1.0f;  // v * 1 is exact
  if (count) {
    for (int64_t i = 0; i < len; ++i) s[i] += sign_of(v[i] * ew);
  } else {
    for (int64_t i = 0; i < len; ++i) s[i] += v[i] * ew;
  }
}

// The disjoint merge of one sub-block given the tau_hat rows vals[t] and the sums s.
MTMERGE_CLONES void disjoint_merge(const float* const* vals, int64_t tasks, int64_t len, const float* __restrict s,
                                   const MergePlan& p, float* __restrict merged) {
  alignas(64) float num[kSub], den[kSub], best[kSub], gamma[kSub];
  const float zero_fill = p.zero_fill;  // may be 0 (the paper's code)
  for (int64_t i = 0; i < len; ++i) {
    // sign(S), zero_fill where S == 0; a NaN S (allow_nonfinite) elects 0, as in the reference
    gamma[i] = s[i] > 0.0f ? 1.0f : (s[i] < 0.0f ? -1.0f : (s[i] == 0.0f ? zero_fill : 0.0f));
    num[i] = 0.0f;
    den[i] = 0.0f;
    best[i] = 0.0f;
  }
  const bool weighted = p.elect_weighted;
  for (int64_t t = 0; t < tasks; ++t) {
    const float w = p.weights[t];
    const float share = p.divide_by_weight ? w : 1.0f;
    const float ew = weighted ? w : 1.0f;  // e = v * w or v (times 1: exact)
    const float* __restrict v = vals[t];
    for (int64_t i = 0; i < len; ++i) {
      // "count" elects sign(e), whose sign is e's. gamma = 0 takes the negatives (the paper).
      // (Written with & and | rather than a ternary on bools, which GCC does not vectorize.)
      const float vi = v[i], e = vi * ew, g = gamma[i], b = best[i];
      const bool agree = (vi != 0.0f) & (((g > 0.0f) & (e > 0.0f)) | ((g <= 0.0f) & (e < 0.0f)));
      const float wv = vi * w;
      num[i] = num[i] + (agree ? wv : 0.0f);
      den[i] = den[i] + (agree ? share : 0.0f);
      best[i] = (agree & (std::fabs(wv) > std::fabs(b))) ? wv : b;
    }
  }
  switch (p.merge) {
    case MergeRule::kMean:
      for (int64_t i = 0; i < len; ++i) merged[i] = den[i] != 0.0f ? num[i] / den[i] : num[i];  // num = 0 unless w cancel
      break;
    case MergeRule::kSum:
      for (int64_t i = 0; i < len; ++i) merged[i] = num[i];
      break;
    case MergeRule::kMax:
      for (int64_t i = 0; i < len; ++i) merged[i] = gamma[i] != 0.0f ? best[i] : 0.0f;
      break;
  }
}

// Per-thread scratch: T rows of tau_hat plus base, loads and the running sums.
struct Scratch {
  std::vector<float> rows;
  std::vector<const float*> row_ptrs;
  alignas(64) float base[kSub];
  alignas(64) float load[kSub];
  alignas(64) float sum[kSub];
  alignas(64) float merged[kSub];
  alignas(64) uint32_t keep[kSub];
  const float* base_ptr = nullptr;  // this sub-block's base values (sc.base or the tensor itself)
  explicit Scratch(int64_t tasks) : rows(size_t(tasks * kSub)) {
    for (int64_t t = 0; t < tasks; ++t) row_ptrs.push_back(rows.data() + t * kSub);
  }
  float* row(int64_t t) { return rows.data() + t * kSub; }
};

// The common case of one task's stage 1 (no DARE, no consensus) as ONE loop: tau, trim,
// rescale and election sum, so the data is touched once. Same float operations as the
// separate loops below.
template <bool kCount>
MTMERGE_ALWAYS_INLINE void task_stage_body(const float* __restrict f, const float* __restrict b, int64_t len,
                                           uint32_t t_key, int32_t last_tie, float scale, float ew,
                                           float* __restrict v, float* __restrict s) {
  for (int32_t i = 0; i < int32_t(len); ++i) {
    const float d = f[i] - b[i];
    const uint32_t key = float_bits(d) & kAbsMask;
    const bool keep = (key > t_key) | ((key == t_key) & (i <= last_tie));
    const float vi = keep ? d * scale : 0.0f;
    v[i] = vi;
    if constexpr (kCount) {
      s[i] += sign_of(vi * ew);
    } else {
      s[i] += vi * ew;
    }
  }
}

MTMERGE_CLONES void task_stage(const float* f, const float* b, int64_t len, uint32_t t_key, int32_t last_tie,
                               float scale, float ew, bool count, float* v, float* s) {
  if (count) {
    task_stage_body<true>(f, b, len, t_key, last_tie, scale, ew, v, s);
  } else {
    task_stage_body<false>(f, b, len, t_key, last_tie, scale, ew, v, s);
  }
}

// Stage 1 of a sub-block [start, start + len): the tau_hat rows sc.row(t) and the elected
// sums sc.sum; sc.base_ptr points at the sub-block's base values (zeros without a base).
void trim_and_elect(const TaskInputs& in, const MergePlan& p, int64_t start, int64_t len, Scratch& sc) {
  const float* base = sc.base;  // zeros without a base
  if (in.base.has_value()) {
    prefetch_next(*in.base, start + len, len, in.n);
    base = floats_of(*in.base, start, len, sc.base);
  } else {
    std::fill(sc.base, sc.base + len, 0.0f);
  }
  sc.base_ptr = base;
  std::fill(sc.sum, sc.sum + len, 0.0f);
  for (int64_t t = 0; t < in.tasks(); ++t) {
    float* v = sc.row(t);
    prefetch_next(in.finetuned[t], start + len, len, in.n);
    const float* f = floats_of(in.finetuned[t], start, len, sc.load);
    if (p.dare_keep[t] == constants::kDareKeepOne && !in.consensus) {  // the fused one-loop path
      const int32_t last_tie = int32_t(std::clamp<int64_t>(p.cutoffs[t] - start, -1, kSub));
      // elect "none" sums into sc.sum too, unused (cheaper than a branch per element)
      const float ew = p.elect_weighted ? p.weights[t] : 1.0f;
      task_stage(f, base, len, p.threshold_keys[t], last_tie, p.scales[t], ew, p.elect == Elect::kCount, v, sc.sum);
      continue;
    }
    subtract(f, base, len, v);
    trim_sub_block(v, sc.keep, start, len, p.threshold_keys[t], p.cutoffs[t]);
    if (p.dare_keep[t] < constants::kDareKeepOne) {
      dare_filter(p.index_offset + start, len, p.dare_keys[t], p.dare_keep[t], sc.keep);
    }
    if (in.consensus) consensus_filter(in.consensus, start, len, sc.keep);
    apply_keep(v, sc.keep, len, p.scales[t]);
    if (p.elect != Elect::kNone) {
      elect_accumulate(v, len, p.weights[t], p.elect_weighted, p.elect == Elect::kCount, sc.sum);
    }
  }
}

MTMERGE_CLONES void linear_merge(const float* const* vals, int64_t tasks, int64_t len, const float* weights,
                                 float* merged) {
  for (int64_t i = 0; i < len; ++i) merged[i] = 0.0f;
  for (int64_t t = 0; t < tasks; ++t) {
    const float* v = vals[t];
    const float w = weights[t];
    for (int64_t i = 0; i < len; ++i) merged[i] += v[i] * w;
  }
}

MTMERGE_CLONES void finish_output(const float* base, const float* merged, int64_t len, float lam, bool has_base,
                                  float* result) {
  for (int64_t i = 0; i < len; ++i) result[i] = has_base ? base[i] + merged[i] * lam : merged[i] * lam;
}

}  // namespace
}  // namespace mtmerge
