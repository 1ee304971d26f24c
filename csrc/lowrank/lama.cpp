// LAMA pooling: CPU kernels of mtmerge::lama_pool and lama_pool_backward.
// Semantics: mtmerge/reference/lowrank.py (lama_pool). Schema: mtmerge/ops/_lowrank_ops.py.
//
// Work items are (row b, chunk of kChunk tokens); partial sums per item are combined in chunk
// order, so the bits never depend on the thread count. Per item, one streaming pass over h:
//   G = h_chunk Q (BLAS), z = tanh(u * g), f = z / max(||z||, eps), e = exp(f - 1) (0 at masked
//   tokens), partial sums S = sum_t e and acc = e^T h_chunk (BLAS).
// Because ||f|| <= 1, every logit lies in [-1, 1]: exp(f - 1) never overflows or vanishes, so the
// softmax needs no running maximum (the "online" rescaling is a constant shift by the bound).
// Then attn = e / S, pooled = acc / S. The context (mean of h over the real tokens) takes its
// own pass when not given.
#include "lowrank/common.h"
#include "lowrank/ops.h"

namespace mtmerge {
namespace {

constexpr int64_t kChunk = 256;  // tokens per work item
constexpr double kNormEps = 1e-12;

struct Dims {
  int64_t B, T, D, m, chunks;
  int64_t items() const { return B * chunks; }
  int64_t t0(int64_t c) const { return c * kChunk; }
  int64_t len(int64_t c) const { return std::min(kChunk, T - c * kChunk); }
};

// Rows [t0, t0 + n) of h[b] in the compute type (a view when already so).
at::Tensor h_rows(const at::Tensor& h, int64_t b, int64_t t0, int64_t n, at::ScalarType cd, Scratch& buf) {
  return as_compute(h[b].narrow(0, t0, n), cd, buf);
}

// c [B, D]: the context in the compute type, or the mean of h over the real tokens (zeros for a
// row with none); count[b] = max(number of real tokens, 1).
template <typename acc_t>
at::Tensor context_of(const at::Tensor& h, const bool* real, const lowrank::OptTensor& context, const Dims& dm,
                      std::vector<acc_t>& count) {
  const at::ScalarType cd = c10::CppTypeToScalarType<acc_t>::value;
  count.assign(dm.B, acc_t(1));
  if (context) return context->to(cd).contiguous();
  at::Tensor part = at::zeros({dm.items(), dm.D}, at::dtype(cd));
  std::vector<int64_t> seen(dm.items(), 0);
  parallel_items<1>(dm.items(), [&](int64_t i, Scratch* scratch) {
    const int64_t b = i / dm.chunks, c = i % dm.chunks, t0 = dm.t0(c), n = dm.len(c);
    const at::Tensor X = h_rows(h, b, t0, n, cd, scratch[0]);
    const acc_t* x = X.const_data_ptr<acc_t>();
    acc_t* sum = part.mutable_data_ptr<acc_t>() + i * dm.D;
    for (int64_t t = 0; t < n; ++t) {
      if (real != nullptr && !real[b * dm.T + t0 + t]) continue;
      add_into(sum, x + t * dm.D, dm.D);
      ++seen[i];
    }
  });
  at::Tensor c = at::zeros({dm.B, dm.D}, at::dtype(cd));
  acc_t* cp = c.mutable_data_ptr<acc_t>();
  const acc_t* pp = part.const_data_ptr<acc_t>();
  for (int64_t b = 0; b < dm.B; ++b) {
    int64_t total = 0;
    for (int64_t ch = 0; ch < dm.chunks; ++ch) {
      add_into(cp + b * dm.D, pp + (b * dm.chunks + ch) * dm.D, dm.D);
      total += seen[b * dm.chunks + ch];
    }
    count[b] = acc_t(std::max<int64_t>(total, 1));
    for (int64_t j = 0; j < dm.D; ++j) cp[b * dm.D + j] /= count[b];
  }
  return c;
}

// Per token of a chunk: z = tanh(u * g), f = z / max(||z||, eps), e = exp(f - 1) or 0 when
// masked. g: [n, ldg] (first m columns); writes z [n, m] (when not null) and e into
// e_out[i * lde + t]; adds sum_t e into esum[i].
template <typename acc_t>
void features(const acc_t* g, int64_t ldg, const acc_t* u, const bool* real, int64_t n, int64_t m, acc_t* z_out,
              acc_t* e_out, int64_t lde, acc_t* esum) {
  std::vector<acc_t> z(m);
  for (int64_t t = 0; t < n; ++t) {
    acc_t sq = 0;
    for (int64_t i = 0; i < m; ++i) {
      z[i] = std::tanh(u[i] * g[t * ldg + i]);
      sq += z[i] * z[i];
    }
    if (z_out != nullptr) std::copy(z.begin(), z.end(), z_out + t * m);
    const acc_t norm = std::max(std::sqrt(sq), acc_t(kNormEps));
    const bool keep = real == nullptr || real[t];
    for (int64_t i = 0; i < m; ++i) {
      const acc_t e = keep ? std::exp(z[i] / norm - acc_t(1)) : acc_t(0);
      e_out[i * lde + t] = e;
      esum[i] += e;
    }
  }
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
                                           const lowrank::OptTensor& mask, const lowrank::OptTensor& context) {
  const at::ScalarType cd = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2), m = P.size(1);
  const Dims dm{B, T, D, m, ceil_div(T, kChunk)};
  at::Tensor attn = at::empty({B, m, T}, at::dtype(cd));
  at::Tensor pooled = at::empty({B, m, D}, h.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor real_t = mask ? mask->contiguous() : at::Tensor();
  const bool* real = mask ? real_t.const_data_ptr<bool>() : nullptr;
  std::vector<acc_t> count;
  const at::Tensor c = context_of<acc_t>(h, real, context, dm, count);
  const at::Tensor Qc = Q.to(cd).contiguous();
  const at::Tensor u = at::mm(c, P.to(cd));  // [B, m]
  at::Tensor esum = at::zeros({dm.items(), m}, at::dtype(cd));
  at::Tensor acc = at::empty({dm.items(), m, D}, at::dtype(cd));
  parallel_items<2>(dm.items(), [&](int64_t i, Scratch* scratch) {
    const int64_t b = i / dm.chunks, t0 = dm.t0(i % dm.chunks), n = dm.len(i % dm.chunks);
    const at::Tensor X = h_rows(h, b, t0, n, cd, scratch[0]);
    at::Tensor G = scratch[1].get(cd, n, m);
    at::mm_out(G, X, Qc);
    acc_t* e = attn.mutable_data_ptr<acc_t>() + b * m * T + t0;  // unnormalized for now
    features<acc_t>(G.const_data_ptr<acc_t>(), m, u.const_data_ptr<acc_t>() + b * m,
                    real == nullptr ? nullptr : real + b * T + t0, n, m, nullptr, e, T,
                    esum.mutable_data_ptr<acc_t>() + i * m);
    at::Tensor acc_i = acc[i];
    at::mm_out(acc_i, attn[b].narrow(1, t0, n), X);  // e^T h over the chunk
  });
  // combine the chunks of each row in order, normalize
  const bool direct = h.scalar_type() == cd;
  parallel_items<1>(B, [&](int64_t b, Scratch* scratch) {
    at::Tensor out = direct ? pooled[b] : scratch[0].get(cd, m, D);
    acc_t* po = out.mutable_data_ptr<acc_t>();
    std::fill(po, po + m * D, acc_t(0));
    std::vector<acc_t> total(m, acc_t(0));
    for (int64_t ch = 0; ch < dm.chunks; ++ch) {
      const int64_t i = b * dm.chunks + ch;
      add_into(total.data(), esum.const_data_ptr<acc_t>() + i * m, m);
      add_into(po, acc.const_data_ptr<acc_t>() + i * m * D, m * D);
    }
    acc_t* a = attn.mutable_data_ptr<acc_t>() + b * m * T;
    for (int64_t j = 0; j < m; ++j) {
      const acc_t s = total[j];  // 0 only for a row without a real token: attn and pooled stay 0
      if (s > 0) {
        for (int64_t t = 0; t < T; ++t) a[j * T + t] /= s;
        for (int64_t x = 0; x < D; ++x) po[j * D + x] /= s;
      }
    }
    if (!direct) pooled[b].copy_(out);
  });
  return {attn, pooled};
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_attn,
                                                                    const at::Tensor& grad_pooled, const at::Tensor& h,
                                                                    const at::Tensor& P, const at::Tensor& Q,
                                                                    const lowrank::OptTensor& mask,
                                                                    const lowrank::OptTensor& context) {
  const at::ScalarType cd = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2), m = P.size(1);
  const Dims dm{B, T, D, m, ceil_div(T, kChunk)};
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor grad_h = at::empty({B, T, D}, h.options().memory_format(contiguous));
  const at::Tensor real_t = mask ? mask->contiguous() : at::Tensor();
  const bool* real = mask ? real_t.const_data_ptr<bool>() : nullptr;
  std::vector<acc_t> count;
  const at::Tensor c = context_of<acc_t>(h, real, context, dm, count);
  const at::Tensor Pc = P.to(cd).contiguous(), Qc = Q.to(cd).contiguous();
  const at::Tensor u = at::mm(c, Pc);  // [B, m]
  const at::Tensor ga_in = grad_attn.to(cd).contiguous();
  const at::Tensor gp = grad_pooled.to(cd).contiguous();  // [B, m, D]
  // R[b] = [Q | gp[b]^T]  [D, 2m]: h_t R gives g_t and <gp_i, h_t> in one GEMM; [gg | a] R^T is
  // grad_h's gg Q^T + a^T gp in one GEMM
  at::Tensor R = at::empty({B, D, 2 * m}, at::dtype(cd));
  R.narrow(2, 0, m).copy_(Qc.unsqueeze(0).expand({B, D, m}));
  R.narrow(2, m, m).copy_(gp.transpose(1, 2));
  // per token [B, T, m]: e (then a), g_attn (then gg), g, z
  at::Tensor AG = at::empty({B, T, 2 * m}, at::dtype(cd));  // [e | g_attn], then [gg | a]
  at::Tensor Gs = at::empty({B, T, m}, at::dtype(cd)), Zs = at::empty({B, T, m}, at::dtype(cd));
  at::Tensor esum = at::zeros({dm.items(), m}, at::dtype(cd)), wsum = at::zeros({dm.items(), m}, at::dtype(cd));

  // pass 1 over h: features, e, g_attn = grad_attn + gp h^T; partial sums of e and e * g_attn
  parallel_items<2>(dm.items(), [&](int64_t i, Scratch* scratch) {
    const int64_t b = i / dm.chunks, t0 = dm.t0(i % dm.chunks), n = dm.len(i % dm.chunks);
    const at::Tensor X = h_rows(h, b, t0, n, cd, scratch[0]);
    at::Tensor GG = scratch[1].get(cd, n, 2 * m);
    at::mm_out(GG, X, R[b]);
    const acc_t* gg = GG.const_data_ptr<acc_t>();
    acc_t* ag = AG.mutable_data_ptr<acc_t>() + (b * T + t0) * 2 * m;
    acc_t* gs = Gs.mutable_data_ptr<acc_t>() + (b * T + t0) * m;
    std::vector<acc_t> et(m * n);  // e transposed [m, n]
    features<acc_t>(gg, 2 * m, u.const_data_ptr<acc_t>() + b * m, real == nullptr ? nullptr : real + b * T + t0, n,
                    m, Zs.mutable_data_ptr<acc_t>() + (b * T + t0) * m, et.data(), n,
                    esum.mutable_data_ptr<acc_t>() + i * m);
    const acc_t* gin = ga_in.const_data_ptr<acc_t>() + b * m * T + t0;
    acc_t* ws = wsum.mutable_data_ptr<acc_t>() + i * m;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t j = 0; j < m; ++j) {
        const acc_t e = et[j * n + t], ga = gin[j * T + t] + gg[t * 2 * m + m + j];
        ag[t * 2 * m + j] = e;
        ag[t * 2 * m + m + j] = ga;
        gs[t * m + j] = gg[t * 2 * m + j];
        ws[j] += e * ga;
      }
    }
  });

  // per row: S = sum e, W = sum e * g_attn (chunks in order); then, per token without touching
  // h: a = e / S, gl = a (g_attn - W / S), the normalization and tanh backward, gg = gs u, and
  // gu = sum_t gs g (partial per chunk)
  std::vector<acc_t> S(B * m, 0), W(B * m, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t ch = 0; ch < dm.chunks; ++ch) {
      add_into(S.data() + b * m, esum.const_data_ptr<acc_t>() + (b * dm.chunks + ch) * m, m);
      add_into(W.data() + b * m, wsum.const_data_ptr<acc_t>() + (b * dm.chunks + ch) * m, m);
    }
  }
  at::Tensor gu_part = at::zeros({dm.items(), m}, at::dtype(cd));
  parallel_items<1>(dm.items(), [&](int64_t i, Scratch*) {
    const int64_t b = i / dm.chunks, t0 = dm.t0(i % dm.chunks), n = dm.len(i % dm.chunks);
    const acc_t* ub = u.const_data_ptr<acc_t>() + b * m;
    acc_t* ag = AG.mutable_data_ptr<acc_t>() + (b * T + t0) * 2 * m;
    const acc_t* gs = Gs.const_data_ptr<acc_t>() + (b * T + t0) * m;
    const acc_t* zs = Zs.const_data_ptr<acc_t>() + (b * T + t0) * m;
    acc_t* gu = gu_part.mutable_data_ptr<acc_t>() + i * m;
    std::vector<acc_t> gf(m), av(m);
    for (int64_t t = 0; t < n; ++t) {
      acc_t* row = ag + t * 2 * m;
      const acc_t* z = zs + t * m;
      acc_t sq = 0;
      for (int64_t j = 0; j < m; ++j) sq += z[j] * z[j];
      const acc_t norm = std::sqrt(sq), denom = std::max(norm, acc_t(kNormEps));
      acc_t dot = 0;  // <f, gf>
      for (int64_t j = 0; j < m; ++j) {
        const acc_t s = S[b * m + j];
        const acc_t a = s > 0 ? row[j] / s : acc_t(0);
        gf[j] = s > 0 ? a * (row[m + j] - W[b * m + j] / s) : acc_t(0);
        av[j] = a;
        dot += (z[j] / denom) * gf[j];
      }
      for (int64_t j = 0; j < m; ++j) {
        const acc_t gz = norm >= acc_t(kNormEps) ? (gf[j] - (z[j] / denom) * dot) / denom : gf[j] / acc_t(kNormEps);
        const acc_t gsj = gz * (acc_t(1) - z[j] * z[j]);
        row[j] = gsj * ub[j];  // gg: the gradient of g_t
        row[m + j] = av[j];
        gu[j] += gsj * gs[t * m + j];
      }
    }
  });
  at::Tensor gu = at::zeros({B, m}, at::dtype(cd));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t ch = 0; ch < dm.chunks; ++ch) {
      add_into(gu.mutable_data_ptr<acc_t>() + b * m, gu_part.const_data_ptr<acc_t>() + (b * dm.chunks + ch) * m, m);
    }
  }
  const at::Tensor gc = at::mm(gu, Pc.t());  // [B, D]: gradient of the context
  const at::Tensor grad_P = at::mm(c.t(), gu).to(P.scalar_type());
  // per-row constant the mean's backward adds to every real token when the context was computed
  at::Tensor gc_tok;
  if (!context) {
    gc_tok = gc.clone();
    acc_t* p = gc_tok.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < D; ++j) p[b * D + j] /= count[b];
    }
  }

  // pass 2 over h: grad_h = [gg | a] R^T (+ gc / count at real tokens), grad_Q partial = h^T gg
  at::Tensor gq_part = at::empty({dm.items(), D, m}, at::dtype(cd));
  const bool direct = h.scalar_type() == cd;
  parallel_items<2>(dm.items(), [&](int64_t i, Scratch* scratch) {
    const int64_t b = i / dm.chunks, t0 = dm.t0(i % dm.chunks), n = dm.len(i % dm.chunks);
    const at::Tensor X = h_rows(h, b, t0, n, cd, scratch[0]);
    const at::Tensor agb = AG[b].narrow(0, t0, n);
    at::Tensor ghb = grad_h[b].narrow(0, t0, n);
    at::Tensor gh = direct ? ghb : scratch[1].get(cd, n, D);
    at::mm_out(gh, agb, R[b].t());
    if (gc_tok.defined()) {
      const acc_t* add = gc_tok.const_data_ptr<acc_t>() + b * D;
      acc_t* p = gh.mutable_data_ptr<acc_t>();
      for (int64_t t = 0; t < n; ++t) {
        if (real == nullptr || real[b * T + t0 + t]) add_into(p + t * D, add, D);
      }
    }
    if (!direct) ghb.copy_(gh);
    at::Tensor gq = gq_part[i];
    at::mm_out(gq, X.t(), agb.narrow(1, 0, m));
  });
  at::Tensor grad_Q_acc = at::zeros({D, m}, at::dtype(cd));
  for (int64_t i = 0; i < dm.items(); ++i) {  // items in order: a fixed summation order
    add_into(grad_Q_acc.mutable_data_ptr<acc_t>(), gq_part.const_data_ptr<acc_t>() + i * D * m, D * m);
  }
  at::Tensor grad_context = context ? gc.to(context->scalar_type()) : at::empty({0}, h.options());
  return {grad_h, grad_P, grad_Q_acc.to(Q.scalar_type()), grad_context};
}

void check_lama(const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q, const lowrank::OptTensor& mask,
                const lowrank::OptTensor& context) {
  check_cpu(h, "h");
  check_float(h, "h");
  TORCH_CHECK(h.dim() == 3, "h must be [B, T, D], got ", h.sizes());
  check_like(P, "P", h);
  check_like(Q, "Q", h);
  TORCH_CHECK(P.dim() == 2 && P.size(0) == h.size(2), "P must be [D=", h.size(2), ", m], got ", P.sizes());
  TORCH_CHECK(Q.sizes() == P.sizes(), "Q must have P's shape ", P.sizes(), ", got ", Q.sizes());
  check_mask(mask, "mask", h.size(0), h.size(1));
  if (context) {
    check_like(*context, "context", h);
    TORCH_CHECK(context->dim() == 2 && context->size(0) == h.size(0) && context->size(1) == h.size(2),
                "context must be [B, D], got ", context->sizes());
  }
}

lowrank::OptTensor detached(const lowrank::OptTensor& t) { return t ? lowrank::OptTensor(t->detach()) : std::nullopt; }

}  // namespace

namespace lowrank {

std::tuple<at::Tensor, at::Tensor> lama_pool_cpu(const at::Tensor& h, const at::Tensor& P, const at::Tensor& Q,
                                                 const OptTensor& mask, const OptTensor& context) {
  check_lama(h, P, Q, mask, context);
  const BelowAutograd below_autograd;
  if (h.scalar_type() == at::kDouble) return forward<double>(h.detach(), P.detach(), Q.detach(), mask, detached(context));
  return forward<float>(h.detach(), P.detach(), Q.detach(), mask, detached(context));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lama_pool_backward_cpu(
    const at::Tensor& grad_attn, const at::Tensor& grad_pooled, const at::Tensor& h, const at::Tensor& P,
    const at::Tensor& Q, const OptTensor& mask, const OptTensor& context) {
  check_lama(h, P, Q, mask, context);
  const at::ScalarType cd = compute_type(h.scalar_type());
  check_cpu(grad_attn, "grad_attn");
  TORCH_CHECK(grad_attn.scalar_type() == cd, "grad_attn must be ", cd, ", got ", grad_attn.scalar_type());
  TORCH_CHECK(grad_attn.dim() == 3 && grad_attn.size(0) == h.size(0) && grad_attn.size(1) == P.size(1) &&
                  grad_attn.size(2) == h.size(1),
              "grad_attn must be [B, m, T], got ", grad_attn.sizes());
  check_like(grad_pooled, "grad_pooled", h);
  TORCH_CHECK(grad_pooled.dim() == 3 && grad_pooled.size(0) == h.size(0) && grad_pooled.size(1) == P.size(1) &&
                  grad_pooled.size(2) == h.size(2),
              "grad_pooled must be [B, m, D], got ", grad_pooled.sizes());
  const BelowAutograd below_autograd;
  if (h.scalar_type() == at::kDouble) {
    return backward<double>(grad_attn.detach(), grad_pooled.detach(), h.detach(), P.detach(), Q.detach(), mask,
                            detached(context));
  }
  return backward<float>(grad_attn.detach(), grad_pooled.detach(), h.detach(), P.detach(), Q.detach(), mask,
                         detached(context));
}

}  // namespace lowrank
}  // namespace mtmerge
