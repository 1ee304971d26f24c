// Routing and its losses: CPU kernels of
//   mtmerge::moe_topk_gate, moe_task_gate, moe_align, moe_load_balancing_loss, moe_router_z_loss
// Semantics: mtmerge/reference/moe.py. Schemas: mtmerge/ops/_moe_ops.py.
// Scores and losses are computed in the compute dtype (float32, float64 for float64 inputs)
// with the standard library's exp/log; row chunks are fixed by the data, so results do not
// depend on the thread count.
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>

#include <array>
#include <limits>
#include <numeric>

#include "moe/common.h"
#include "moe/ops.h"

namespace mtmerge {
namespace {

constexpr int64_t kGateGrain = 64;    // rows per gate chunk
constexpr int64_t kLossRows = 256;    // rows per loss partial sum (fixed: the sum order never changes)
constexpr int64_t kRouterRows = 256;  // token rows per task-router GEMM item

enum class Scoring { kSoftmax, kSigmoid };

Scoring parse_scoring(c10::string_view name) {
  if (name == "softmax") return Scoring::kSoftmax;
  TORCH_CHECK(name == "sigmoid", "scoring must be softmax or sigmoid, got ", name);
  return Scoring::kSigmoid;
}

// s[e] = softmax(l)[e] or sigmoid(l[e]).
template <typename acc_t>
void score_row(const acc_t* l, int64_t E, Scoring scoring, acc_t* s) {
  if (scoring == Scoring::kSigmoid) {
    for (int64_t e = 0; e < E; ++e) s[e] = acc_t(1) / (acc_t(1) + std::exp(-l[e]));
    return;
  }
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = 0; e < E; ++e) m = std::max(m, l[e]);
  acc_t sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    s[e] = std::exp(l[e] - m);
    sum += s[e];
  }
  for (int64_t e = 0; e < E; ++e) s[e] /= sum;
}

// Top-k of rows [t0, t1) of the logits lp [T, E] into weights [T, k] and ids [T, k].
template <typename acc_t>
void topk_rows(const acc_t* lp, int64_t t0, int64_t t1, int64_t E, int64_t k, Scoring scoring, bool renormalize,
               const acc_t* bias, acc_t* wp, int32_t* ip) {
  std::vector<acc_t> s(E), choice(E);
  std::vector<int32_t> order(E);
  for (int64_t t = t0; t < t1; ++t) {
    score_row(lp + t * E, E, scoring, s.data());
    for (int64_t e = 0; e < E; ++e) choice[e] = bias == nullptr ? s[e] : s[e] + bias[e];
    std::iota(order.begin(), order.end(), 0);
    // descending by choice, equal choices by lower index (a stable descending sort's order)
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return choice[a] > choice[b] || (choice[a] == choice[b] && a < b);
    });
    acc_t sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      ip[t * k + j] = order[j];
      wp[t * k + j] = s[order[j]];
      sum += s[order[j]];
    }
    if (renormalize) {
      for (int64_t j = 0; j < k; ++j) wp[t * k + j] /= sum;
    }
  }
}

template <typename acc_t>
void topk_all(const at::Tensor& logits, int64_t k, Scoring scoring, bool renormalize, const at::Tensor& bias,
              at::Tensor& weights, at::Tensor& ids) {
  const int64_t T = logits.size(0), E = logits.size(1);
  const acc_t* lp = logits.const_data_ptr<acc_t>();
  const acc_t* bp = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  acc_t* wp = weights.mutable_data_ptr<acc_t>();
  int32_t* ip = ids.mutable_data_ptr<int32_t>();
  at::parallel_for(0, T, kGateGrain, [&](int64_t t0, int64_t t1) {
    topk_rows(lp, t0, t1, E, k, scoring, renormalize, bp, wp, ip);
  });
}

void check_logits(const at::Tensor& logits, const char* name) {
  check_cpu(logits, name);
  check_float(logits, name);
  TORCH_CHECK(logits.dim() == 2, name, " must be [T, E], got ", logits.sizes());
}

// Sum over fixed chunks of kLossRows rows of row_value(t), chunks added in order.
template <typename acc_t, typename F>
acc_t chunked_sum(int64_t T, const F& row_value) {
  const int64_t chunks = (T + kLossRows - 1) / kLossRows;
  std::vector<acc_t> partial(chunks, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t t = c * kLossRows; t < std::min(T, (c + 1) * kLossRows); ++t) partial[c] += row_value(t);
    }
  });
  acc_t total = 0;
  for (const acc_t p : partial) total += p;
  return total;
}

}  // namespace

namespace moe {

std::tuple<at::Tensor, at::Tensor> moe_topk_gate_cpu(const at::Tensor& logits, int64_t k, c10::string_view scoring,
                                                     bool renormalize, const OptTensor& bias) {
  check_logits(logits, "logits");
  const BelowAutograd below_autograd;
  const Scoring sc = parse_scoring(scoring);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 0 && k <= E, "k must be in [0, E=", E, "], got ", k);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  const at::Tensor l = logits.to(acc).contiguous();
  at::Tensor b;
  if (bias) {
    check_cpu(*bias, "bias");
    check_float(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == E, "bias must be [E], got ", bias->sizes());
    b = bias->to(acc).contiguous();
  }
  at::Tensor weights = at::empty({T, k}, l.options());
  at::Tensor ids = at::empty({T, k}, l.options().dtype(at::kInt));
  if (acc == at::kDouble) {
    topk_all<double>(l, k, sc, renormalize, b, weights, ids);
  } else {
    topk_all<float>(l, k, sc, renormalize, b, weights, ids);
  }
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_task_gate_cpu(const at::Tensor& x, const at::Tensor& router,
                                                                 const at::Tensor& task_ids, int64_t k,
                                                                 const OptTensor& expert_mask,
                                                                 c10::string_view scoring, bool renormalize) {
  for (const at::Tensor* t : {&x, &router, &task_ids}) check_cpu(*t, "moe_task_gate inputs");
  check_float(x, "x");
  check_index(task_ids, "task_ids");
  const Scoring sc = parse_scoring(scoring);
  TORCH_CHECK(x.dim() == 2, "x must be [T, H], got ", x.sizes());
  TORCH_CHECK(router.dim() == 3 && router.size(2) == x.size(1) && router.scalar_type() == x.scalar_type(),
              "router must be [n_tasks, E, H] of x's dtype, got ", router.sizes(), " ", router.scalar_type());
  const int64_t T = x.size(0), H = x.size(1), n_tasks = router.size(0), E = router.size(1);
  TORCH_CHECK(task_ids.dim() == 1 && task_ids.size(0) == T, "task_ids must be [T], got ", task_ids.sizes());
  TORCH_CHECK(k >= 0 && k <= E, "k must be in [0, E=", E, "], got ", k);
  at::Tensor mask;
  if (expert_mask) {
    check_cpu(*expert_mask, "expert_mask");
    TORCH_CHECK(expert_mask->scalar_type() == at::kBool && expert_mask->dim() == 2 &&
                    expert_mask->size(0) == n_tasks && expert_mask->size(1) == E,
                "expert_mask must be bool [n_tasks, E], got ", expert_mask->sizes(), " ", expert_mask->scalar_type());
    mask = expert_mask->contiguous();
  }
  const at::Tensor tid = ids_int64(task_ids);
  const int64_t* tp = tid.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(tp[t] >= 0 && tp[t] < n_tasks, "task_ids must be in [0, ", n_tasks, "), got ", tp[t]);
  }
  const at::ScalarType acc = acc_type(x.scalar_type());
  const BelowAutograd below_autograd;
  // detached: the GEMMs run on worker threads, which do not inherit the dispatch guard
  const at::Tensor xa = x.detach().to(acc).contiguous(), ra = router.detach().to(acc);  // router: any strides
  at::Tensor logits = at::empty({T, E}, xa.options());

  // tokens grouped by task; GEMM items of at most kRouterRows rows of one task
  std::vector<int64_t> order(T), offsets(n_tasks + 1);
  sort_by_expert(tp, T, n_tasks, -1, order.data(), offsets.data());
  std::vector<std::array<int64_t, 3>> items;  // task, first position in order, rows
  std::vector<double> cost;
  for (int64_t task = 0; task < n_tasks; ++task) {
    const int64_t n = offsets[task + 1] - offsets[task], nb = (n + kRouterRows - 1) / kRouterRows;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t r0 = n * b / nb, r1 = n * (b + 1) / nb;
      items.push_back({task, offsets[task] + r0, r1 - r0});
      cost.push_back(double(r1 - r0 + 8) * double(E) * double(H));
    }
  }
  const int64_t esize = int64_t(xa.element_size());
  parallel_items<2>(cost, [&](int64_t i, Scratch* scratch) {
    const int64_t task = items[i][0], p0 = items[i][1], n = items[i][2];
    at::Tensor rows = scratch[0].get(acc, n, H), out = scratch[1].get(acc, n, E);
    const char* src = static_cast<const char*>(xa.const_data_ptr());
    for (int64_t r = 0; r < n; ++r) {
      std::memcpy(static_cast<char*>(rows.mutable_data_ptr()) + r * H * esize, src + order[p0 + r] * H * esize,
                  H * esize);
    }
    at::mm_out(out, rows, ra.select(0, task).t());
    const bool* allowed = mask.defined() ? mask.const_data_ptr<bool>() + task * E : nullptr;
    for (int64_t r = 0; r < n; ++r) {
      char* dst = static_cast<char*>(logits.mutable_data_ptr()) + order[p0 + r] * E * esize;
      std::memcpy(dst, static_cast<const char*>(out.const_data_ptr()) + r * E * esize, E * esize);
      if (allowed == nullptr) continue;
      for (int64_t e = 0; e < E; ++e) {
        if (allowed[e]) continue;
        if (acc == at::kDouble) {
          reinterpret_cast<double*>(dst)[e] = -std::numeric_limits<double>::infinity();
        } else {
          reinterpret_cast<float*>(dst)[e] = -std::numeric_limits<float>::infinity();
        }
      }
    }
  });

  at::Tensor weights = at::empty({T, k}, xa.options());
  at::Tensor ids = at::empty({T, k}, xa.options().dtype(at::kInt));
  if (acc == at::kDouble) {
    topk_all<double>(logits, k, sc, renormalize, at::Tensor(), weights, ids);
  } else {
    topk_all<float>(logits, k, sc, renormalize, at::Tensor(), weights, ids);
  }
  return {weights, ids, logits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cpu(const at::Tensor& ids, int64_t num_experts,
                                                             int64_t capacity) {
  check_cpu(ids, "ids");
  check_index(ids, "ids");
  TORCH_CHECK(ids.dim() == 2, "ids must be [T, k], got ", ids.sizes());
  TORCH_CHECK(num_experts >= 0, "num_experts must be >= 0, got ", num_experts);
  TORCH_CHECK(capacity >= -1, "capacity must be -1 (unlimited) or >= 0, got ", capacity);
  const BelowAutograd below_autograd;
  const at::Tensor idl = ids_int64(ids);
  const int64_t n = idl.numel();
  at::Tensor sorted = at::empty({n}, idl.options());
  at::Tensor offsets = at::empty({num_experts + 1}, idl.options());
  const int64_t dropped = sort_by_expert(idl.const_data_ptr<int64_t>(), n, num_experts, capacity,
                                         sorted.mutable_data_ptr<int64_t>(), offsets.mutable_data_ptr<int64_t>());
  return {sorted, offsets, at::scalar_tensor(dropped, idl.options())};
}

at::Tensor moe_load_balancing_loss_cpu(const at::Tensor& router_logits, const at::Tensor& ids, int64_t num_experts) {
  check_logits(router_logits, "router_logits");
  const BelowAutograd below_autograd;
  check_cpu(ids, "ids");
  check_index(ids, "ids");
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  TORCH_CHECK(E == num_experts, "router_logits must have num_experts=", num_experts, " columns, got ", E);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == T, "ids must be [T, k] with T = ", T, ", got ", ids.sizes());
  const at::ScalarType acc = acc_type(router_logits.scalar_type());
  const at::Tensor l = router_logits.to(at::kDouble).contiguous();
  const at::Tensor idl = ids_int64(ids);
  if (T == 0) return at::scalar_tensor(0.0, l.options().dtype(acc));
  // count_e / T, then loss = E * sum_t sum_e softmax(l_t)[e] * count_e / T / T, in float64
  std::vector<double> frac(E, 0.0);
  const int64_t* ip = idl.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < idl.numel(); ++s) {
    if (valid_expert(ip[s], E)) frac[ip[s]] += 1.0;
  }
  for (double& f : frac) f /= double(T);
  const double* lp = l.const_data_ptr<double>();
  const double total = chunked_sum<double>(T, [&](int64_t t) {
    std::vector<double> p(E);
    score_row(lp + t * E, E, Scoring::kSoftmax, p.data());
    double row = 0;
    for (int64_t e = 0; e < E; ++e) row += p[e] * frac[e];
    return row;
  });
  return at::scalar_tensor(double(E) * total / double(T), l.options().dtype(acc));
}

at::Tensor moe_router_z_loss_cpu(const at::Tensor& router_logits) {
  check_logits(router_logits, "router_logits");
  const BelowAutograd below_autograd;
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  const at::ScalarType acc = acc_type(router_logits.scalar_type());
  const at::Tensor l = router_logits.to(at::kDouble).contiguous();
  if (T == 0) return at::scalar_tensor(0.0, l.options().dtype(acc));
  const double* lp = l.const_data_ptr<double>();
  const double total = chunked_sum<double>(T, [&](int64_t t) {
    const double* row = lp + t * E;
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t e = 0; e < E; ++e) m = std::max(m, row[e]);
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += std::exp(row[e] - m);
    const double lse = m + std::log(sum);
    return lse * lse;
  });
  return at::scalar_tensor(total / double(T), l.options().dtype(acc));
}

}  // namespace moe
}  // namespace mtmerge
