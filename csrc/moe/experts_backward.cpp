// Gradients of the routed experts: CPU kernel of mtmerge::moe_experts_backward.
// Semantics: mtmerge/reference/moe.py (moe_experts_backward). Schema: mtmerge/ops/_moe_ops.py.
//
// One work item per expert (its weight gradients are sums over all of its rows, taken by one
// GEMM each): recompute h and a by GEMMs in x's dtype, then with g_o = w * grad_out and P = grad_out W_d
//   grad_weights = <P, a> (+ <grad_out, b_d>) = <grad_out, o>, g_a = w P, g_h = glu'(h) g_a (fp32 elementwise),
//   grad_down[e] = g_o^T a, grad_gate_up[e] = g_h^T x, dx = g_h W_gu (per slot),
// and finally grad_x[t] = sum_j dx[t, j] in j order. An expert with few rows (kSmallRows)
// recomputes h by dots2 (small_m.h) and gets o and g_a from one streaming pass over W_d. Items run single-threaded, so the bits do
// not depend on the thread count.
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include "moe/common.h"
#include "moe/ops.h"
#include "moe/small_m.h"

namespace mtmerge {
namespace {

constexpr int64_t kCombineGrain = 16;  // tokens per combine chunk
constexpr int64_t kSmallRows = 8;      // an expert with at most this many rows streams its weights (small_m.h)

// acc[m * ldacc + i] += coef[m * ldc] * w[i] for m < n, i < len (rows of a transposed product).
MTMERGE_CLONES void axpy_rows_f32(const float* w, int64_t len, const float* coef, int64_t ldc, int64_t n, float* acc,
                                  int64_t ldacc) {
  for (int64_t m = 0; m < n; ++m) {
    const float c = coef[m * ldc];
    float* out = acc + m * ldacc;
    for (int64_t i = 0; i < len; ++i) out[i] += c * w[i];
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
    const at::Tensor& weights, const at::Tensor& ids, Act act, const moe::OptTensor& gu_bias,
    const moe::OptTensor& d_bias) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const at::ScalarType st = x.scalar_type(), acc = acc_type(st);
  const int64_t T = x.size(0), H = x.size(1), E = gate_up.size(0), F = gate_up.size(1) / 2, k = ids.size(1);
  const bool interleaved = act == Act::kGptOss;
  const at::Tensor xc = x.contiguous(), goc = grad_out.contiguous();
  const at::Tensor idl = ids_int64(ids);
  const at::Tensor w = weights.to(acc).contiguous();
  const at::Tensor bgu = gu_bias ? gu_bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor bd = d_bias ? d_bias->to(acc).contiguous() : at::Tensor();
  const SlotGroups sg = group_slots(idl.const_data_ptr<int64_t>(), T * k, E);
  const int64_t N = sg.rows();

  at::Tensor grad_gu = at::empty({E, 2 * F, H}, x.options());
  at::Tensor grad_d = at::empty({E, H, F}, x.options());
  at::Tensor grad_w = at::zeros({T, k}, w.options());
  at::Tensor grad_bgu = at::zeros({gu_bias ? E : 0, 2 * F}, w.options());
  at::Tensor grad_bd = at::zeros({d_bias ? E : 0, H}, w.options());
  at::Tensor dx = at::empty({N, H}, x.options());  // per routed row: g_h W_gu

  // experts without a row get zero weight gradients
  std::vector<char> active(E, 0);
  for (int64_t g = 0; g < sg.groups(); ++g) active[sg.expert[g]] = 1;
  at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      if (active[e]) continue;
      grad_gu.select(0, e).zero_();
      grad_d.select(0, e).zero_();
    }
  });

  std::vector<double> cost;
  for (int64_t g = 0; g < sg.groups(); ++g) cost.push_back(double(sg.size(g) + 8) * double(F) * double(H));
  parallel_items<9>(cost, [&](int64_t group, Scratch* scratch) {
    const int64_t e = sg.expert[group], n = sg.size(group), row0 = sg.begin[group];
    const at::Tensor Wgu = gate_up.select(0, e), Wd = down.select(0, e);
    // gathered rows: tokens X, g_o = w * grad_out (x's dtype for the GEMMs)
    at::Tensor X = scratch[0].get(st, n, H), Go = scratch[1].get(st, n, H);
    // few rows: o and g_a come from one streaming pass over W_d; otherwise P = grad_out W_d (unweighted
    // rows Gr) gives g_a = w P and <grad_out, o> = <P, a>, so o is never recomputed
    const bool small = !std::is_same_v<scalar_t, double> && n <= kSmallRows && gate_up.stride(2) == 1 &&
                       down.stride(2) == 1;
    at::Tensor Gr = small ? at::Tensor() : scratch[8].get(st, n, H);
    acc_t* rowbuf = scratch[2].get(acc, 4, std::max(H, 2 * F)).mutable_data_ptr<acc_t>();
    acc_t *ra = rowbuf, *rb = rowbuf + std::max(H, 2 * F);
    acc_t* bias_d = bd.defined() ? grad_bd.mutable_data_ptr<acc_t>() + e * H : nullptr;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t s = sg.slot_of_row[row0 + r], t = s / k;
      std::memcpy(X.mutable_data_ptr<scalar_t>() + r * H, xc.const_data_ptr<scalar_t>() + t * H,
                  H * sizeof(scalar_t));
      if (!small) {
        std::memcpy(Gr.mutable_data_ptr<scalar_t>() + r * H, goc.const_data_ptr<scalar_t>() + t * H,
                    H * sizeof(scalar_t));
      }
      load_row(goc.const_data_ptr<scalar_t>() + t * H, 1, H, ra);
      const acc_t ws = w.const_data_ptr<acc_t>()[s];
      for (int64_t i = 0; i < H; ++i) ra[i] *= ws;
      if (bias_d != nullptr) add_rows(ra, H, bias_d);
      store_row(ra, H, Go.mutable_data_ptr<scalar_t>() + r * H, 1);
    }
    // recompute h, a, o (few rows: each weight row streamed once, dots2 against every row, and
    // W_d's rows give o and g_a = g_o W_d in the same pass)
    const Dots2Fn dots2 = dots2_fn<float>();
    at::Tensor Hh = scratch[3].get(st, n, 2 * F);
    if (small) {
      float* Xf = thread_floats(0, n * H);
      for (int64_t r = 0; r < n; ++r) load_row(X.const_data_ptr<scalar_t>() + r * H, 1, H, Xf + r * H);
      float* wrow = thread_floats(1, 2 * H);
      float* pair = thread_floats(2, 2 * n);
      scalar_t* hp = Hh.mutable_data_ptr<scalar_t>();
      const scalar_t* W = gate_up.const_data_ptr<scalar_t>() + e * gate_up.stride(0);
      const int64_t ld = gate_up.stride(1);
      for (int64_t f = 0; f < F; ++f) {
        const int64_t r0 = interleaved ? 2 * f : f, r1 = interleaved ? 2 * f + 1 : F + f;  // gate, up rows
        load_row(W + r0 * ld, 1, H, wrow);
        load_row(W + r1 * ld, 1, H, wrow + H);
        dots2(wrow, wrow + H, H, Xf, H, n, pair);
        for (int64_t r = 0; r < n; ++r) {
          hp[r * 2 * F + r0] = scalar_t(pair[r]);
          hp[r * 2 * F + r1] = scalar_t(pair[n + r]);
        }
      }
    } else {
      at::mm_out(Hh, X, Wgu.t());
    }
    at::Tensor A = scratch[4].get(st, n, F);
    acc_t *g = rowbuf + 2 * std::max(H, 2 * F), *u = g + F, *a = ra, *ga = rb;
    const int64_t step = interleaved ? 2 : 1, up_off = interleaved ? 1 : F;
    const acc_t* bg = bgu.defined() ? bgu.const_data_ptr<acc_t>() + e * 2 * F : nullptr;
    auto gate_and_up = [&](int64_t r) {  // fp32 gate and up of row r, biases added
      const scalar_t* h = Hh.const_data_ptr<scalar_t>() + r * 2 * F;
      load_row(h, step, F, g);
      load_row(h + up_off, step, F, u);
      if (bg != nullptr) {
        for (int64_t f = 0; f < F; ++f) {
          g[f] += bg[f * step];
          u[f] += bg[f * step + up_off];
        }
      }
    };
    for (int64_t r = 0; r < n; ++r) {
      gate_and_up(r);
      glu_rows(act, g, u, F, a);
      store_row(a, F, A.mutable_data_ptr<scalar_t>() + r * F, 1);
    }
    at::Tensor O = small ? scratch[5].get(st, n, H) : at::Tensor();
    at::Tensor Ga = scratch[6].get(st, n, F);  // small: g_a; otherwise P = grad_out W_d
    if (small) {
      float* Af = thread_floats(0, n * F);
      float* Gof = thread_floats(3, n * H);
      float* Gaf = thread_floats(4, n * F);
      float* wrow = thread_floats(1, 2 * F);
      float* pair = thread_floats(2, 2 * n);
      for (int64_t r = 0; r < n; ++r) {
        load_row(A.const_data_ptr<scalar_t>() + r * F, 1, F, Af + r * F);
        load_row(Go.const_data_ptr<scalar_t>() + r * H, 1, H, Gof + r * H);
      }
      std::fill(Gaf, Gaf + n * F, 0.0f);
      scalar_t* op = O.mutable_data_ptr<scalar_t>();
      const scalar_t* W = down.const_data_ptr<scalar_t>() + e * down.stride(0);
      const int64_t ld = down.stride(1);
      for (int64_t c = 0; c < H; c += 2) {
        const bool two = c + 1 < H;  // an odd last row is paired with itself
        load_row(W + c * ld, 1, F, wrow);
        if (two) load_row(W + (c + 1) * ld, 1, F, wrow + F);
        dots2(wrow, two ? wrow + F : wrow, F, Af, F, n, pair);
        for (int64_t r = 0; r < n; ++r) {
          op[r * H + c] = scalar_t(pair[r]);
          if (two) op[r * H + c + 1] = scalar_t(pair[n + r]);
        }
        axpy_rows_f32(wrow, F, Gof + c, H, n, Gaf, F);
        if (two) axpy_rows_f32(wrow + F, F, Gof + c + 1, H, n, Gaf, F);
      }
      for (int64_t r = 0; r < n; ++r) store_row(Gaf + r * F, F, Ga.mutable_data_ptr<scalar_t>() + r * F, 1);
    } else {
      at::mm_out(Ga, Gr, Wd);
    }
    // grad_weights[s] = <grad_out[t], o + b_d> (small: from o; otherwise <P, a> + <grad_out, b_d>, below)
    for (int64_t r = 0; r < n && small; ++r) {
      const int64_t s = sg.slot_of_row[row0 + r], t = s / k;
      load_row(O.const_data_ptr<scalar_t>() + r * H, 1, H, ra);
      load_row(goc.const_data_ptr<scalar_t>() + t * H, 1, H, rb);
      const acc_t* b = bd.defined() ? bd.const_data_ptr<acc_t>() + e * H : nullptr;
      acc_t dot = 0;
      for (int64_t i = 0; i < H; ++i) dot += rb[i] * (b == nullptr ? ra[i] : ra[i] + b[i]);
      grad_w.mutable_data_ptr<acc_t>()[s] = dot;
    }
    // g_h in h's layout
    at::Tensor Gh = scratch[7].get(st, n, 2 * F);
    acc_t* bias_gu = bgu.defined() ? grad_bgu.mutable_data_ptr<acc_t>() + e * 2 * F : nullptr;
    acc_t *gg = ra, *gu = ra + F;
    acc_t* arow = rowbuf + 3 * std::max(H, 2 * F);
    const acc_t* b_d = bd.defined() ? bd.const_data_ptr<acc_t>() + e * H : nullptr;
    for (int64_t r = 0; r < n; ++r) {
      gate_and_up(r);
      load_row(Ga.const_data_ptr<scalar_t>() + r * F, 1, F, ga);
      if (!small) {  // ga holds P: grad_weights, then g_a = w P
        const int64_t s = sg.slot_of_row[row0 + r];
        load_row(A.const_data_ptr<scalar_t>() + r * F, 1, F, arow);
        acc_t dot = 0;
        for (int64_t f = 0; f < F; ++f) dot += ga[f] * arow[f];
        if (b_d != nullptr) {
          load_row(Gr.const_data_ptr<scalar_t>() + r * H, 1, H, ra);
          for (int64_t i = 0; i < H; ++i) dot += ra[i] * b_d[i];
        }
        grad_w.mutable_data_ptr<acc_t>()[s] = dot;
        const acc_t ws = w.const_data_ptr<acc_t>()[s];
        for (int64_t f = 0; f < F; ++f) ga[f] *= ws;
      }
      glu_backward_rows(act, g, u, ga, F, gg, gu);
      scalar_t* gh = Gh.mutable_data_ptr<scalar_t>() + r * 2 * F;
      store_row(gg, F, gh, step);
      store_row(gu, F, gh + up_off, step);
      if (bias_gu != nullptr) {
        for (int64_t f = 0; f < F; ++f) {
          bias_gu[f * step] += gg[f];
          bias_gu[f * step + up_off] += gu[f];
        }
      }
    }
    // weight gradients and the rows' dx
    at::Tensor gd = grad_d.select(0, e), ggu = grad_gu.select(0, e), dxr = dx.narrow(0, row0, n);
    at::mm_out(gd, Go.t(), A);
    at::mm_out(ggu, Gh.t(), X);
    at::mm_out(dxr, Gh, Wgu);
  });

  // grad_x[t] = sum_j dx[t, j] in j order
  at::Tensor grad_x = at::empty({T, H}, x.options());
  const scalar_t* dxp = dx.const_data_ptr<scalar_t>();
  scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, T, kCombineGrain, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> sum(H), row(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = sg.row_of_slot[t * k + j];
        if (r < 0) continue;
        load_row(dxp + r * H, 1, H, row.data());
        add_rows(row.data(), H, sum.data());
      }
      store_row(sum.data(), H, gxp + t * H, 1);
    }
  });

  // two distinct empty tensors: outputs must not alias
  return {grad_x, grad_gu, grad_d, grad_w.to(weights.scalar_type()),
          gu_bias ? grad_bgu.to(st) : at::empty({0}, x.options()), d_bias ? grad_bd.to(st) : at::empty({0}, x.options())};
}

}  // namespace

namespace moe {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
    const at::Tensor& weights, const at::Tensor& ids, c10::string_view activation, const OptTensor& gate_up_bias,
    const OptTensor& down_bias) {
  check_experts_args(x, gate_up, down, weights, ids, gate_up_bias, down_bias);
  check_cpu(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "grad_out must have x's shape and dtype");
  const Act act = parse_activation(activation);
  const BelowAutograd below_autograd;
  // detached aliases: worker threads do not inherit the dispatch guard
  const at::Tensor god = grad_out.detach(), xd = x.detach(), gud = gate_up.detach(), dd = down.detach();
  switch (x.scalar_type()) {
    case at::kFloat:
      return experts_backward<float>(god, xd, gud, dd, weights, ids, act, gate_up_bias, down_bias);
    case at::kDouble:
      return experts_backward<double>(god, xd, gud, dd, weights, ids, act, gate_up_bias, down_bias);
    case at::kBFloat16:
      return experts_backward<c10::BFloat16>(god, xd, gud, dd, weights, ids, act, gate_up_bias, down_bias);
    default:
      return experts_backward<c10::Half>(god, xd, gud, dd, weights, ids, act, gate_up_bias, down_bias);
  }
}

}  // namespace moe
}  // namespace mtmerge
