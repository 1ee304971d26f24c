// The merge family's CPU kernels: trim selection on task vectors, the fused TIES / DARE /
// task-arithmetic pass, TALL masks and Consensus.
//   mtmerge::delta_threshold, tie_cutoffs, dare_abs_sums, elect_sign_total, merge_fused,
//   tall_masks, consensus_mask
// Semantics: mtmerge/reference/merge.py. Schemas: mtmerge/_library.py.
//
// Task vectors tau_t = finetuned[t] - base are never stored: every pass recomputes them in
// float32 from the inputs, a sub-block at a time in L1-sized buffers. The selection passes
// run select.h's radix selection on a "source" that yields the bit patterns of |tau_t| on
// the fly; the merge pass reads base and every finetuned tensor once and writes the output
// once (the memory-traffic floor of a merge), holding T sub-blocks of 256 floats per thread.
//
// Determinism: the per-element math is a fixed sequence of float32 operations (tasks in
// order, no contraction into FMA: -ffp-contract=off), integer counts are order-free, and the
// one floating-point reduction (dare_abs_sums) sums fixed blocks in block order.
#include "merge/select.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <limits>
#include <string>

namespace mtmerge {
namespace {

constexpr int64_t kSub = 512;  // elements per sub-block (T x 2 KB of scratch)
constexpr int64_t kMergeGrain = 1 << 15;  // elements per parallel task
constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kInfKey = 0x7f800000u;
constexpr uint32_t kDareKeepAll = 1u << 24;
constexpr uint32_t kDareHighWordSalt = 0x68e31da4u;

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

// ---------------------------------------------------------------------------------------
// float32 conversion of a sub-block, per storage dtype (vectorizable loops, ISA clones).
// ---------------------------------------------------------------------------------------

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

// Asks for the next sub-block of an input stream early: with T + 1 streams read a
// sub-block at a time, the hardware prefetcher alone leaves the loads waiting.
void prefetch_next(const at::Tensor& t, int64_t next, int64_t len, int64_t n) {
  const int64_t stop = std::min(n, next + len);
  const char* p = static_cast<const char*>(t.const_data_ptr());
  const int64_t item = int64_t(t.element_size());
  for (int64_t i = next * item; i < stop * item; i += 64) __builtin_prefetch(p + i);
}

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

// ---------------------------------------------------------------------------------------
// The counter-based RNG of DARE (same function as reference dare_hash and the Triton one).
// ---------------------------------------------------------------------------------------

MTMERGE_ALWAYS_INLINE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  return h ^ (h >> 16);
}

uint32_t dare_task_key(int64_t seed, int64_t task) {
  const uint64_t s = uint64_t(seed);
  return fmix32(fmix32(fmix32(uint32_t(task) + 0x9e3779b9u) ^ uint32_t(s >> 32)) ^ uint32_t(s));
}

// keep[i] &= hash(start + i) < keep_below, the 24-bit hash of the flat index.
MTMERGE_CLONES void dare_filter(int64_t start, int64_t len, uint32_t task_key, uint32_t keep_below,
                                uint32_t* __restrict keep) {
  const uint64_t first = uint64_t(start), last = uint64_t(start + len - 1);
  if ((first >> 32) == (last >> 32)) {  // one high word for the whole block: a 32-bit loop
    const uint32_t lo = uint32_t(first), hi_salt = uint32_t(first >> 32) ^ kDareHighWordSalt;
    for (int64_t i = 0; i < len; ++i) {
      const uint32_t h = fmix32(fmix32((lo + uint32_t(i)) ^ task_key) ^ hi_salt);
      keep[i] &= uint32_t((h >> 8) < keep_below);
    }
    return;
  }
  for (int64_t i = 0; i < len; ++i) {
    const uint64_t index = uint64_t(start + i);
    uint32_t h = fmix32(uint32_t(index) ^ task_key);
    h = fmix32(h ^ uint32_t(index >> 32) ^ kDareHighWordSalt);
    keep[i] &= uint32_t((h >> 8) < keep_below);
  }
}

// keep[i] &= bit (start + i) of the packed consensus mask.
void consensus_filter(const uint8_t* consensus, int64_t start, int64_t len, uint32_t* keep) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t j = start + i;
    keep[i] &= uint32_t((consensus[j >> 3] >> (j & 7)) & 1);
  }
}

// ---------------------------------------------------------------------------------------
// Inputs: base (optional) + T finetuned tensors, validated and made contiguous.
// ---------------------------------------------------------------------------------------

struct TaskInputs {
  c10::optional<at::Tensor> base;
  std::vector<at::Tensor> finetuned;
  const uint8_t* consensus = nullptr;
  at::Tensor consensus_holder;
  int64_t n = 0;
  int64_t tasks() const { return int64_t(finetuned.size()); }
};

void check_float_dtype(const at::Tensor& t, const std::string& name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
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
    TORCH_CHECK_VALUE(f.scalar_type() == ref.scalar_type(), name, " has dtype ", f.scalar_type(), " but ", ref_name,
                      " has ", ref.scalar_type());
    TORCH_CHECK_VALUE(f.sizes() == ref.sizes(), name, " has shape ", f.sizes(), " but ", ref_name, " has ",
                      ref.sizes());
    TORCH_CHECK_VALUE(f.device() == ref.device(), name, " is on ", f.device(), " but ", ref_name, " is on ",
                      ref.device());
    in.finetuned.push_back(f.contiguous());
  }
  if (consensus.has_value()) {
    TORCH_CHECK_VALUE(consensus->scalar_type() == at::kByte && consensus->numel() == (in.n + 7) / 8,
                      "consensus must be a packed uint8 mask of ceil(n/8) = ", (in.n + 7) / 8, " bytes");
    TORCH_CHECK_VALUE(consensus->device().is_cpu(), "consensus must be on the CPU");
    in.consensus_holder = consensus->contiguous();
    in.consensus = in.consensus_holder.const_data_ptr<uint8_t>();
  }
  return in;
}

template <typename T>
std::vector<T> per_task(c10::ArrayRef<T> values, int64_t tasks, const char* name) {
  TORCH_CHECK_VALUE(int64_t(values.size()) == tasks, name, " must have one entry per task (", tasks, "), got ",
                    values.size());
  return std::vector<T>(values.begin(), values.end());
}

// ---------------------------------------------------------------------------------------
// A task vector's magnitude keys as a select.h source: bits(|finetuned - base|) in float32,
// 0 outside the consensus mask, computed piece by piece into a stack buffer.
// ---------------------------------------------------------------------------------------

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

// Key format for float32 task-vector magnitudes. reject_inf lowers the "NaN" bound to just
// below +inf, so the selection passes count (and reject) Inf as well.
KeyFormat delta_format(bool reject_inf) {
  KeyFormat fmt = key_format(at::kFloat);
  if (reject_inf) fmt.inf_key -= 1;
  return fmt;
}

// Rethrows select.h's NaN error (or the Inf count from delta_format(true)) naming the task.
[[noreturn]] void reject_nonfinite_task(const TaskKeySource& source, int64_t task) {
  std::atomic<int64_t> nan{0}, inf{0};
  at::parallel_for(0, source.total(), kGrain, [&](int64_t begin, int64_t end) {
    int64_t local_nan = 0, local_inf = 0;
    source.for_each_piece(begin, end, [&](const uint32_t* k, int64_t len) {
      for (int64_t i = 0; i < len; ++i) {
        local_nan += k[i] > kInfKey;
        local_inf += k[i] == kInfKey;
      }
    });
    nan += local_nan;
    inf += local_inf;
  });
  const std::string what = source.in->base.has_value()
                               ? "finetuned[" + std::to_string(task) + "] - base (task vector " + std::to_string(task) + ")"
                               : "finetuned[" + std::to_string(task) + "]";
  TORCH_CHECK_VALUE(nan.load() == 0, what, " has ", nan.load(),
                    " NaN value(s); magnitude selection is undefined for NaN");
  TORCH_CHECK_VALUE(false, what, " has ", inf.load(), " Inf value(s); pass allow_nonfinite=True to merge them");
}

// ---------------------------------------------------------------------------------------
// Every task's selection in one read of base and the finetuned tensors: select.h's window
// fast path with one bracket per task (reading base once instead of T times), then the
// tie cut-offs of all tasks that need one in one more shared pass.
// ---------------------------------------------------------------------------------------

constexpr int64_t kSelectSub = 4096;  // sub-block of the shared selection pass

// One parallel chunk's in-window keys, in flat order, and the count kept after each of its
// sub-blocks: enough to place the threshold's ties without another pass over the data.
struct ChunkTrace {
  int64_t begin = 0, end = 0;
  std::vector<uint32_t> keys;
  std::vector<int64_t> kept_after;  // kept_after[j]: keys kept in sub-blocks 0..j
};

struct TaskWindow {
  bool active = false;  // bracketed by the sample; otherwise the task falls back alone
  uint32_t lo = 1, hi = 0;
  bool overflow = false;
  WindowTally total;
  std::vector<ChunkTrace> chunks;
};

// The flat index of the ties_kept-th key equal to t_key (1 <= ties_kept < #ties), from the
// window pass's trace (all ties of the threshold are in the window): count ties per traced
// sub-block, then walk the one sub-block where the count is reached.
int64_t tie_cutoff_from_trace(const TaskInputs& in, int64_t task, TaskWindow& w, uint32_t t_key, int64_t ties_kept) {
  std::sort(w.chunks.begin(), w.chunks.end(), [](const ChunkTrace& a, const ChunkTrace& b) { return a.begin < b.begin; });
  int64_t before = 0;
  for (const ChunkTrace& c : w.chunks) {
    int64_t prev = 0;
    for (size_t j = 0; j < c.kept_after.size(); ++j) {
      int64_t ties = 0;
      for (int64_t i = prev; i < c.kept_after[j]; ++i) ties += c.keys[i] == t_key;
      prev = c.kept_after[j];
      if (before + ties < ties_kept) {
        before += ties;
        continue;
      }
      int64_t pos = c.begin + int64_t(j) * kSelectSub, cutoff = -1;
      TaskKeySource{&in, task}.for_each_piece(pos, std::min(c.end, pos + kSelectSub), [&](const uint32_t* k, int64_t len) {
        for (int64_t i = 0; i < len && cutoff < 0; ++i) {
          if (k[i] == t_key && ++before == ties_kept) cutoff = pos + i;
        }
        pos += len;
      });
      return cutoff;
    }
  }
  return std::numeric_limits<int64_t>::max();  // unreachable when ties_kept < #ties
}

// Selected of each task for ranks[t] (ranks[t] == 0: only the NaN/Inf check). false in
// done[t] means the fast path could not answer and the caller must select that task alone.
std::vector<TaskWindow> select_all_tasks(const TaskInputs& in, const KeyFormat& fmt, const std::vector<int64_t>& ranks,
                                         std::vector<Selected>& results, std::vector<bool>& done) {
  const int64_t tasks = in.tasks(), n = in.n;
  std::vector<TaskWindow> win(tasks);
  bool any = false;
  for (int64_t t = 0; t < tasks; ++t) {
    if (n < kWindowMinEntries) break;
    if (ranks[t] == 0) {
      win[t].active = true;  // empty window (lo > hi): the pass only counts NaN/Inf
    } else {
      win[t].active = window_bracket<uint32_t>(TaskKeySource{&in, t}, fmt, ranks[t], &win[t].lo, &win[t].hi);
    }
    any |= win[t].active;
  }
  done.assign(tasks, false);
  results.assign(tasks, Selected{fmt.inf_key, 0, 0});
  if (!any) return win;
  const WindowFn<uint32_t> window = window_fn<uint32_t>();
  std::mutex merge_lock;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t capacity = (end - begin) / 4 + kSelectSub;  // uninitialized: untouched pages are free
    std::vector<std::unique_ptr<uint32_t[]>> local(tasks);
    std::vector<WindowTally> tally(tasks);
    std::vector<bool> full(tasks, false);
    std::vector<std::vector<int64_t>> kept_after(tasks);
    for (int64_t t = 0; t < tasks; ++t) {
      if (win[t].active && ranks[t] > 0) local[t].reset(new uint32_t[size_t(capacity + kSelectSub + 16)]);
    }
    uint32_t scratch[16 + 1];  // the vector stores of an empty window need room
    for_each_task_keys<kSelectSub>(
        in, begin, end, [&](int64_t t) { return win[t].active && !full[t]; },
        [&](int64_t t, int64_t, const uint32_t* keys, int64_t len) {
          full[t] = tally[t].kept > capacity;
          if (full[t]) return;
          window(keys, len, fmt.abs_mask, win[t].lo, win[t].hi, fmt.inf_key, local[t] ? local[t].get() : scratch,
                 tally[t]);
          kept_after[t].push_back(tally[t].kept);
        });
    std::lock_guard<std::mutex> guard(merge_lock);  // candidate order is irrelevant: only counts are used
    for (int64_t t = 0; t < tasks; ++t) {
      if (!win[t].active) continue;
      win[t].overflow = win[t].overflow || full[t];
      win[t].total.above += tally[t].above;
      win[t].total.nan += tally[t].nan;
      if (!full[t] && local[t]) {
        ChunkTrace trace;
        trace.begin = begin;
        trace.end = end;
        trace.keys.assign(local[t].get(), local[t].get() + tally[t].kept);
        trace.kept_after = std::move(kept_after[t]);
        win[t].chunks.push_back(std::move(trace));
      }
    }
  });
  for (int64_t t = 0; t < tasks; ++t) {
    if (!win[t].active || win[t].overflow) continue;
    if (win[t].total.nan > 0) reject_nonfinite_task(TaskKeySource{&in, t}, t);
    if (ranks[t] == 0) {
      done[t] = true;
      continue;
    }
    std::vector<uint32_t> candidates;
    for (const ChunkTrace& c : win[t].chunks) candidates.insert(candidates.end(), c.keys.begin(), c.keys.end());
    done[t] = finish_window(fmt, ranks[t], win[t].total, candidates, win[t].lo, win[t].hi, &results[t]);
  }
  return win;
}

// Tie cut-offs for several tasks: per-block tie counts of all of them in one shared pass,
// then a walk of the one block that holds each task's last kept tie.
void find_tie_cutoffs(const TaskInputs& in, const std::vector<int64_t>& tasks_needing,
                      const std::vector<uint32_t>& t_keys, const std::vector<int64_t>& ties_kept,
                      std::vector<int64_t>& cutoffs) {
  const int64_t m = int64_t(tasks_needing.size());
  if (m == 0) return;
  const int64_t n = in.n, nblocks = (n + kGrain - 1) / kGrain;
  std::vector<int64_t> counts(m * nblocks, 0);
  std::vector<int64_t> slot(in.tasks(), -1);  // task -> its index j in tasks_needing
  for (int64_t j = 0; j < m; ++j) slot[tasks_needing[j]] = j;
  at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      for_each_task_keys<kSub>(in, blk * kGrain, std::min(n, (blk + 1) * kGrain),
                               [&](int64_t t) { return slot[t] >= 0; },
                               [&](int64_t t, int64_t, const uint32_t* keys, int64_t len) {
                                 const int64_t j = slot[t];
                                 int64_t c = 0;
                                 for (int64_t i = 0; i < len; ++i) c += keys[i] == t_keys[j];
                                 counts[j * nblocks + blk] += c;
                               });
    }
  });
  for (int64_t j = 0; j < m; ++j) {
    const int64_t t = tasks_needing[j];
    int64_t total = 0;
    for (int64_t blk = 0; blk < nblocks; ++blk) total += counts[j * nblocks + blk];
    if (ties_kept[j] <= 0) {
      cutoffs[t] = -1;
      continue;
    }
    if (ties_kept[j] >= total) {
      cutoffs[t] = std::numeric_limits<int64_t>::max();
      continue;
    }
    int64_t before = 0, blk = 0;
    while (before + counts[j * nblocks + blk] < ties_kept[j]) before += counts[j * nblocks + blk++];
    int64_t pos = blk * kGrain, cutoff = -1;
    TaskKeySource{&in, t}.for_each_piece(pos, std::min(n, (blk + 1) * kGrain), [&](const uint32_t* k, int64_t len) {
      for (int64_t i = 0; i < len && cutoff < 0; ++i) {
        if (k[i] == t_keys[j] && ++before == ties_kept[j]) cutoff = pos + i;
      }
      pos += len;
    });
    cutoffs[t] = cutoff;
  }
}

// ---------------------------------------------------------------------------------------
// Op: delta_threshold / tie_cutoffs
// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> delta_threshold_cpu(const c10::optional<at::Tensor>& base,
                                                       at::TensorList finetuned, at::IntArrayRef ks,
                                                       c10::string_view selection, bool allow_nonfinite,
                                                       const c10::optional<at::Tensor>& consensus) {
  const TaskInputs in = task_inputs(base, finetuned, consensus);
  const std::string_view sel(selection.data(), selection.size());
  TORCH_CHECK_VALUE(sel == "exact" || sel == "geq", "selection must be 'exact' or 'geq', got '", std::string(sel),
                    "'");
  const std::vector<int64_t> k = per_task(ks, in.tasks(), "ks");
  const KeyFormat fmt = delta_format(!allow_nonfinite);
  at::Tensor thresholds = at::empty({in.tasks()}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor cutoffs = at::empty({in.tasks()}, at::TensorOptions().dtype(at::kLong));
  const int64_t n = in.n, tasks = in.tasks();
  const bool exact = sel == "exact";
  // The rank to select per task: exact keeps the k largest (rank k; k = 0 selects nothing);
  // geq keeps |tau| >= the (k+1)-th largest (k = n: the smallest, so all).
  std::vector<int64_t> ranks(tasks, 0);
  for (int64_t t = 0; t < tasks; ++t) {
    TORCH_CHECK_VALUE(k[t] >= 0 && k[t] <= n, "ks must be in [0, ", n, "], got ", k[t]);
    ranks[t] = exact ? k[t] : (n > 0 ? std::min(k[t] + 1, n) : 0);
  }
  std::vector<Selected> selected;
  std::vector<bool> done;
  std::vector<TaskWindow> windows = select_all_tasks(in, fmt, ranks, selected, done);
  const std::vector<bool> traced = done;
  for (int64_t t = 0; t < tasks; ++t) {  // the tasks the shared pass could not answer, alone
    if (done[t]) continue;
    const TaskKeySource source{&in, t};
    try {
      if (ranks[t] > 0) {
        selected[t] = select_rank<uint32_t, Loops32>(source, fmt, ranks[t]);
      } else {
        check_no_nan<uint32_t>(source, fmt);
      }
    } catch (const c10::ValueError&) {
      reject_nonfinite_task(source, t);
    }
  }
  std::vector<int64_t> cut(tasks, -1), needing, kept;
  std::vector<uint32_t> needing_keys;
  for (int64_t t = 0; t < tasks; ++t) {
    const Selected& s = selected[t];
    if (ranks[t] == 0) {
      cut[t] = -1;  // exact k = 0 (key = inf: nothing kept), or an empty tensor
    } else if (!exact) {
      cut[t] = std::numeric_limits<int64_t>::max();
    } else if (k[t] - s.greater >= s.equal) {
      cut[t] = std::numeric_limits<int64_t>::max();  // every tie is kept
    } else if (traced[t]) {
      cut[t] = tie_cutoff_from_trace(in, t, windows[t], s.key, k[t] - s.greater);
    } else {
      needing.push_back(t);
      needing_keys.push_back(s.key);
      kept.push_back(k[t] - s.greater);
    }
    thresholds.mutable_data_ptr<float>()[t] = bits_float(ranks[t] == 0 ? kInfKey : s.key);
  }
  find_tie_cutoffs(in, needing, needing_keys, kept, cut);
  for (int64_t t = 0; t < tasks; ++t) cutoffs.mutable_data_ptr<int64_t>()[t] = cut[t];
  return {thresholds, cutoffs};
}

// thresholds: a contiguous float32 CPU tensor.
uint32_t threshold_key(const at::Tensor& thresholds, int64_t t) {
  return float_bits(thresholds.const_data_ptr<float>()[t]) & kAbsMask;
}

at::Tensor tie_cutoffs_cpu(const c10::optional<at::Tensor>& base, at::TensorList finetuned,
                           const at::Tensor& thresholds, const at::Tensor& ties_kept,
                           const c10::optional<at::Tensor>& consensus) {
  const TaskInputs in = task_inputs(base, finetuned, consensus);
  TORCH_CHECK_VALUE(thresholds.numel() == in.tasks() && ties_kept.numel() == in.tasks(),
                    "thresholds and ties_kept must have one entry per task (", in.tasks(), ")");
  const at::Tensor thr = thresholds.reshape({-1}).to(at::kFloat).cpu().contiguous();
  const at::Tensor kept = ties_kept.reshape({-1}).to(at::kLong).cpu().contiguous();
  std::vector<int64_t> all(in.tasks()), cut(in.tasks(), -1), ties(in.tasks());
  std::vector<uint32_t> keys(in.tasks());
  for (int64_t t = 0; t < in.tasks(); ++t) {
    all[t] = t;
    keys[t] = threshold_key(thr, t);
    ties[t] = kept.const_data_ptr<int64_t>()[t];
  }
  find_tie_cutoffs(in, all, keys, ties, cut);
  at::Tensor cutoffs = at::empty({in.tasks()}, at::TensorOptions().dtype(at::kLong));
  std::copy(cut.begin(), cut.end(), cutoffs.mutable_data_ptr<int64_t>());
  return cutoffs;
}

// ---------------------------------------------------------------------------------------
// The fused merge: per sub-block, trim + DARE + consensus -> tau_hat, elect, disjoint merge.
// ---------------------------------------------------------------------------------------

enum class Elect { kNone, kSum, kCount };
enum class MergeRule { kMean, kSum, kMax };

struct MergePlan {
  std::vector<float> weights, scales;
  std::vector<uint32_t> threshold_keys, dare_keep, dare_keys;
  std::vector<int64_t> cutoffs;
  Elect elect = Elect::kSum;
  bool elect_weighted = false;
  float zero_fill = 1.0f;
  MergeRule merge = MergeRule::kMean;
  bool divide_by_weight = false;
  float lam = 1.0f;
  int64_t index_offset = 0;  // DARE numbers entry i as flat index index_offset + i
};

MergePlan make_plan(const TaskInputs& in, at::ArrayRef<double> weights, at::ArrayRef<double> scales,
                    const at::Tensor& thresholds, const at::Tensor& tie_cutoffs, int64_t seed,
                    at::IntArrayRef dare_keep, int64_t task_offset) {
  const int64_t tasks = in.tasks();
  MergePlan plan;
  for (double w : per_task(weights, tasks, "weights")) plan.weights.push_back(float(w));
  for (double s : per_task(scales, tasks, "scales")) plan.scales.push_back(float(s));
  TORCH_CHECK_VALUE(thresholds.numel() == tasks && tie_cutoffs.numel() == tasks,
                    "thresholds and tie_cutoffs must have one entry per task (", tasks, ")");
  const at::Tensor thr = thresholds.reshape({-1}).to(at::kFloat).cpu().contiguous();
  const at::Tensor cut = tie_cutoffs.reshape({-1}).to(at::kLong).cpu().contiguous();
  for (int64_t t = 0; t < tasks; ++t) {
    plan.threshold_keys.push_back(threshold_key(thr, t));
    plan.cutoffs.push_back(cut.const_data_ptr<int64_t>()[t]);
  }
  for (int64_t keep : per_task(dare_keep, tasks, "dare_keep")) {
    TORCH_CHECK_VALUE(keep >= 0 && keep <= int64_t(kDareKeepAll), "dare_keep must be in [0, 2**24], got ", keep);
    plan.dare_keep.push_back(uint32_t(keep));
  }
  TORCH_CHECK_VALUE(seed >= 0, "seed must be >= 0, got ", seed);
  for (int64_t t = 0; t < tasks; ++t) plan.dare_keys.push_back(dare_task_key(seed, task_offset + t));
  return plan;
}

Elect parse_elect(c10::string_view s) {
  if (s == "none") return Elect::kNone;
  if (s == "sum") return Elect::kSum;
  TORCH_CHECK_VALUE(s == "count", "elect must be 'none', 'sum' or 'count', got '", std::string(s), "'");
  return Elect::kCount;
}

MTMERGE_ALWAYS_INLINE float sign_of(float x) { return float(x > 0.0f) - float(x < 0.0f); }

// tau_hat for task t over one sub-block: trim by key (ties by flat index), DARE, consensus,
// then the rescale. d holds tau on entry and tau_hat on exit.
MTMERGE_CLONES void trim_sub_block(const float* __restrict d, uint32_t* __restrict keep, int64_t start, int64_t len,
                                   uint32_t t_key, int64_t cutoff) {
  // ties are kept at local positions i <= last_tie (a 32-bit bound: len <= kSub)
  const int32_t last_tie = int32_t(std::clamp<int64_t>(cutoff - start, -1, kSub));
  for (int32_t i = 0; i < int32_t(len); ++i) {
    const uint32_t key = float_bits(d[i]) & kAbsMask;
    keep[i] = uint32_t(key > t_key) | (uint32_t(key == t_key) & uint32_t(i <= last_tie));
  }
}

MTMERGE_CLONES void apply_keep(float* __restrict d, const uint32_t* __restrict keep, int64_t len, float scale) {
  for (int64_t i = 0; i < len; ++i) d[i] = keep[i] ? d[i] * scale : 0.0f;
}

MTMERGE_CLONES int64_t count_nonfinite(const float* x, int64_t len) {
  int64_t c = 0;
  for (int64_t i = 0; i < len; ++i) c += (float_bits(x[i]) & kInfKey) == kInfKey;
  return c;
}

MTMERGE_CLONES void subtract(const float* f, const float* b, int64_t len, float* d) {
  for (int64_t i = 0; i < len; ++i) d[i] = f[i] - b[i];
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
    gamma[i] = s[i] > 0.0f ? 1.0f : (s[i] < 0.0f ? -1.0f : zero_fill);
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
// rescale, election sum and the non-finite count, so the data is touched once. Same float
// operations as the separate loops below.
template <bool kCount, bool kCheck>
MTMERGE_ALWAYS_INLINE int64_t task_stage_body(const float* __restrict f, const float* __restrict b, int64_t len,
                                              uint32_t t_key, int32_t last_tie, float scale, float ew,
                                              float* __restrict v, float* __restrict s) {
  int64_t nonfinite = 0;
  for (int32_t i = 0; i < int32_t(len); ++i) {
    if constexpr (kCheck) nonfinite += (float_bits(f[i]) & kInfKey) == kInfKey;
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
  return nonfinite;
}

MTMERGE_CLONES int64_t task_stage(const float* f, const float* b, int64_t len, uint32_t t_key, int32_t last_tie,
                                  float scale, float ew, bool count, bool check, float* v, float* s) {
  if (count) {
    return check ? task_stage_body<true, true>(f, b, len, t_key, last_tie, scale, ew, v, s)
                 : task_stage_body<true, false>(f, b, len, t_key, last_tie, scale, ew, v, s);
  }
  return check ? task_stage_body<false, true>(f, b, len, t_key, last_tie, scale, ew, v, s)
               : task_stage_body<false, false>(f, b, len, t_key, last_tie, scale, ew, v, s);
}

// Stage 1 of a sub-block: tau_hat rows and the elected sums. With check_finite, adds the
// non-finite inputs seen to nonfinite[0] (base) and nonfinite[1 + t] (finetuned[t]).
void trim_and_elect(const TaskInputs& in, const MergePlan& p, int64_t start, int64_t len, bool check_finite,
                    Scratch& sc, int64_t* nonfinite) {
  const float* base = sc.base;  // zeros without a base
  if (in.base.has_value()) {
    prefetch_next(*in.base, start + len, len, in.n);
    base = floats_of(*in.base, start, len, sc.base);
    if (check_finite) nonfinite[0] += count_nonfinite(base, len);
  } else {
    std::fill(sc.base, sc.base + len, 0.0f);
  }
  sc.base_ptr = base;
  std::fill(sc.sum, sc.sum + len, 0.0f);
  for (int64_t t = 0; t < in.tasks(); ++t) {
    float* v = sc.row(t);
    prefetch_next(in.finetuned[t], start + len, len, in.n);
    const float* f = floats_of(in.finetuned[t], start, len, sc.load);
    if (p.dare_keep[t] == kDareKeepAll && !in.consensus) {  // the fused one-loop path
      const int32_t last_tie = int32_t(std::clamp<int64_t>(p.cutoffs[t] - start, -1, kSub));
      // elect "none" sums into sc.sum too, unused (cheaper than a branch per element)
      const float ew = p.elect_weighted ? p.weights[t] : 1.0f;
      const int64_t bad = task_stage(f, base, len, p.threshold_keys[t], last_tie, p.scales[t], ew,
                                     p.elect == Elect::kCount, check_finite, v, sc.sum);
      if (check_finite) nonfinite[1 + t] += bad;
      continue;
    }
    if (check_finite) nonfinite[1 + t] += count_nonfinite(f, len);
    subtract(f, base, len, v);
    trim_sub_block(v, sc.keep, start, len, p.threshold_keys[t], p.cutoffs[t]);
    if (p.dare_keep[t] < kDareKeepAll) {
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

void merge_fused_cpu(const c10::optional<at::Tensor>& base, at::TensorList finetuned, at::ArrayRef<double> weights,
                     at::ArrayRef<double> scales, const at::Tensor& thresholds, const at::Tensor& tie_cutoffs,
                     int64_t seed, at::IntArrayRef dare_keep, const c10::optional<at::Tensor>& consensus,
                     c10::string_view elect, bool elect_weighted, int64_t zero_fill, c10::string_view merge,
                     c10::string_view divisor, double lam, bool allow_nonfinite, at::Tensor& out,
                     int64_t task_offset, bool with_base, int64_t index_offset) {
  const TaskInputs in = task_inputs(base, finetuned, consensus);
  MergePlan plan = make_plan(in, weights, scales, thresholds, tie_cutoffs, seed, dare_keep, task_offset);
  TORCH_CHECK_VALUE(index_offset >= 0, "index_offset must be >= 0, got ", index_offset);
  plan.index_offset = index_offset;
  plan.elect = parse_elect(elect);
  plan.elect_weighted = elect_weighted;
  TORCH_CHECK_VALUE(zero_fill >= -1 && zero_fill <= 1, "zero_fill must be 1, -1 or 0, got ", zero_fill);
  plan.zero_fill = float(zero_fill);
  if (merge == "mean") {
    plan.merge = MergeRule::kMean;
  } else if (merge == "sum") {
    plan.merge = MergeRule::kSum;
  } else {
    TORCH_CHECK_VALUE(merge == "max", "merge must be 'mean', 'sum' or 'max', got '", std::string(merge), "'");
    plan.merge = MergeRule::kMax;
  }
  TORCH_CHECK_VALUE(divisor == "count" || divisor == "weight", "divisor must be 'count' or 'weight', got '",
                    std::string(divisor), "'");
  plan.divide_by_weight = divisor == "weight";
  plan.lam = float(lam);
  TORCH_CHECK_VALUE(plan.elect != Elect::kNone || plan.merge == MergeRule::kSum,
                    "elect='none' (a linear merge) needs merge='sum'");
  check_float_dtype(out, "out");
  TORCH_CHECK_VALUE(out.numel() == in.n, "out must have ", in.n, " elements, got ", out.numel());
  TORCH_CHECK_VALUE(out.device().is_cpu(), "out must be a CPU tensor, got ", out.device());
  at::Tensor target = out.is_contiguous() ? out : at::empty(out.sizes(), out.options());

  const int64_t tasks = in.tasks();
  std::vector<int64_t> nonfinite(tasks + 1, 0);  // base, then each finetuned tensor
  std::mutex nonfinite_lock;
  const bool add_base = with_base && in.base.has_value();
  at::parallel_for(0, in.n, kMergeGrain, [&](int64_t begin, int64_t end) {
    Scratch sc(tasks);
    std::vector<int64_t> local_nonfinite(tasks + 1, 0);
    for (int64_t start = begin; start < end; start += kSub) {
      const int64_t len = std::min(kSub, end - start);
      trim_and_elect(in, plan, start, len, !allow_nonfinite, sc, local_nonfinite.data());
      if (plan.elect == Elect::kNone) {
        linear_merge(sc.row_ptrs.data(), tasks, len, plan.weights.data(), sc.merged);
      } else {
        disjoint_merge(sc.row_ptrs.data(), tasks, len, sc.sum, plan, sc.merged);
      }
      finish_output(sc.base_ptr, sc.merged, len, plan.lam, add_base, sc.load);
      store_floats(target, start, len, sc.load);
    }
    std::lock_guard<std::mutex> guard(nonfinite_lock);  // integer sums: order-free
    for (int64_t j = 0; j <= tasks; ++j) nonfinite[j] += local_nonfinite[j];
  });
  if (!target.is_same(out)) out.copy_(target);
  for (int64_t j = 0; j <= tasks; ++j) {
    TORCH_CHECK_VALUE(nonfinite[j] == 0, j == 0 ? std::string("base") : "finetuned[" + std::to_string(j - 1) + "]",
                      " contains ", nonfinite[j], " NaN or Inf value(s); pass allow_nonfinite=True to merge anyway");
  }
}

at::Tensor elect_sign_total_cpu(const c10::optional<at::Tensor>& base, at::TensorList finetuned,
                                at::ArrayRef<double> weights, at::ArrayRef<double> scales,
                                const at::Tensor& thresholds, const at::Tensor& tie_cutoffs, int64_t seed,
                                at::IntArrayRef dare_keep, c10::string_view elect, bool elect_weighted,
                                const c10::optional<at::Tensor>& consensus, int64_t index_offset) {
  const TaskInputs in = task_inputs(base, finetuned, consensus);
  MergePlan plan = make_plan(in, weights, scales, thresholds, tie_cutoffs, seed, dare_keep, 0);
  TORCH_CHECK_VALUE(index_offset >= 0, "index_offset must be >= 0, got ", index_offset);
  plan.index_offset = index_offset;
  plan.elect = parse_elect(elect);
  TORCH_CHECK_VALUE(plan.elect != Elect::kNone, "elect must be 'sum' or 'count' here");
  plan.elect_weighted = elect_weighted;
  std::atomic<int64_t> total{0};
  at::parallel_for(0, in.n, kMergeGrain, [&](int64_t begin, int64_t end) {
    Scratch sc(in.tasks());
    int64_t local = 0;
    for (int64_t start = begin; start < end; start += kSub) {
      const int64_t len = std::min(kSub, end - start);
      trim_and_elect(in, plan, start, len, false, sc, nullptr);
      for (int64_t i = 0; i < len; ++i) local += int64_t(sc.sum[i] > 0.0f) - int64_t(sc.sum[i] < 0.0f);
    }
    total += local;  // integer sum: order-free
  });
  at::Tensor result = at::empty({}, at::TensorOptions().dtype(at::kLong));
  *result.mutable_data_ptr<int64_t>() = total.load();
  return result;
}

at::Tensor dare_abs_sums_cpu(const c10::optional<at::Tensor>& base, at::TensorList finetuned, int64_t seed,
                             at::IntArrayRef dare_keep, int64_t task_offset, int64_t index_offset) {
  TORCH_CHECK_VALUE(index_offset >= 0, "index_offset must be >= 0, got ", index_offset);
  const TaskInputs in = task_inputs(base, finetuned, c10::nullopt);
  const int64_t tasks = in.tasks();
  const std::vector<int64_t> keep_below = per_task(dare_keep, tasks, "dare_keep");
  TORCH_CHECK_VALUE(seed >= 0, "seed must be >= 0, got ", seed);
  at::Tensor result = at::empty({tasks, 2}, at::TensorOptions().dtype(at::kDouble));
  double* r = result.mutable_data_ptr<double>();
  const int64_t nblocks = (in.n + kMergeGrain - 1) / kMergeGrain;
  for (int64_t t = 0; t < tasks; ++t) {
    const uint32_t key = dare_task_key(seed, task_offset + t);
    std::vector<double> all(nblocks, 0.0), kept(nblocks, 0.0);
    at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
      alignas(64) float f[kSub], b[kSub];
      alignas(64) uint32_t keep[kSub];
      for (int64_t blk = lo; blk < hi; ++blk) {
        double a = 0.0, k = 0.0;
        for (int64_t start = blk * kMergeGrain; start < std::min(in.n, (blk + 1) * kMergeGrain); start += kSub) {
          const int64_t len = std::min(kSub, in.n - start);
          load_floats(in.finetuned[t], start, len, f);
          if (in.base.has_value()) {
            load_floats(*in.base, start, len, b);
            subtract(f, b, len, f);
          }
          std::fill(keep, keep + len, 1u);
          dare_filter(index_offset + start, len, key, uint32_t(keep_below[t]), keep);
          for (int64_t i = 0; i < len; ++i) {
            const double m = std::fabs(double(f[i]));
            a += m;
            k += keep[i] ? m : 0.0;
          }
        }
        all[blk] = a;
        kept[blk] = k;
      }
    });
    double a = 0.0, k = 0.0;
    for (int64_t blk = 0; blk < nblocks; ++blk) {  // fixed order: same bits for any thread count
      a += all[blk];
      k += kept[blk];
    }
    r[2 * t] = a;
    r[2 * t + 1] = k;
  }
  return result;
}

// ---------------------------------------------------------------------------------------
// Op: magnitude_histogram -- digit histograms of the task vectors' magnitude keys, the
// building block of exact top-k over a stream of chunks (the pipeline's global scope).
// ---------------------------------------------------------------------------------------

MTMERGE_CLONES void key_histogram(const uint32_t* __restrict keys, int64_t len, int shift, uint32_t digit_mask,
                                  int prefix_shift, uint32_t prefix, uint32_t* __restrict hist, uint32_t spare) {
  // prefix_shift 31 keeps every key (keys are below 2^31); others land in the spare bin
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t k = keys[i];
    const bool match = prefix_shift >= 31 || (k >> prefix_shift) == prefix;
    ++hist[match ? (k >> shift) & digit_mask : spare];
  }
}

at::Tensor magnitude_histogram_cpu(const c10::optional<at::Tensor>& base, at::TensorList finetuned, int64_t shift,
                                   int64_t bits, at::IntArrayRef prefixes, int64_t prefix_shift,
                                   const c10::optional<at::Tensor>& consensus) {
  const TaskInputs in = task_inputs(base, finetuned, consensus);
  const int64_t tasks = in.tasks();
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 16, "bits must be in [1, 16], got ", bits);
  TORCH_CHECK_VALUE(shift >= 0 && shift + bits <= 31, "shift + bits must be <= 31, got ", shift, " + ", bits);
  TORCH_CHECK_VALUE(prefix_shift >= 0 && prefix_shift <= 31, "prefix_shift must be in [0, 31], got ", prefix_shift);
  const std::vector<int64_t> prefix = per_task(prefixes, tasks, "prefixes");
  const int64_t nbins = int64_t(1) << bits;
  at::Tensor result = at::zeros({tasks, nbins}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = result.mutable_data_ptr<int64_t>();
  std::mutex merge_lock;
  constexpr int64_t kFlush = int64_t(1) << 30;  // uint32 bins cannot overflow below this
  at::parallel_for(0, in.n, std::max<int64_t>(kGrain, nbins * 4), [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> local(size_t(tasks * (nbins + 1)), 0u);  // + one spare bin per task
    std::vector<int64_t> wide(size_t(tasks * nbins), 0);
    auto flush = [&]() {
      for (int64_t t = 0; t < tasks; ++t) {
        for (int64_t j = 0; j < nbins; ++j) wide[t * nbins + j] += local[t * (nbins + 1) + j];
      }
      std::fill(local.begin(), local.end(), 0u);
    };
    int64_t since_flush = 0;
    for_each_task_keys<kSub>(in, begin, end, [](int64_t) { return true; },
                             [&](int64_t t, int64_t, const uint32_t* keys, int64_t len) {
                               key_histogram(keys, len, int(shift), uint32_t(nbins - 1), int(prefix_shift),
                                             uint32_t(prefix[t]), local.data() + t * (nbins + 1), uint32_t(nbins));
                               since_flush += len;
                               if (since_flush >= kFlush) {
                                 flush();
                                 since_flush = 0;
                               }
                             });
    flush();
    std::lock_guard<std::mutex> guard(merge_lock);  // integer sums: order-free, same bits for any threads
    for (int64_t j = 0; j < tasks * nbins; ++j) out[j] += wide[j];
  });
  return result;
}

// ---------------------------------------------------------------------------------------
// TALL masks and Consensus
// ---------------------------------------------------------------------------------------

MTMERGE_CLONES void tall_bits(const float* d, const float* m, int64_t len, float lam, uint8_t* bits) {
  for (int64_t i = 0; i < len; ++i) bits[i] = uint8_t(std::fabs(d[i]) > lam * std::fabs(m[i] - d[i]));
}

at::Tensor tall_masks_cpu(const c10::optional<at::Tensor>& base, at::TensorList finetuned, const at::Tensor& merged,
                          at::ArrayRef<double> lams) {
  const TaskInputs in = task_inputs(base, finetuned, c10::nullopt);
  const int64_t tasks = in.tasks();
  const std::vector<double> lam = per_task(lams, tasks, "lams");
  check_float_dtype(merged, "merged");
  TORCH_CHECK_VALUE(merged.numel() == in.n, "merged must have ", in.n, " elements, got ", merged.numel());
  TORCH_CHECK_VALUE(merged.device().is_cpu(), "merged must be a CPU tensor");
  const at::Tensor mtl = merged.contiguous();
  const int64_t nbytes = (in.n + 7) / 8;
  at::Tensor masks = at::empty({tasks, nbytes}, at::TensorOptions().dtype(at::kByte));
  // Parallel over sub-blocks of kSub entries (a multiple of 8), so each owns whole bytes.
  const int64_t nsub = (in.n + kSub - 1) / kSub;
  at::parallel_for(0, nsub, kMergeGrain / kSub, [&](int64_t sub_begin, int64_t sub_end) {
    alignas(64) float f[kSub], b[kSub], m[kSub];
    alignas(64) uint8_t bits[kSub];
    for (int64_t start = sub_begin * kSub; start < std::min(in.n, sub_end * kSub); start += kSub) {
      const int64_t len = std::min(kSub, in.n - start);
      load_floats(mtl, start, len, m);
      if (in.base.has_value()) load_floats(*in.base, start, len, b);
      for (int64_t t = 0; t < tasks; ++t) {
        load_floats(in.finetuned[t], start, len, f);
        if (in.base.has_value()) subtract(f, b, len, f);
        tall_bits(f, m, len, float(lam[t]), bits);
        std::fill(bits + len, bits + ((len + 7) & ~int64_t(7)), uint8_t(0));
        uint8_t* row = masks.mutable_data_ptr<uint8_t>() + t * nbytes + start / 8;
        for (int64_t j = 0; j < (len + 7) / 8; ++j) {
          uint32_t byte = 0;
          for (int q = 0; q < 8; ++q) byte |= uint32_t(bits[8 * j + q]) << q;
          row[j] = uint8_t(byte);
        }
      }
    }
  });
  return masks;
}

at::Tensor consensus_mask_cpu(const at::Tensor& masks, int64_t k) {
  TORCH_CHECK_VALUE(masks.scalar_type() == at::kByte && masks.dim() == 2, "masks must be uint8 [T, nbytes]");
  TORCH_CHECK_VALUE(masks.device().is_cpu(), "masks must be a CPU tensor");
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  const at::Tensor m = masks.contiguous();
  const int64_t tasks = m.size(0), nbytes = m.size(1);
  at::Tensor out = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte));
  const uint8_t* src = m.const_data_ptr<uint8_t>();
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, nbytes, kMergeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      uint32_t byte = 0;
      for (int q = 0; q < 8; ++q) {
        int64_t count = 0;
        for (int64_t t = 0; t < tasks; ++t) count += (src[t * nbytes + j] >> q) & 1;
        byte |= uint32_t(count >= k) << q;
      }
      dst[j] = uint8_t(byte);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtmerge, CPU, m) {
  m.impl("delta_threshold", &delta_threshold_cpu);
  m.impl("tie_cutoffs", &tie_cutoffs_cpu);
  m.impl("dare_abs_sums", &dare_abs_sums_cpu);
  m.impl("elect_sign_total", &elect_sign_total_cpu);
  m.impl("merge_fused", &merge_fused_cpu);
  m.impl("tall_masks", &tall_masks_cpu);
  m.impl("consensus_mask", &consensus_mask_cpu);
  m.impl("magnitude_histogram", &magnitude_histogram_cpu);
}

}  // namespace mtmerge
