// The routed experts' feed-forward: CPU kernel of mtmerge::moe_experts.
// Semantics: mtmerge/reference/moe.py (moe_experts). Schema: mtmerge/ops/_moe_ops.py.
//
// Plan: group the routed slots by expert (a counting sort; a decode batch of distinct experts
// skips it), then two passes of GEMM items and a combine:
//   1. per (expert, row block, column block of F): gather the rows' tokens, h = x W_gu^T by BLAS
//      in x's dtype, a = act(gate + b) * (up + b) in fp32, rounded to x's dtype, into A [rows, F];
//   2. per (expert, row block, column block of H): o = A W_d^T into O [rows, H];
//   3. per token: y = sum_j w_j (o_j + b_d) in j order, fp32.
// An item with few rows (kSmallRows; decode, fine-grained experts) skips BLAS: dots2 of
// small_m.h streams each weight row once against all its token rows (gate and up rows of a
// column together, so act(gate) * up follows at once), reading the weights near memory speed.
// The weights are used through their strides (BLAS transposes; a transposed view is not copied;
// the small path needs unit stride along the dot and otherwise leaves the item to BLAS).
// Every GEMM item runs single-threaded on one thread and items are cut by the data alone, never
// by the thread count, so the output has the same bits on 1 or N threads.
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include "moe/common.h"
#include "moe/ops.h"
#include "moe/small_m.h"

namespace mtmerge {
namespace {

constexpr int64_t kMaxRows = 512;      // rows of one GEMM item; an expert with more is cut into even blocks
constexpr int64_t kMinItems = 8;       // fewer row blocks than this: the weights are cut by columns as well
constexpr int64_t kMinColumns = 64;    // the narrowest column block
constexpr int64_t kWeightRows = 8;     // a weight read costs about as much as this many rows of math
constexpr int64_t kCombineGrain = 16;  // tokens per combine chunk
// Rows up to which an item takes dots2 (small_m.h) instead of BLAS, measured on an AVX-512 core
// (Zen 4): float32 gains to 16 rows; oneDNN's bfloat16 GEMM (dot-product instructions, twice
// float32 FMA's rate) wins from ~5 rows.
constexpr int64_t kSmallRows = 16, kSmallRowsHalf = 4;

template <typename scalar_t>
int64_t small_rows() {
  if constexpr (std::is_same_v<scalar_t, double>) return 0;
  if constexpr (std::is_same_v<scalar_t, float>) return kSmallRows;
  return kSmallRowsHalf;
}

struct Item {
  int64_t group, row0, rows, col0, cols;
};

// Row blocks of every group, each cut into the column blocks of `edges`.
std::vector<Item> make_items(const SlotGroups& sg, int64_t width) {
  int64_t blocks = 0;
  for (int64_t g = 0; g < sg.groups(); ++g) blocks += (sg.size(g) + kMaxRows - 1) / kMaxRows;
  int64_t parts = 1;
  if (blocks > 0 && blocks < kMinItems) {
    parts = std::min((kMinItems + blocks - 1) / blocks, std::max<int64_t>(1, width / kMinColumns));
  }
  const std::vector<int64_t> edges = column_blocks(width, parts);
  std::vector<Item> items;
  for (int64_t g = 0; g < sg.groups(); ++g) {
    const int64_t n = sg.size(g), nb = (n + kMaxRows - 1) / kMaxRows;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t r0 = n * b / nb, r1 = n * (b + 1) / nb;  // even blocks
      for (size_t c = 0; c + 1 < edges.size(); ++c) {
        items.push_back({g, sg.begin[g] + r0, r1 - r0, edges[c], edges[c + 1] - edges[c]});
      }
    }
  }
  return items;
}

std::vector<double> item_costs(const std::vector<Item>& items, int64_t depth) {
  std::vector<double> cost;
  cost.reserve(items.size());
  for (const Item& it : items) cost.push_back(double(it.rows + kWeightRows) * double(it.cols) * double(depth));
  return cost;
}

// The token rows of rows [row0, row0 + n) as an [n, H] matrix: a view of x for one row, else
// gathered into scratch.
at::Tensor token_rows(const at::Tensor& xc, const SlotGroups& sg, int64_t k, int64_t row0, int64_t n,
                      Scratch& scratch) {
  const int64_t H = xc.size(1);
  if (n == 1) return xc.narrow(0, sg.slot_of_row[row0] / k, 1);
  at::Tensor rows = scratch.get(xc.scalar_type(), n, H);
  const int64_t bytes = H * int64_t(xc.element_size());
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(rows.mutable_data_ptr());
  for (int64_t r = 0; r < n; ++r) std::memcpy(dst + r * bytes, src + (sg.slot_of_row[row0 + r] / k) * bytes, bytes);
  return rows;
}

template <typename scalar_t>
at::Tensor experts_forward(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                           const at::Tensor& weights, const at::Tensor& ids, Act act, const moe::OptTensor& gu_bias,
                           const moe::OptTensor& d_bias) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t T = x.size(0), H = x.size(1), E = gate_up.size(0), F = gate_up.size(1) / 2, k = ids.size(1);
  const bool interleaved = act == Act::kGptOss;
  const at::Tensor xc = x.contiguous();
  const at::Tensor idl = ids_int64(ids);
  const at::Tensor w = weights.to(acc_type(x.scalar_type())).contiguous();
  // biases in the compute dtype (small)
  const at::Tensor bgu = gu_bias ? gu_bias->to(acc_type(x.scalar_type())).contiguous() : at::Tensor();
  const at::Tensor bd = d_bias ? d_bias->to(acc_type(x.scalar_type())).contiguous() : at::Tensor();
  const SlotGroups sg = group_slots(idl.const_data_ptr<int64_t>(), T * k, E);
  const int64_t N = sg.rows();
  at::Tensor y = at::empty({T, H}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0 || H == 0) return y.zero_();
  using dots_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, c10::BFloat16, float>;

  // 1. A = act(x W_gu^T + b), rows grouped by expert
  at::Tensor A = at::empty({N, F}, x.options());
  const std::vector<Item> up_items = make_items(sg, F);
  // The small-M path of an item: token rows widened to fp32 once, then per column f the gate and
  // up rows of W streamed once through dots2 against all of them, act(gate) * up per token row.
  const int64_t small_cut = small_rows<scalar_t>();
  const bool small_gu = gate_up.stride(2) == 1;
  auto up_small = [&](const Item& it, int64_t e) {
    const int64_t n = it.rows, c0 = it.col0, cw = it.cols, ld = gate_up.stride(1);
    float* X = thread_floats(0, n * H);
    for (int64_t r = 0; r < n; ++r) {
      load_row(xc.const_data_ptr<scalar_t>() + (sg.slot_of_row[it.row0 + r] / k) * H, 1, H, X + r * H);
    }
    float* G = thread_floats(1, 2 * n * cw);  // gate [n, cw] then up [n, cw]
    float* U = G + n * cw;
    float* wrow = thread_floats(2, 2 * H);
    float* pair = thread_floats(3, 2 * n);
    const Dots2Fn dots2 = dots2_fn<dots_t>();
    const scalar_t* W = gate_up.const_data_ptr<scalar_t>() + e * gate_up.stride(0);
    for (int64_t f = c0; f < c0 + cw; ++f) {
      const scalar_t* wg = W + (interleaved ? 2 * f : f) * ld;
      const scalar_t* wu = W + (interleaved ? 2 * f + 1 : F + f) * ld;
      if constexpr (std::is_same_v<scalar_t, c10::Half>) {  // float16: widened first
        load_row(wg, 1, H, wrow);
        load_row(wu, 1, H, wrow + H);
        dots2(wrow, wrow + H, H, X, H, n, pair);
      } else {
        dots2(wg, wu, H, X, H, n, pair);
      }
      for (int64_t r = 0; r < n; ++r) {
        G[r * cw + f - c0] = pair[r];
        U[r * cw + f - c0] = pair[n + r];
      }
    }
    float* a = thread_floats(4, 3 * cw);
    float *bg = a + cw, *bu = a + 2 * cw;
    if (bgu.defined()) {
      const float* b = bgu.const_data_ptr<float>() + e * 2 * F;
      load_row(b + (interleaved ? 2 * c0 : c0), interleaved ? 2 : 1, cw, bg);
      load_row(b + (interleaved ? 2 * c0 + 1 : F + c0), interleaved ? 2 : 1, cw, bu);
    }
    scalar_t* out = A.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < n; ++r) {
      float *g = G + r * cw, *u = U + r * cw;
      if (bgu.defined()) {
        add_rows(bg, cw, g);
        add_rows(bu, cw, u);
      }
      glu_rows(act, g, u, cw, a);
      store_row(a, cw, out + (it.row0 + r) * F + c0, 1);
    }
  };
  parallel_items<4>(item_costs(up_items, H), [&](int64_t i, Scratch* scratch) {
    const Item& it = up_items[i];
    const int64_t e = sg.expert[it.group], n = it.rows, c0 = it.col0, cw = it.cols;
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (small_gu && n <= small_cut) return up_small(it, e);
    }
    const at::Tensor xr = token_rows(xc, sg, k, it.row0, n, scratch[0]);
    const at::Tensor W = gate_up.select(0, e);
    // gate column f of the block at hg + r * ldh + f * step, up column f at hu + ...
    const scalar_t *hg, *hu;
    int64_t ldh, step;
    if (interleaved || cw == F) {  // one GEMM: gate and up rows are one contiguous block of W
      at::Tensor h = scratch[1].get(x.scalar_type(), n, 2 * cw);
      at::mm_out(h, xr, W.narrow(0, interleaved ? 2 * c0 : 0, 2 * cw).t());
      hg = h.const_data_ptr<scalar_t>();
      hu = hg + (interleaved ? 1 : cw);
      ldh = 2 * cw;
      step = interleaved ? 2 : 1;
    } else {  // two GEMMs: gate rows c0.., up rows F + c0..
      at::Tensor h = scratch[1].get(x.scalar_type(), 2 * n, cw);
      at::Tensor h_gate = h.narrow(0, 0, n), h_up = h.narrow(0, n, n);
      at::mm_out(h_gate, xr, W.narrow(0, c0, cw).t());
      at::mm_out(h_up, xr, W.narrow(0, F + c0, cw).t());
      hg = h.const_data_ptr<scalar_t>();
      hu = hg + n * cw;
      ldh = cw;
      step = 1;
    }
    acc_t* buf = scratch[2].get(acc_type(x.scalar_type()), 5, cw).mutable_data_ptr<acc_t>();
    acc_t *g = buf, *u = buf + cw, *a = buf + 2 * cw, *bg = buf + 3 * cw, *bu = buf + 4 * cw;
    if (bgu.defined()) {
      const acc_t* b = bgu.const_data_ptr<acc_t>() + e * 2 * F;
      load_row(b + (interleaved ? 2 * c0 : c0), step, cw, bg);
      load_row(b + (interleaved ? 2 * c0 + 1 : F + c0), step, cw, bu);
    }
    scalar_t* out = A.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < n; ++r) {
      load_row(hg + r * ldh, step, cw, g);
      load_row(hu + r * ldh, step, cw, u);
      if (bgu.defined()) {
        add_rows(bg, cw, g);
        add_rows(bu, cw, u);
      }
      glu_rows(act, g, u, cw, a);
      store_row(a, cw, out + (it.row0 + r) * F + c0, 1);
    }
  });

  // 2. O = A W_d^T
  at::Tensor O = at::empty({N, H}, x.options());
  const std::vector<Item> down_items = make_items(sg, H);
  // The small-M path: the rows of A widened once, two rows of W_d at a time through dots2.
  const bool small_d = down.stride(2) == 1;
  auto down_small = [&](const Item& it) {
    const int64_t n = it.rows, c0 = it.col0, cw = it.cols, ld = down.stride(1);
    float* Af = thread_floats(0, n * F);
    for (int64_t r = 0; r < n; ++r) load_row(A.const_data_ptr<scalar_t>() + (it.row0 + r) * F, 1, F, Af + r * F);
    float* Ob = thread_floats(1, n * cw);  // [n, cw]
    float* wrow = thread_floats(2, 2 * F);
    float* pair = thread_floats(3, 2 * n);
    const Dots2Fn dots2 = dots2_fn<dots_t>();
    const scalar_t* W = down.const_data_ptr<scalar_t>() + sg.expert[it.group] * down.stride(0);
    for (int64_t c = c0; c < c0 + cw; c += 2) {
      const bool two = c + 1 < c0 + cw;  // an odd last row is paired with itself
      const scalar_t *w0 = W + c * ld, *w1 = two ? w0 + ld : w0;
      if constexpr (std::is_same_v<scalar_t, c10::Half>) {
        load_row(w0, 1, F, wrow);
        if (two) load_row(w1, 1, F, wrow + F);
        dots2(wrow, two ? wrow + F : wrow, F, Af, F, n, pair);
      } else {
        dots2(w0, w1, F, Af, F, n, pair);
      }
      for (int64_t r = 0; r < n; ++r) {
        Ob[r * cw + c - c0] = pair[r];
        if (two) Ob[r * cw + c + 1 - c0] = pair[n + r];
      }
    }
    scalar_t* out = O.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < n; ++r) store_row(Ob + r * cw, cw, out + (it.row0 + r) * H + c0, 1);
  };
  parallel_items<1>(item_costs(down_items, F), [&](int64_t i, Scratch* scratch) {
    const Item& it = down_items[i];
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (it.rows <= small_cut && small_d) return down_small(it);
    }
    const at::Tensor Wd = down.select(0, sg.expert[it.group]).narrow(0, it.col0, it.cols);
    const at::Tensor a = A.narrow(0, it.row0, it.rows);
    if (it.cols == H) {
      at::Tensor o = O.narrow(0, it.row0, it.rows);
      at::mm_out(o, a, Wd.t());
      return;
    }
    at::Tensor o = scratch[0].get(x.scalar_type(), it.rows, it.cols);  // a column block: via a contiguous buffer
    at::mm_out(o, a, Wd.t());
    const size_t bytes = it.cols * sizeof(scalar_t);
    for (int64_t r = 0; r < it.rows; ++r) {
      std::memcpy(O.mutable_data_ptr<scalar_t>() + (it.row0 + r) * H + it.col0, o.const_data_ptr<scalar_t>() + r * it.cols,
                  bytes);
    }
  });

  // 3. y[t] = sum_j w[t, j] * (o[t, j] + b_d[e]), in j order
  const acc_t* wp = w.const_data_ptr<acc_t>();
  const int64_t* ip = idl.const_data_ptr<int64_t>();
  const scalar_t* op = O.const_data_ptr<scalar_t>();
  const acc_t* bp = bd.defined() ? bd.const_data_ptr<acc_t>() : nullptr;
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, T, kCombineGrain, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(H), orow(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = t * k + j, r = sg.row_of_slot[s];
        if (r < 0) continue;  // unrouted: r >= 0 means ids[s] is a checked expert
        const acc_t* o = orow.data();
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          o = op + r * H;
        } else {
          load_row(op + r * H, 1, H, orow.data());
        }
        axpy_bias(wp[s], o, bp == nullptr ? nullptr : bp + ip[s] * H, H, acc.data());
      }
      store_row(acc.data(), H, yp + t * H, 1);
    }
  });
  return y;
}

}  // namespace

namespace moe {

at::Tensor moe_experts_cpu(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                           const at::Tensor& weights, const at::Tensor& ids, c10::string_view activation,
                           const OptTensor& gate_up_bias, const OptTensor& down_bias) {
  check_experts_args(x, gate_up, down, weights, ids, gate_up_bias, down_bias);
  const Act act = parse_activation(activation);
  const BelowAutograd below_autograd;
  // detached aliases: worker threads do not inherit the dispatch guard
  const at::Tensor xd = x.detach(), gud = gate_up.detach(), dd = down.detach();
  switch (x.scalar_type()) {
    case at::kFloat:
      return experts_forward<float>(xd, gud, dd, weights, ids, act, gate_up_bias, down_bias);
    case at::kDouble:
      return experts_forward<double>(xd, gud, dd, weights, ids, act, gate_up_bias, down_bias);
    case at::kBFloat16:
      return experts_forward<c10::BFloat16>(xd, gud, dd, weights, ids, act, gate_up_bias, down_bias);
    default:
      return experts_forward<c10::Half>(xd, gud, dd, weights, ids, act, gate_up_bias, down_bias);
  }
}

}  // namespace moe
}  // namespace mtmerge
