// The fused merge pass and its companions: CPU kernels for
//   mtmerge::merge_fused, elect_sign_total, dare_abs_sums, task_arithmetic
// Semantics: mtmerge/reference/merge.py. Schemas: mtmerge/ops/_merge_ops.py. The per-task
// tensors task_scalars / task_trim, merge_scalars and the rule list: common/constants.h.
//
// Per sub-block of kSub entries: trim + DARE + consensus turn tau_t into tau_hat_t, the
// election sums them, the disjoint (or linear) merge combines them. The pass reads base and
// every finetuned tensor once and writes the output once (the memory-traffic floor of a
// merge), holding T rows of kSub floats per thread (merge/fused_stages.h).
//
// Determinism: the per-element math is a fixed sequence of float32 operations (tasks in
// order, no contraction into FMA: -ffp-contract=off), integer counts are order-free, and the
// one floating-point reduction (dare_abs_sums) sums fixed blocks in block order.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <atomic>
#include <cmath>
#include <string>

#include "common/constants.h"
#include "common/dtype_io.h"
#include "merge/dare.h"
#include "merge/fused_stages.h"
#include "merge/ops.h"
#include "merge/task_inputs.h"

namespace mtmerge {
namespace {

namespace k = constants;

// ---------------------------------------------------------------------------------------
// The per-task tensors, read on the host (CPU pointers; cheap shape/dtype checks only).
// ---------------------------------------------------------------------------------------

at::Tensor table(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  return t.contiguous();
}

// task_trim [T, 4] into the plan. The kernels compare uint32 keys; the conversions below give
// exactly the reference's int64 comparisons for any int64 value: a threshold key < 0 keeps
// everything (= key 0 with every tie kept), one above 2^32 - 1 is clamped (keys are below
// 2^31, so nothing is kept either way); the keep threshold is clamped to [0, 2^24] (the hash
// has 24 bits). The DARE key is taken mod 2^32 (keys are 32-bit).
void read_task_trim(const at::Tensor& task_trim, int64_t tasks, MergePlan& plan) {
  const at::Tensor trim = table(task_trim, at::kLong, {tasks, k::kTrimColumns}, "task_trim");
  const int64_t* row = trim.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < tasks; ++t, row += k::kTrimColumns) {
    const int64_t key = row[k::kTrimThresholdKey];
    plan.threshold_keys.push_back(uint32_t(std::clamp<int64_t>(key, 0, int64_t(UINT32_MAX))));
    plan.cutoffs.push_back(key < 0 ? k::kInt64Max : row[k::kTrimTieCutoff]);
    plan.dare_keys.push_back(uint32_t(uint64_t(row[k::kTrimDareKey])));
    plan.dare_keep.push_back(uint32_t(std::clamp<int64_t>(row[k::kTrimDareKeep], 0, k::kDareKeepOne)));
  }
}

void read_task_scalars(const at::Tensor& task_scalars, int64_t tasks, MergePlan& plan) {
  const at::Tensor s = table(task_scalars, at::kFloat, {tasks, k::kScalarColumns}, "task_scalars");
  const float* row = s.const_data_ptr<float>();
  for (int64_t t = 0; t < tasks; ++t, row += k::kScalarColumns) {
    plan.weights.push_back(row[k::kScalarWeight]);
    plan.scales.push_back(row[k::kScalarScale]);
  }
}

int64_t rule_entry(at::IntArrayRef rule, int64_t index, const char* name, int64_t last) {
  const int64_t v = rule[index];
  TORCH_CHECK_VALUE(v >= 0 && v <= last, "rule[", name, "] must be in [0, ", last, "], got ", v);
  return v;
}

void check_rule_length(at::IntArrayRef rule) {
  TORCH_CHECK_VALUE(int64_t(rule.size()) == k::kRuleLength, "rule must have ", k::kRuleLength, " entries, got ",
                    rule.size());
}

// rule[RULE_ELECT] and rule[RULE_ELECT_WEIGHTED] into the plan.
void read_election(at::IntArrayRef rule, MergePlan& plan) {
  const int64_t elect = rule_entry(rule, k::kRuleElect, "RULE_ELECT", k::kElectCount);
  plan.elect = elect == k::kElectNone ? Elect::kNone : (elect == k::kElectSum ? Elect::kSum : Elect::kCount);
  plan.elect_weighted = rule_entry(rule, k::kRuleElectWeighted, "RULE_ELECT_WEIGHTED", 1) != 0;
}

void check_index_offset(int64_t index_offset) {
  TORCH_CHECK_VALUE(index_offset >= 0, "index_offset must be >= 0, got ", index_offset);
}

// ---------------------------------------------------------------------------------------
// check_finite: a read-only pre-scan, so that a bad input raises before out (which may alias
// an input) is touched. An entry is NaN or Inf when its exponent bits are all ones: counted on
// the raw storage, no conversion.
// ---------------------------------------------------------------------------------------

template <typename U>
MTMERGE_ALWAYS_INLINE int64_t count_nonfinite_body(const U* __restrict x, int64_t len, U exponent) {
  int64_t total = 0;
  for (int64_t start = 0; start < len; start += kMergeGrain) {  // narrow counters vectorize better
    const int64_t stop = std::min(len, start + kMergeGrain);
    uint32_t c = 0;
    for (int64_t i = start; i < stop; ++i) c += uint32_t((x[i] & exponent) == exponent);
    total += c;
  }
  return total;
}

MTMERGE_CLONES int64_t count_nonfinite_32(const uint32_t* x, int64_t len) {
  return count_nonfinite_body<uint32_t>(x, len, k::kF32InfKey);
}

MTMERGE_CLONES int64_t count_nonfinite_16(const uint16_t* x, int64_t len, uint16_t exponent) {
  return count_nonfinite_body<uint16_t>(x, len, exponent);
}

int64_t count_nonfinite(const at::Tensor& t) {  // t: contiguous float32 / bfloat16 / float16
  std::atomic<int64_t> total{0};
  const at::ScalarType dtype = t.scalar_type();
  const uint16_t exponent16 = dtype == at::kBFloat16 ? 0x7F80 : 0x7C00;
  at::parallel_for(0, t.numel(), 4 * kMergeGrain, [&](int64_t begin, int64_t end) {
    total += dtype == at::kFloat
                 ? count_nonfinite_32(static_cast<const uint32_t*>(t.const_data_ptr()) + begin, end - begin)
                 : count_nonfinite_16(static_cast<const uint16_t*>(t.const_data_ptr()) + begin, end - begin,
                                      exponent16);
  });
  return total.load();  // an integer sum: order-free
}

void check_all_finite(const TaskInputs& in) {
  if (in.base.has_value()) {
    const int64_t bad = count_nonfinite(*in.base);
    TORCH_CHECK_VALUE(bad == 0, "base contains ", bad, " NaN or Inf value(s); pass allow_nonfinite=True to merge anyway");
  }
  for (int64_t t = 0; t < in.tasks(); ++t) {
    const int64_t bad = count_nonfinite(in.finetuned[t]);
    TORCH_CHECK_VALUE(bad == 0, "finetuned[", t, "] contains ", bad,
                      " NaN or Inf value(s); pass allow_nonfinite=True to merge anyway");
  }
}

// ---------------------------------------------------------------------------------------
// The pass itself (shared by merge_fused and task_arithmetic).
// ---------------------------------------------------------------------------------------

void run_fused(const TaskInputs& in, const MergePlan& plan, bool add_base, at::Tensor& out) {
  at::Tensor target = out.is_contiguous() ? out : at::empty(out.sizes(), out.options());
  const int64_t tasks = in.tasks();
  at::parallel_for(0, in.n, kMergeGrain, [&](int64_t begin, int64_t end) {
    Scratch sc(tasks);
    for (int64_t start = begin; start < end; start += kSub) {
      const int64_t len = std::min(kSub, end - start);
      trim_and_elect(in, plan, start, len, sc);
      if (plan.elect == Elect::kNone) {
        linear_merge(sc.row_ptrs.data(), tasks, len, plan.weights.data(), sc.merged);
      } else {
        disjoint_merge(sc.row_ptrs.data(), tasks, len, sc.sum, plan, sc.merged);
      }
      finish_output(sc.base_ptr, sc.merged, len, plan.lam, add_base, sc.load);
      store_floats(target, start, len, sc.load);
    }
  });
  if (!target.is_same(out)) out.copy_(target);
}

// task_arithmetic in float64 (for gradcheck): acc = 0; acc += w_t * (f_t - b); out = b + lam * acc.
at::Tensor task_arithmetic_f64(const at::Tensor& base, at::TensorList finetuned, const at::Tensor& weights,
                               const at::Tensor& lam) {
  const at::Tensor b = base.contiguous();
  std::vector<at::Tensor> fs;
  for (size_t t = 0; t < finetuned.size(); ++t) {
    TORCH_CHECK_TYPE(finetuned[t].scalar_type() == at::kDouble, "finetuned[", t, "] has dtype ",
                     finetuned[t].scalar_type(), " but base has Double");
    TORCH_CHECK_VALUE(finetuned[t].sizes() == base.sizes() && finetuned[t].device().is_cpu(), "finetuned[", t,
                      "] must be a CPU tensor of base's shape ", base.sizes(), ", got ", finetuned[t].sizes());
    fs.push_back(finetuned[t].contiguous());
  }
  const at::Tensor w64 = weights.to(at::kDouble).contiguous();
  const double* w = w64.const_data_ptr<double>();
  const double l = lam.item<double>();
  at::Tensor out = at::empty(base.sizes(), base.options());
  const double* bp = b.const_data_ptr<double>();
  double* op = out.mutable_data_ptr<double>();
  at::parallel_for(0, b.numel(), kMergeGrain, [&](int64_t begin, int64_t end) {
    double acc[kSub];
    for (int64_t start = begin; start < end; start += kSub) {
      const int64_t len = std::min(kSub, end - start);
      std::fill(acc, acc + len, 0.0);
      for (size_t t = 0; t < fs.size(); ++t) {
        const double* f = fs[t].const_data_ptr<double>() + start;
        for (int64_t i = 0; i < len; ++i) acc[i] += w[t] * (f[i] - bp[start + i]);
      }
      for (int64_t i = 0; i < len; ++i) op[start + i] = bp[start + i] + l * acc[i];
    }
  });
  return out;
}

}  // namespace

namespace merge {

// ---------------------------------------------------------------------------------------
// Op: merge_fused -- out = base + lam * merged (lam * merged without base or with_base = 0).
// ---------------------------------------------------------------------------------------

void merge_fused_cpu(const c10::optional<at::Tensor>& base, at::TensorList finetuned, const at::Tensor& task_scalars,
                     const at::Tensor& task_trim, const c10::optional<at::Tensor>& consensus, at::IntArrayRef rule,
                     const at::Tensor& merge_scalars, at::Tensor& out, int64_t index_offset) {
  const TaskInputs in = task_inputs(base, finetuned, consensus);
  MergePlan plan;
  read_task_scalars(task_scalars, in.tasks(), plan);
  read_task_trim(task_trim, in.tasks(), plan);
  const at::Tensor scalars = table(merge_scalars, at::kFloat, {k::kOutColumns}, "merge_scalars");
  plan.lam = scalars.const_data_ptr<float>()[k::kOutLam];
  plan.zero_fill = scalars.const_data_ptr<float>()[k::kOutZeroFill];
  check_rule_length(rule);
  read_election(rule, plan);
  const int64_t merge = rule_entry(rule, k::kRuleMerge, "RULE_MERGE", k::kMergeMax);
  plan.merge = merge == k::kMergeMean ? MergeRule::kMean : (merge == k::kMergeSum ? MergeRule::kSum : MergeRule::kMax);
  plan.divide_by_weight = rule_entry(rule, k::kRuleDivisor, "RULE_DIVISOR", k::kDivisorWeight) == k::kDivisorWeight;
  const bool with_base = rule_entry(rule, k::kRuleWithBase, "RULE_WITH_BASE", 1) != 0;
  const bool check_finite = rule_entry(rule, k::kRuleCheckFinite, "RULE_CHECK_FINITE", 1) != 0;
  TORCH_CHECK_VALUE(plan.elect != Elect::kNone || plan.merge == MergeRule::kSum,
                    "rule: ELECT_NONE (a linear merge) needs MERGE_SUM");
  check_index_offset(index_offset);
  plan.index_offset = index_offset;
  check_float_dtype(out, "out");
  TORCH_CHECK_VALUE(out.numel() == in.n, "out must have ", in.n, " elements, got ", out.numel());
  TORCH_CHECK_VALUE(out.device().is_cpu(), "out must be a CPU tensor, got ", out.device());
  if (check_finite) check_all_finite(in);  // before anything is written
  run_fused(in, plan, with_base && in.base.has_value(), out);
}

// ---------------------------------------------------------------------------------------
// Op: elect_sign_total -- sum_i sign(S_i) of the elected sums (the "majority" zero fill).
// ---------------------------------------------------------------------------------------

at::Tensor elect_sign_total_cpu(const c10::optional<at::Tensor>& base, at::TensorList finetuned,
                                const at::Tensor& task_scalars, const at::Tensor& task_trim,
                                const c10::optional<at::Tensor>& consensus, at::IntArrayRef rule,
                                int64_t index_offset) {
  const TaskInputs in = task_inputs(base, finetuned, consensus);
  MergePlan plan;
  read_task_scalars(task_scalars, in.tasks(), plan);
  read_task_trim(task_trim, in.tasks(), plan);
  check_rule_length(rule);
  read_election(rule, plan);
  TORCH_CHECK_VALUE(plan.elect != Elect::kNone, "rule[RULE_ELECT] must be ELECT_SUM or ELECT_COUNT here");
  check_index_offset(index_offset);
  plan.index_offset = index_offset;
  std::atomic<int64_t> total{0};
  at::parallel_for(0, in.n, kMergeGrain, [&](int64_t begin, int64_t end) {
    Scratch sc(in.tasks());
    int64_t local = 0;
    for (int64_t start = begin; start < end; start += kSub) {
      const int64_t len = std::min(kSub, end - start);
      trim_and_elect(in, plan, start, len, sc);
      for (int64_t i = 0; i < len; ++i) local += int64_t(sc.sum[i] > 0.0f) - int64_t(sc.sum[i] < 0.0f);
    }
    total += local;  // integer sum: order-free
  });
  at::Tensor result = at::empty({}, at::TensorOptions().dtype(at::kLong));
  *result.mutable_data_ptr<int64_t>() = total.load();
  return result;
}

// ---------------------------------------------------------------------------------------
// Op: dare_abs_sums -- float64 [T, 2]: sum |tau_t| and sum |tau_t| over DARE's kept entries
// (mergekit's L1 rescale is their ratio). Reads only the DARE columns of task_trim.
// ---------------------------------------------------------------------------------------

at::Tensor dare_abs_sums_cpu(const c10::optional<at::Tensor>& base, at::TensorList finetuned,
                             const at::Tensor& task_trim, int64_t index_offset) {
  check_index_offset(index_offset);
  const TaskInputs in = task_inputs(base, finetuned, c10::nullopt);
  const int64_t tasks = in.tasks();
  MergePlan plan;
  read_task_trim(task_trim, tasks, plan);
  at::Tensor result = at::empty({tasks, 2}, at::TensorOptions().dtype(at::kDouble));
  double* r = result.mutable_data_ptr<double>();
  const int64_t nblocks = (in.n + kMergeGrain - 1) / kMergeGrain;
  for (int64_t t = 0; t < tasks; ++t) {
    std::vector<double> all(nblocks, 0.0), kept(nblocks, 0.0);
    at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
      alignas(64) float f[kSub], b[kSub];
      alignas(64) uint32_t keep[kSub];
      for (int64_t blk = lo; blk < hi; ++blk) {
        double a = 0.0, kp = 0.0;
        for (int64_t start = blk * kMergeGrain; start < std::min(in.n, (blk + 1) * kMergeGrain); start += kSub) {
          const int64_t len = std::min(kSub, in.n - start);
          load_floats(in.finetuned[t], start, len, f);
          if (in.base.has_value()) {
            load_floats(*in.base, start, len, b);
            subtract(f, b, len, f);
          }
          std::fill(keep, keep + len, 1u);
          dare_filter(index_offset + start, len, plan.dare_keys[t], plan.dare_keep[t], keep);
          for (int64_t i = 0; i < len; ++i) {
            const double m = std::fabs(double(f[i]));
            a += m;
            kp += keep[i] ? m : 0.0;
          }
        }
        all[blk] = a;
        kept[blk] = kp;
      }
    });
    double a = 0.0, kp = 0.0;
    for (int64_t blk = 0; blk < nblocks; ++blk) {  // fixed order: same bits for any thread count
      a += all[blk];
      kp += kept[blk];
    }
    r[2 * t] = a;
    r[2 * t + 1] = kp;
  }
  return result;
}

// ---------------------------------------------------------------------------------------
// Op: task_arithmetic -- base + lam * sum_t w_t (finetuned[t] - base), a new tensor. In
// float32 / bfloat16 / float16 it is merge_fused's linear merge (elect none, merge sum,
// scales 1, nothing trimmed), bit for bit, without the finiteness check.
// ---------------------------------------------------------------------------------------

at::Tensor task_arithmetic_cpu(const at::Tensor& base, at::TensorList finetuned, const at::Tensor& weights,
                               const at::Tensor& lam) {
  const at::ScalarType dtype = base.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
                   "base must be float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK_VALUE(!finetuned.empty(), "finetuned must hold at least one tensor");
  const int64_t tasks = int64_t(finetuned.size());
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), "weights must be a float tensor, got ",
                   weights.scalar_type());
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == tasks, "weights must be 1-D with one entry per task (",
                    tasks, "), got shape ", weights.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(lam.scalar_type()), "lam must be a float tensor, got ", lam.scalar_type());
  TORCH_CHECK_VALUE(lam.dim() == 0, "lam must be a 0-d tensor, got shape ", lam.sizes());
  TORCH_CHECK_VALUE(base.device().is_cpu() && weights.device().is_cpu() && lam.device().is_cpu(),
                    "task_arithmetic: the CPU kernel needs CPU tensors");
  if (dtype == at::kDouble) return task_arithmetic_f64(base, finetuned, weights, lam);

  const TaskInputs in = task_inputs(base, finetuned, c10::nullopt);
  MergePlan plan;  // keep everything: key > 0, and key == 0 at any index; no DARE
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  for (int64_t t = 0; t < tasks; ++t) {
    plan.weights.push_back(w.const_data_ptr<float>()[t]);
    plan.scales.push_back(1.0f);
    plan.threshold_keys.push_back(0u);
    plan.cutoffs.push_back(k::kInt64Max);
    plan.dare_keys.push_back(0u);
    plan.dare_keep.push_back(k::kDareKeepOne);
  }
  plan.elect = Elect::kNone;
  plan.merge = MergeRule::kSum;
  plan.lam = lam.to(at::kFloat).item<float>();
  at::Tensor out = at::empty(base.sizes(), base.options());
  run_fused(in, plan, /*add_base=*/true, out);
  return out;
}

}  // namespace merge
}  // namespace mtmerge
