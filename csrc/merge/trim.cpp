// Trim thresholds of task vectors: CPU kernels for
//   mtmerge::delta_threshold, tie_cutoffs, magnitude_histogram
// Semantics: mtmerge/reference/merge.py. Schemas: mtmerge/ops/_merge_ops.py.
//
// The selection passes run select.h's radix selection on a source that yields the magnitude
// keys bits(|tau_t|) on the fly (task_inputs.h). All T tasks are selected in ONE shared read of
// base and the finetuned tensors (select.h's sampled-window fast path, one bracket per task);
// ties at a threshold are placed from that pass's trace, or by one more shared counting pass.
//
// Determinism: every reduction here is an integer count (order-free).
#include "merge/select.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <string>

#include "common/constants.h"
#include "common/dtype_io.h"
#include "merge/ops.h"
#include "merge/task_inputs.h"

namespace mtmerge {
namespace {

using constants::kF32InfKey;
using constants::kInt64Max;

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
        local_nan += k[i] > kF32InfKey;
        local_inf += k[i] == kF32InfKey;
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
  return kInt64Max;  // unreachable when ties_kept < #ties
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
    if (!win[t].active) continue;
    if (win[t].overflow) {
      merge::bump(merge::selection_stats.window_overflows);
      continue;
    }
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
      cutoffs[t] = kInt64Max;
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

// thresholds: a contiguous float32 CPU tensor.
uint32_t threshold_key(const at::Tensor& thresholds, int64_t t) {
  return float_bits(thresholds.const_data_ptr<float>()[t]) & kAbsMask;
}

// Digit histogram of one sub-block's keys (see magnitude_histogram_cpu).
MTMERGE_CLONES void key_histogram(const uint32_t* __restrict keys, int64_t len, int shift, uint32_t digit_mask,
                                  int prefix_shift, uint32_t prefix, uint32_t* __restrict hist, uint32_t spare) {
  // prefix_shift 31 keeps every key (keys are below 2^31); others land in the spare bin
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t k = keys[i];
    const bool match = prefix_shift >= 31 || (k >> prefix_shift) == prefix;
    ++hist[match ? (k >> shift) & digit_mask : spare];
  }
}

}  // namespace

namespace merge {

// ---------------------------------------------------------------------------------------
// Op: delta_threshold -- per task the threshold of its k_t largest |tau_t| and the flat index
// of the last tie kept (-1: none, kInt64Max: all).
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
      cut[t] = kInt64Max;
    } else if (k[t] - s.greater >= s.equal) {
      cut[t] = kInt64Max;  // every tie is kept
    } else if (traced[t]) {
      cut[t] = tie_cutoff_from_trace(in, t, windows[t], s.key, k[t] - s.greater);
      merge::bump(merge::selection_stats.traced_cutoffs);
    } else {
      needing.push_back(t);
      needing_keys.push_back(s.key);
      kept.push_back(k[t] - s.greater);
    }
    thresholds.mutable_data_ptr<float>()[t] = bits_float(ranks[t] == 0 ? kF32InfKey : s.key);
  }
  find_tie_cutoffs(in, needing, needing_keys, kept, cut);
  for (int64_t t = 0; t < tasks; ++t) cutoffs.mutable_data_ptr<int64_t>()[t] = cut[t];
  return {thresholds, cutoffs};
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
// Op: magnitude_histogram -- digit histograms of the task vectors' magnitude keys, the
// building block of exact top-k over a stream of chunks (the pipeline's global scope).
// ---------------------------------------------------------------------------------------

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

}  // namespace merge
}  // namespace mtmerge
