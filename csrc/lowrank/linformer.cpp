// Linformer attention: CPU kernels of mtmerge::linformer_attention and its backward.
// Semantics: mtmerge/reference/lowrank.py (linformer_attention). Schema: mtmerge/ops/_lowrank_ops.py.
//
// Forward, in fp32 (fp64 for float64 inputs):
//   1. per (b, h): k0, v0 = k, v with padded rows zeroed (copies only when needed);
//      kp = E[:, :N] k0, vp = F[:, :N] v0  [r, d] by BLAS;
//   2. per (b, h, block of queries): S = q kp^T by BLAS, P = exp(S * scale - rowmax) row by row
//      (vectorized exp, unnormalized), out = (P vp) / rowsum by BLAS then a row scale, rounded
//      once to q's dtype.
// Backward recomputes kp, vp and P per (b, h), accumulating gkp and gvp over the query blocks
// in order; grad_E and grad_F sum over (b, h) in order inside column blocks of N. Work items are
// cut by the data alone, so the bits never depend on the thread count.
#include "lowrank/common.h"
#include "lowrank/ops.h"

namespace mtmerge {
namespace {

constexpr int64_t kQBlock = 256;    // backward: query rows per block (P and dP [kQBlock, r] stay in L2)
constexpr int64_t kFwdQBlock = 512; // forward: S [kFwdQBlock, r]; fewer, larger GEMMs measured faster
constexpr int64_t kColBlock = 512;  // columns of grad_E / grad_F per work item

// src [N, d] in the compute type with the rows where pad[n] is true zeroed (`where`, not a
// product: padded values may be inf or NaN). Returns src itself when nothing needs changing,
// else fills dst (contiguous [N, d]).
at::Tensor masked_rows(const at::Tensor& src, const bool* pad, at::ScalarType cd, at::Tensor dst) {
  const int64_t N = src.size(0), d = src.size(1);
  if (pad == nullptr && src.scalar_type() == cd && src.is_contiguous()) return src;
  dst.copy_(src);
  if (pad != nullptr) {
    char* p = static_cast<char*>(dst.mutable_data_ptr());
    const int64_t row = d * int64_t(dst.element_size());
    for (int64_t n = 0; n < N; ++n) {
      if (pad[n]) std::memset(p + n * row, 0, row);
    }
  }
  return dst;
}

// The first N columns of E / F [r, Nmax] in the compute type (a view when already so).
at::Tensor columns(const at::Tensor& E, int64_t N, at::ScalarType cd) {
  const at::Tensor e = E.narrow(1, 0, N);
  return e.scalar_type() == cd && e.stride(1) == 1 ? e : e.to(cd).contiguous();
}

// dst (a view of an output) = src, or src computed directly in dst when it is the compute type.
void write_out(at::Tensor dst, const at::Tensor& src) {
  if (!dst.is_same(src)) dst.copy_(src);
}

template <typename acc_t>
at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& E,
                   const at::Tensor& F, const lowrank::OptTensor& mask, double scale) {
  const at::ScalarType cd = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3), N = k.size(2), r = E.size(0);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  if (N == 0 || r == 0) return out.zero_();  // kp = vp = 0 (or no keys at all): zeros
  const at::Tensor Ec = columns(E, N, cd), Fc = columns(F, N, cd);
  const at::Tensor pad = mask ? mask->contiguous() : at::Tensor();
  const bool* pp = mask ? pad.const_data_ptr<bool>() : nullptr;
  at::Tensor kp = at::empty({B, H, r, d}, at::dtype(cd)), vp = at::empty({B, H, r, d}, at::dtype(cd));
  parallel_items<2>(B * H, [&](int64_t i, Scratch* scratch) {
    const int64_t b = i / H, h = i % H;
    const bool* pad_b = pp == nullptr ? nullptr : pp + b * N;
    at::Tensor kpi = kp[b][h], vpi = vp[b][h];
    at::mm_out(kpi, Ec, masked_rows(k[b][h], pad_b, cd, scratch[0].get(cd, N, d)));
    at::mm_out(vpi, Fc, masked_rows(v[b][h], pad_b, cd, scratch[1].get(cd, N, d)));
  });
  const int64_t QB = kFwdQBlock;
  const int64_t nqb = ceil_div(Nq, QB);
  const bool direct = q.scalar_type() == cd;
  parallel_items<4>(B * H * nqb, [&](int64_t i, Scratch* scratch) {
    const int64_t bh = i / nqb, b = bh / H, h = bh % H, i0 = (i % nqb) * QB, nb = std::min(QB, Nq - i0);
    const at::Tensor qb = as_compute(q[b][h].narrow(0, i0, nb), cd, scratch[0]);
    at::Tensor S = scratch[1].get(cd, nb, r);
    acc_t* inv = scratch[3].get(cd, nb, 1).template mutable_data_ptr<acc_t>();
    at::mm_out(S, qb, kp[b][h].t());
    exp_rows<acc_t>(S.mutable_data_ptr<acc_t>(), nb, r, r, scale, inv);  // unnormalized: O rows get 1/sum
    at::Tensor ob = out[b][h].narrow(0, i0, nb);
    at::Tensor O = direct ? ob : scratch[2].get(cd, nb, d);
    at::mm_out(O, S, vp[b][h]);
    scale_rows<acc_t>(O.mutable_data_ptr<acc_t>(), nb, d, O.stride(0), inv);
    write_out(ob, O);
  });
  return out;
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& E,
    const at::Tensor& F, const lowrank::OptTensor& mask, double scale) {
  const at::ScalarType cd = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3), N = k.size(2), r = E.size(0);
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor grad_q = at::empty(q.sizes(), q.options().memory_format(contiguous));
  at::Tensor grad_k = at::empty(k.sizes(), k.options().memory_format(contiguous));
  at::Tensor grad_v = at::empty(v.sizes(), v.options().memory_format(contiguous));
  at::Tensor grad_E = at::zeros(E.sizes(), E.options().memory_format(contiguous));  // columns N: stay 0
  at::Tensor grad_F = at::zeros(F.sizes(), F.options().memory_format(contiguous));
  const bool direct = q.scalar_type() == cd;
  const at::Tensor Ec = columns(E, N, cd), Fc = columns(F, N, cd);
  const at::Tensor pad = mask ? mask->contiguous() : at::Tensor();
  const bool* pp = mask ? pad.const_data_ptr<bool>() : nullptr;
  // k0 / v0 for the grad_E / grad_F pass: the inputs themselves when already fp32, contiguous
  // and unmasked, else masked copies
  const bool copy_k = mask || k.scalar_type() != cd || !k.is_contiguous();
  const bool copy_v = mask || v.scalar_type() != cd || !v.is_contiguous();
  const at::Tensor k0 = copy_k ? at::empty(k.sizes(), at::dtype(cd)) : k;
  const at::Tensor v0 = copy_v ? at::empty(v.sizes(), at::dtype(cd)) : v;
  at::Tensor kp = at::empty({B, H, r, d}, at::dtype(cd)), vp = at::empty({B, H, r, d}, at::dtype(cd));
  at::Tensor gkp = at::zeros({B, H, r, d}, at::dtype(cd)), gvp = at::zeros({B, H, r, d}, at::dtype(cd));

  const int64_t QB = kQBlock;
  parallel_items<8>(B * H, [&](int64_t i, Scratch* scratch) {
    const int64_t b = i / H, h = i % H;
    const bool* pad_b = pp == nullptr ? nullptr : pp + b * N;
    const at::Tensor k0i = masked_rows(k[b][h], pad_b, cd, copy_k ? k0[b][h] : at::Tensor());
    const at::Tensor v0i = masked_rows(v[b][h], pad_b, cd, copy_v ? v0[b][h] : at::Tensor());
    at::Tensor kpi = kp[b][h], vpi = vp[b][h], gkpi = gkp[b][h], gvpi = gvp[b][h];
    at::mm_out(kpi, Ec, k0i);
    at::mm_out(vpi, Fc, v0i);
    for (int64_t i0 = 0; i0 < Nq; i0 += QB) {  // query blocks in order: gkp, gvp sum in a fixed order
      const int64_t nb = std::min(QB, Nq - i0);
      const at::Tensor qb = as_compute(q[b][h].narrow(0, i0, nb), cd, scratch[0]);
      const at::Tensor gob = as_compute(go[b][h].narrow(0, i0, nb), cd, scratch[1]);
      at::Tensor P = scratch[2].get(cd, nb, r), G = scratch[3].get(cd, nb, r);
      at::mm_out(P, qb, kpi.t());
      acc_t* inv = scratch[7].get(cd, nb, 1).template mutable_data_ptr<acc_t>();
      exp_rows<acc_t>(P.mutable_data_ptr<acc_t>(), nb, r, r, scale, inv);
      scale_rows<acc_t>(P.mutable_data_ptr<acc_t>(), nb, r, r, inv);
      at::mm_out(G, gob, vpi.t());               // dP = dO vp^T
      at::addmm_out(gvpi, gvpi, P.t(), gob);     // gvp += P^T dO
      softmax_grad_rows<acc_t>(P.const_data_ptr<acc_t>(), G.mutable_data_ptr<acc_t>(), nb, r, r, scale);
      at::Tensor gqb = grad_q[b][h].narrow(0, i0, nb);
      at::Tensor gq = direct ? gqb : scratch[4].get(cd, nb, d);
      at::mm_out(gq, G, kpi);                    // dq = scale dS kp
      write_out(gqb, gq);
      at::addmm_out(gkpi, gkpi, G.t(), qb);      // gkp += scale dS^T q
    }
    at::Tensor gkb = grad_k[b][h], gvb = grad_v[b][h];
    at::Tensor gk = direct ? gkb : scratch[5].get(cd, N, d), gv = direct ? gvb : scratch[6].get(cd, N, d);
    at::mm_out(gk, Ec.t(), gkpi);
    at::mm_out(gv, Fc.t(), gvpi);
    write_out(gkb, masked_rows(gk, pad_b, cd, gk));  // padded rows get 0
    write_out(gvb, masked_rows(gv, pad_b, cd, gv));
  });

  // grad_E[:, c] = sum over (b, h) in order of gkp k0[:, c]^T, per column block c of N
  const int64_t ncb = ceil_div(N, kColBlock);
  parallel_items<2>(2 * ncb, [&](int64_t i, Scratch* scratch) {
    const bool is_e = i < ncb;
    const int64_t c0 = (i % ncb) * kColBlock, nc = std::min(kColBlock, N - c0);
    const at::Tensor& g = is_e ? gkp : gvp;
    const at::Tensor& x0 = is_e ? k0 : v0;
    at::Tensor target = (is_e ? grad_E : grad_F).narrow(1, c0, nc);
    at::Tensor acc = direct ? target : scratch[0].get(cd, r, nc);
    if (B * H == 0) return;
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const at::Tensor rows = x0[b][h].narrow(0, c0, nc).t();
      if (bh == 0) {
        at::mm_out(acc, g[b][h], rows);
      } else {
        at::addmm_out(acc, acc, g[b][h], rows);
      }
    }
    write_out(target, acc);
  });
  return {grad_q, grad_k, grad_v, grad_E, grad_F};
}

void check_linformer(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& E,
                     const at::Tensor& F, const lowrank::OptTensor& mask) {
  check_cpu(q, "q");
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 4, "q must be [B, Hh, Nq, d], got ", q.sizes());
  check_like(k, "k", q);
  check_like(v, "v", q);
  check_like(E, "E", q);
  check_like(F, "F", q);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k must be [B, Hh, N, d] like q, got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(E.dim() == 2 && F.sizes() == E.sizes(), "E and F must be [r, Nmax], got ", E.sizes(), " and ",
              F.sizes());
  TORCH_CHECK(k.size(2) <= E.size(1), "N=", k.size(2), " keys exceed E's width Nmax=", E.size(1));
  check_mask(mask, "key_padding_mask", k.size(0), k.size(2));
}

}  // namespace

namespace lowrank {

at::Tensor linformer_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& E,
                                   const at::Tensor& F, const OptTensor& key_padding_mask, double scale) {
  check_linformer(q, k, v, E, F, key_padding_mask);
  const BelowAutograd below_autograd;
  if (q.scalar_type() == at::kDouble) {
    return forward<double>(q.detach(), k.detach(), v.detach(), E.detach(), F.detach(), key_padding_mask, scale);
  }
  return forward<float>(q.detach(), k.detach(), v.detach(), E.detach(), F.detach(), key_padding_mask, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linformer_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& E,
    const at::Tensor& F, const OptTensor& key_padding_mask, double scale) {
  check_linformer(q, k, v, E, F, key_padding_mask);
  check_like(grad_out, "grad_out", q);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "grad_out must have q's shape ", q.sizes(), ", got ", grad_out.sizes());
  const BelowAutograd below_autograd;
  if (q.scalar_type() == at::kDouble) {
    return backward<double>(grad_out.detach(), q.detach(), k.detach(), v.detach(), E.detach(), F.detach(),
                            key_padding_mask, scale);
  }
  return backward<float>(grad_out.detach(), q.detach(), k.detach(), v.detach(), E.detach(), F.detach(),
                         key_padding_mask, scale);
}

}  // namespace lowrank
}  // namespace mtmerge
