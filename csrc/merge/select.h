// Radix selection of the k-th largest magnitude, shared by the merge kernels
// (select.cpp: magnitude_threshold / threshold_mask; trim.cpp: delta_threshold).
//
// Radix selection on bit patterns. For IEEE floats with the sign bit cleared, the unsigned
// integer order of the bit pattern is the order of |x| (+inf included; NaN sorts above inf
// and is rejected). So the k-th largest |x| is found digit by digit, most significant first:
// one histogram of the top digit over all the data, pick the bin that holds the k-th
// largest, then resolve the next digit among the entries of that bin only. After the first
// pass the entries of the chosen bin are usually few, so they are copied into a small
// candidate buffer and the later digits never touch the full data again.
//
// Determinism: every reduction here is an integer count, merged in any order to the same
// value, so results do not depend on the thread count or chunking.
#pragma once

#include "merge/key_loops.h"

namespace mtmerge {
namespace {

// ---------------------------------------------------------------------------------------
// Key formats per dtype.
// ---------------------------------------------------------------------------------------

struct Digit {
  int shift;
  int bits;
};

struct KeyFormat {
  uint32_t abs_mask;  // clears the sign bit
  uint32_t inf_key;   // bit pattern of +inf; anything above is NaN
  std::vector<Digit> digits;  // most significant first, covering every bit of abs_mask
};

KeyFormat key_format(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:  // 31 bits: 11 + 11 + 9; 2048 bins of uint32 fit in L1
      return {0x7fffffffu, constants::kF32InfKey, {{20, 11}, {9, 11}, {0, 9}}};
    case at::kBFloat16:  // 15 bits: 11 + 4
      return {0x7fffu, 0x7f80u, {{4, 11}, {0, 4}}};
    case at::kHalf:
      return {0x7fffu, 0x7c00u, {{4, 11}, {0, 4}}};
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, "x must be float32, bfloat16 or float16, got ", dtype);
  return {};  // unreachable
}

// ---------------------------------------------------------------------------------------
// A list of tensors seen as one flat vector of keys, walked in chunks.
// ---------------------------------------------------------------------------------------

template <typename K>
struct KeySegments {
  std::vector<const K*> data;
  std::vector<int64_t> offsets;  // offsets[i] = flat index where segment i starts; back() = total

  int64_t total() const { return offsets.back(); }

  // Calls fn(ptr, len) for each piece of segments overlapping the flat range [begin, end).
  template <typename Fn>
  void for_each_piece(int64_t begin, int64_t end, Fn&& fn) const {
    auto it = std::upper_bound(offsets.begin(), offsets.end(), begin);
    for (size_t s = size_t(it - offsets.begin()) - 1; s < data.size() && offsets[s] < end; ++s) {
      const int64_t lo = std::max(begin, offsets[s]);
      const int64_t hi = std::min(end, offsets[s + 1]);
      if (hi > lo) fn(data[s] + (lo - offsets[s]), hi - lo);
    }
  }
};

constexpr int64_t kGrain = int64_t(1) << 16;

// Source: anything with total() and for_each_piece(begin, end, fn(const K*, len)) -- a
// KeySegments, or a view that computes keys on the fly (task_inputs.h's TaskKeySource).
template <typename K, typename Loops, typename Source>
std::vector<int64_t> parallel_histogram(const Source& segs, const KeyFormat& fmt,
                                        uint32_t prefix, uint32_t prefix_mask, Digit digit,
                                        int64_t* nan_count) {
  const int64_t nbins = int64_t(1) << digit.bits;
  const uint32_t digit_mask = uint32_t(nbins - 1);
  std::vector<int64_t> hist(nbins, 0);
  std::mutex merge_lock;
  at::parallel_for(0, segs.total(), kGrain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> local(nbins, 0);
    int64_t local_nan = 0;
    segs.for_each_piece(begin, end, [&](const K* p, int64_t len) {
      Loops::histogram(p, len, fmt.abs_mask, prefix, prefix_mask, digit.shift, digit_mask,
                       fmt.inf_key, local.data(), &local_nan);
    });
    std::lock_guard<std::mutex> guard(merge_lock);  // integer sums: order does not matter
    for (int64_t b = 0; b < nbins; ++b) hist[b] += local[b];
    *nan_count += local_nan;
  });
  return hist;
}

template <typename K, typename Loops, typename Source>
std::vector<K> parallel_gather(const Source& segs, const KeyFormat& fmt, uint32_t prefix,
                               uint32_t prefix_mask, int64_t expected) {
  std::vector<K> out;
  out.reserve(size_t(expected));
  std::mutex merge_lock;
  at::parallel_for(0, segs.total(), kGrain, [&](int64_t begin, int64_t end) {
    // Uninitialized on purpose: only the pages the compaction writes get touched.
    std::unique_ptr<K[]> local(new K[size_t(end - begin)]);
    int64_t count = 0;
    segs.for_each_piece(begin, end, [&](const K* p, int64_t len) {
      count += Loops::gather(p, len, fmt.abs_mask, prefix, prefix_mask, local.get() + count);
    });
    std::lock_guard<std::mutex> guard(merge_lock);  // candidate order is irrelevant: only counts are used
    out.insert(out.end(), local.get(), local.get() + count);
  });
  return out;
}

// NaN has no magnitude order: every selection path rejects it with the same ValueError.
void reject_nan(int64_t nan_count) {
  TORCH_CHECK_VALUE(nan_count == 0, "x contains ", nan_count, " NaN value(s); magnitude selection is undefined for NaN");
}

struct Selected {
  uint32_t key;     // the rank-th largest |x| key
  int64_t greater;  // entries with a larger key
  int64_t equal;    // entries with exactly this key
};

// The rank-th largest |x| key (1 <= rank <= n) over all of source. When every key is known
// to lie in [known_lo, known_hi] (a window copy), the leading digits the two bounds share are
// shared by every key too: those levels are settled without a pass (they would histogram all
// keys into one bin, the slowest case).
template <typename K, typename Loops, typename Source>
Selected select_rank_from_top(const Source& all, const KeyFormat& fmt, int64_t rank, uint32_t known_lo = 1,
                              uint32_t known_hi = 0) {
  std::vector<K> candidates;
  KeySegments<K> gathered;
  bool use_gathered = false;
  bool shared = known_lo <= known_hi;  // every level so far was settled by the bounds
  uint32_t prefix = 0, prefix_mask = 0;
  int64_t greater = 0, equal = 0, remaining = rank;
  for (size_t level = 0; level < fmt.digits.size(); ++level) {
    const Digit digit = fmt.digits[level];
    const uint32_t level_mask = ((uint32_t(1) << digit.bits) - 1) << digit.shift;
    shared = shared && (known_lo & level_mask) == (known_hi & level_mask);
    if (shared) {
      prefix |= known_lo & level_mask;
      prefix_mask |= level_mask;
      equal = all.total();  // every key has this prefix (all of the key, at the last level)
      continue;
    }
    int64_t nan_count = 0;
    std::vector<int64_t> hist =
        use_gathered ? parallel_histogram<K, Loops>(gathered, fmt, prefix, prefix_mask, digit, &nan_count)
                     : parallel_histogram<K, Loops>(all, fmt, prefix, prefix_mask, digit, &nan_count);
    reject_nan(nan_count);
    // Walk bins from the top until the bin that holds the remaining-th largest entry.
    int64_t above = 0;
    int64_t bin = int64_t(hist.size()) - 1;
    while (bin > 0 && above + hist[bin] < remaining) above += hist[bin--];
    greater += above;
    remaining -= above;
    equal = hist[bin];
    prefix |= uint32_t(bin) << digit.shift;
    prefix_mask |= uint32_t(hist.size() - 1) << digit.shift;
    // Few entries share the chosen prefix: copy them once, resolve the rest there.
    const bool more_levels = level + 1 < fmt.digits.size();
    if (more_levels && !use_gathered && equal <= all.total() / 8) {
      candidates = parallel_gather<K, Loops>(all, fmt, prefix, prefix_mask, equal);
      gathered.data = {candidates.data()};
      gathered.offsets = {0, int64_t(candidates.size())};
      use_gathered = true;
    }
  }
  return {prefix, greater, equal};
}

// Fast path for large inputs (Floyd-Rivest style): a fixed-stride sample of |x| brackets the
// rank-th largest key in [lo, hi]; ONE vectorized pass counts the keys above hi and copies
// the keys inside the bracket; radix selection then runs on that small copy. If the bracket
// misses (the sample misled) or holds too many keys, returns false and the caller runs the
// plain radix passes. Either way the answer is exact; the sample only decides the speed.
constexpr int64_t kWindowMinEntries = int64_t(1) << 18;

// The bracket [lo, hi] from a fixed-stride sample of 16K keys; false when the input is too
// small or the bracket too wide to pay off.
template <typename K, typename Source>
bool window_bracket(const Source& segs, const KeyFormat& fmt, int64_t rank, uint32_t* lo_out, uint32_t* hi_out) {
  const int64_t n = segs.total();
  if (n < kWindowMinEntries) return false;
  constexpr int64_t kSample = 16384;
  std::vector<uint32_t> sample(kSample);
  const int64_t stride = n / kSample;
  for (int64_t j = 0; j < kSample; ++j) {
    segs.for_each_piece(j * stride + stride / 2, j * stride + stride / 2 + 1,
                        [&](const K* p, int64_t) { sample[j] = uint32_t(*p) & fmt.abs_mask; });
  }
  // Expected sample position of the rank-th largest, +- 4.5 standard deviations of a
  // binomial (a miss costs time, never correctness).
  const double q = double(rank) / double(n);
  const double center = q * kSample;
  const double margin = 4.5 * std::sqrt(kSample * q * (1.0 - q)) + 8.0;
  const int64_t top = int64_t(center - margin);
  const int64_t bottom = int64_t(center + margin);
  if (double(bottom - top) > 0.25 * kSample) return false;  // a wide bracket saves nothing
  auto largest = [&](int64_t pos) {  // the (pos+1)-th largest sampled key
    std::nth_element(sample.begin(), sample.begin() + pos, sample.end(), std::greater<uint32_t>());
    return sample[pos];
  };
  *hi_out = top <= 0 ? fmt.inf_key : largest(top);
  *lo_out = bottom >= kSample - 1 ? 0u : largest(bottom);
  if (*lo_out == *hi_out) merge::bump(merge::selection_stats.single_key_brackets);
  return true;
}

// After a window pass: the rank-th largest key from the tallies and the in-window copy, or
// false when the bracket missed.
inline bool finish_window(const KeyFormat& fmt, int64_t rank, const WindowTally& total,
                          std::vector<uint32_t>& candidates, uint32_t lo, uint32_t hi, Selected* result);

template <typename K, typename Source>
bool select_with_window(const Source& segs, const KeyFormat& fmt, int64_t rank, Selected* result) {
  const int64_t n = segs.total();
  uint32_t lo = 0, hi = 0;
  if (!window_bracket<K>(segs, fmt, rank, &lo, &hi)) return false;

  const WindowFn<K> window = window_fn<K>();
  constexpr int64_t kBlockLen = 4096;
  WindowTally total;
  bool overflow = false;
  std::vector<uint32_t> candidates;
  std::mutex merge_lock;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    // Room for a quarter of the chunk; uninitialized, so untouched pages cost nothing.
    const int64_t capacity = (end - begin) / 4 + kBlockLen;
    std::unique_ptr<uint32_t[]> local(new uint32_t[size_t(capacity + kBlockLen + 16)]);
    WindowTally tally;
    bool full = false;
    segs.for_each_piece(begin, end, [&](const K* p, int64_t len) {
      for (int64_t off = 0; off < len && !full; off += kBlockLen) {
        full = tally.kept > capacity;
        if (!full) window(p + off, std::min(kBlockLen, len - off), fmt.abs_mask, lo, hi, fmt.inf_key, local.get(), tally);
      }
    });
    std::lock_guard<std::mutex> guard(merge_lock);  // candidate order is irrelevant: only counts are used
    overflow |= full;
    total.above += tally.above;
    total.nan += tally.nan;
    if (!full) candidates.insert(candidates.end(), local.get(), local.get() + tally.kept);
  });
  if (overflow) {
    merge::bump(merge::selection_stats.window_overflows);
    return false;
  }
  return finish_window(fmt, rank, total, candidates, lo, hi, result);
}

inline bool finish_window(const KeyFormat& fmt, int64_t rank, const WindowTally& total,
                          std::vector<uint32_t>& candidates, uint32_t lo, uint32_t hi, Selected* result) {
  reject_nan(total.nan);
  const int64_t in_window = int64_t(candidates.size());
  if (!(total.above < rank && rank <= total.above + in_window)) {  // the bracket missed
    merge::bump(merge::selection_stats.bracket_misses);
    return false;
  }
  merge::bump(merge::selection_stats.window_hits);

  KeySegments<uint32_t> window_keys;
  window_keys.data = {candidates.data()};
  window_keys.offsets = {0, in_window};
  const Selected inner = select_rank_from_top<uint32_t, Loops32>(window_keys, fmt, rank - total.above, lo, hi);
  *result = {inner.key, total.above + inner.greater, inner.equal};  // all ties of t lie inside [lo, hi]
  return true;
}

// Raises ValueError if any key is NaN: a window pass with an empty window, at vector speed.
template <typename K, typename Source>
void check_no_nan(const Source& segs, const KeyFormat& fmt) {
  const WindowFn<K> window = window_fn<K>();
  std::atomic<int64_t> nan_count{0};
  at::parallel_for(0, segs.total(), kGrain, [&](int64_t begin, int64_t end) {
    WindowTally tally;
    uint32_t scratch[16 + 1];  // nothing is kept (lo > hi), but the vector stores need room
    segs.for_each_piece(begin, end, [&](const K* p, int64_t len) {
      window(p, len, fmt.abs_mask, /*lo=*/1, /*hi=*/0, fmt.inf_key, scratch, tally);
    });
    nan_count += tally.nan;
  });
  reject_nan(nan_count.load());
}

// The rank-th largest |x| key (1 <= rank <= n): the window fast path, else plain radix.
template <typename K, typename Loops, typename Source>
Selected select_rank(const Source& segs, const KeyFormat& fmt, int64_t rank) {
  Selected result;
  if (select_with_window<K>(segs, fmt, rank, &result)) return result;
  return select_rank_from_top<K, Loops>(segs, fmt, rank);
}


}  // namespace
}  // namespace mtmerge
