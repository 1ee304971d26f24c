// One LoRA adapter per token: CPU kernels of mtmerge::multi_lora and multi_lora_backward.
// Semantics: mtmerge/reference/lowrank.py (multi_lora). Schema: mtmerge/ops/_lowrank_ops.py.
//
// Tokens are grouped by adapter (a stable counting sort; ids outside [0, L) join no group), then
// per adapter and block of its tokens: gather the rows in fp32, S = X A_g^T (fp32, never
// rounded), E = S B_g^T by BLAS, y = base + scale[g] * E rounded once. Each adapter's weights
// are read once per block (one block for any T up to kRowBlock tokens); a group of at most
// kFusedRows tokens (decoding) shrinks in a vectorized loop instead, reading A straight from its
// storage dtype (no conversion pass, no BLAS call for a GEMV), and at rank 8 or 16 also expands
// so (B read once in its storage dtype), the whole item on raw pointers without ATen calls.
#include "common/dtype_io.h"
#include "lowrank/common.h"
#include "lowrank/ops.h"

namespace mtmerge {
namespace {

constexpr int64_t kRowBlock = 256;  // tokens of one forward work item

struct Groups {
  std::vector<int64_t> order;  // token indices grouped by adapter, increasing within a group
  std::vector<int64_t> begin;  // adapter g's tokens: order[begin[g] .. begin[g + 1])
  int64_t size(int64_t g) const { return begin[g + 1] - begin[g]; }
};

Groups group_tokens(const at::Tensor& ids, int64_t L) {
  const at::Tensor idl = ids.to(at::kLong).contiguous();
  const int64_t* ip = idl.const_data_ptr<int64_t>();
  const int64_t T = idl.numel();
  Groups gr;
  gr.begin.assign(L + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    if (ip[t] >= 0 && ip[t] < L) ++gr.begin[ip[t] + 1];  // out of range: treated as -1
  }
  for (int64_t g = 0; g < L; ++g) gr.begin[g + 1] += gr.begin[g];
  std::vector<int64_t> next(gr.begin.begin(), gr.begin.end() - 1);
  gr.order.resize(gr.begin[L]);
  for (int64_t t = 0; t < T; ++t) {
    if (ip[t] >= 0 && ip[t] < L) gr.order[next[ip[t]]++] = t;
  }
  return gr;
}

// Row `row` of a contiguous 2-D float tensor as acc_t.
template <typename acc_t>
void load_row(const at::Tensor& t, int64_t row, acc_t* dst) {
  const int64_t n = t.size(1);
  if constexpr (std::is_same_v<acc_t, double>) {
    std::memcpy(dst, t.const_data_ptr<double>() + row * n, n * sizeof(double));
  } else {
    load_floats(t, row * n, n, dst);
  }
}

template <typename acc_t>
void store_row(at::Tensor& t, int64_t row, const acc_t* src) {
  const int64_t n = t.size(1);
  if constexpr (std::is_same_v<acc_t, double>) {
    std::memcpy(t.mutable_data_ptr<double>() + row * n, src, n * sizeof(double));
  } else {
    store_floats(t, row * n, n, src);
  }
}

// rows [n, cols] in the compute type: row i = src[order[i]] (times s when s != 1).
template <typename acc_t>
at::Tensor gather_rows(const at::Tensor& src, const int64_t* order, int64_t n, acc_t s, Scratch& buf) {
  at::Tensor rows = buf.get(c10::CppTypeToScalarType<acc_t>::value, n, src.size(1));
  acc_t* p = rows.mutable_data_ptr<acc_t>();
  const int64_t cols = src.size(1);
  for (int64_t i = 0; i < n; ++i) {
    acc_t* dst = p + i * cols;
    load_row(src, order[i], dst);
    if (s != acc_t(1)) {
      for (int64_t c = 0; c < cols; ++c) dst[c] = s * dst[c];
    }
  }
  return rows;
}

constexpr int64_t kFusedRows = 16;  // groups up to this many tokens skip BLAS (float compute only)

// bf16 / fp16 / fp32 storage widened to fp32, one element (bf16: a shift, exact).
template <typename T>
MTMERGE_ALWAYS_INLINE float widen(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bits_float(uint32_t(v.x) << 16);
  } else {
    return c10::detail::fp16_ieee_to_fp32_value(v.x);
  }
}

// The small-group shrink: S [n, r] = X A^T in fp32 for n <= kFusedRows tokens, reading A [r, in]
// (contiguous, storage type T) straight from its storage, widened on the fly (no conversion pass,
// no BLAS call for a GEMV). The dot products use kLanes independent accumulators so that they
// vectorize.
template <typename T>
MTMERGE_ALWAYS_INLINE void shrink_t(const T* A, int64_t r, int64_t in, const float* X, int64_t n, float* S) {
  for (int64_t j = 0; j < r; ++j) {  // one row of A against every token (the row stays in L1)
    const T* a = A + j * in;
    for (int64_t t = 0; t < n; ++t) {
      const float* x = X + t * in;
      float acc[kLanes] = {};
      int64_t k = 0;
      for (; k + kLanes <= in; k += kLanes) {
        for (int l = 0; l < kLanes; ++l) acc[l] += widen(a[k + l]) * x[k + l];
      }
      float dot = 0.0f;
      for (; k < in; ++k) dot += widen(a[k]) * x[k];
      for (int l = 0; l < kLanes; ++l) dot += acc[l];
      S[t * r + j] = dot;
    }
  }
}

MTMERGE_CLONES void shrink_small(at::ScalarType st, const void* A, int64_t r, int64_t in, const float* X, int64_t n,
                                 float* S) {
  if (st == at::kFloat) {
    shrink_t(static_cast<const float*>(A), r, in, X, n, S);
  } else if (st == at::kBFloat16) {
    shrink_t(static_cast<const c10::BFloat16*>(A), r, in, X, n, S);
  } else {
    shrink_t(static_cast<const c10::Half*>(A), r, in, X, n, S);
  }
}

// The small-group expand: E [n, out] = S B^T in fp32 for n <= kFusedRows tokens and rank R (a
// compile-time 8 or 16: other ranks take BLAS), reading B [out, R] (contiguous, storage type T)
// straight from its storage, widened on the fly: no conversion pass, no GEMV call. With R fixed
// GCC unrolls the r-sum and vectorizes over the outputs (interleaved loads of B's rows); each
// output still sums its R terms in order.
template <int R, typename T>
MTMERGE_ALWAYS_INLINE void expand_fixed(const T* B, int64_t out, const float* S, int64_t n, float* E) {
  for (int64_t t = 0; t < n; ++t) {
    float s[R];
    for (int j = 0; j < R; ++j) s[j] = S[t * R + j];
    float* et = E + t * out;
    for (int64_t o = 0; o < out; ++o) {
      const T* bo = B + o * R;
      float acc = 0.0f;
      for (int j = 0; j < R; ++j) acc += widen(bo[j]) * s[j];
      et[o] = acc;
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#define MTMERGE_LORA_VEC16 1
// Rank 16 (one 16-lane vector per row of B): 16 rows' products, then a shuffle tree that sums
// the 16 rows at once (4 levels of folds; GCC vector extensions, so each ISA clone gets its own
// width: zmm, 2 ymm or 4 xmm). Each output sums its products in the same fixed tree order.
using v16f = float __attribute__((vector_size(64)));
using v16i = int32_t __attribute__((vector_size(64)));
using v16u = uint32_t __attribute__((vector_size(64)));
using v16h = uint16_t __attribute__((vector_size(32)));

// a, b: g rows of w partial sums each -> 2g rows of w/2 (a's rows, then b's): chunks of w/2
// lanes, the even chunks plus the odd ones
// (vectors by reference: no vector-ABI question for these always-inlined helpers)
MTMERGE_ALWAYS_INLINE void fold(v16f& dst, const v16f& a, const v16f& b, const v16i& lo, const v16i& hi) {
  dst = __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

constexpr v16i kLo16 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
constexpr v16i kHi16 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
constexpr v16i kLo8 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
constexpr v16i kHi8 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
constexpr v16i kLo4 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
constexpr v16i kHi4 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
constexpr v16i kLo2 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
constexpr v16i kHi2 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};

template <typename T>
MTMERGE_ALWAYS_INLINE void load_row16(v16f& v, const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof v);
  } else {  // bf16: widened exactly by a shift
    v16h h;
    std::memcpy(&h, p, sizeof h);
    v = reinterpret_cast<v16f>(__builtin_convertvector(h, v16u) << 16);
  }
}

template <typename T>
MTMERGE_ALWAYS_INLINE void expand_vec16(const T* B, int64_t out, const float* S, int64_t n, float* E) {
  const int64_t full = out / 16 * 16;
  for (int64_t t = 0; t < n; ++t) {
    v16f s;
    std::memcpy(&s, S + t * 16, sizeof s);
    float* et = E + t * out;
    for (int64_t o0 = 0; o0 < full; o0 += 16) {
      v16f v[16];
      for (int i = 0; i < 16; ++i) {
        load_row16(v[i], B + (o0 + i) * 16);
        v[i] *= s;
      }
      for (int i = 0; i < 8; ++i) fold(v[i], v[2 * i], v[2 * i + 1], kLo16, kHi16);
      for (int i = 0; i < 4; ++i) fold(v[i], v[2 * i], v[2 * i + 1], kLo8, kHi8);
      for (int i = 0; i < 2; ++i) fold(v[i], v[2 * i], v[2 * i + 1], kLo4, kHi4);
      v16f sums;
      fold(sums, v[0], v[1], kLo2, kHi2);
      std::memcpy(et + o0, &sums, sizeof sums);  // outputs o0 .. o0 + 15, in order
    }
    for (int64_t o = full; o < out; ++o) {  // the last out % 16 rows
      float acc = 0.0f;
      for (int j = 0; j < 16; ++j) acc += widen(B[o * 16 + j]) * S[t * 16 + j];
      et[o] = acc;
    }
  }
}
#else
#define MTMERGE_LORA_VEC16 0
#endif

template <int R>
MTMERGE_CLONES void expand_small(at::ScalarType st, const void* B, int64_t out, const float* S, int64_t n, float* E) {
#if MTMERGE_LORA_VEC16
  if constexpr (R == 16) {
    if (st == at::kFloat) return expand_vec16(static_cast<const float*>(B), out, S, n, E);
    if (st == at::kBFloat16) return expand_vec16(static_cast<const c10::BFloat16*>(B), out, S, n, E);
  }
#endif
  if (st == at::kFloat) {
    expand_fixed<R>(static_cast<const float*>(B), out, S, n, E);
  } else if (st == at::kBFloat16) {
    expand_fixed<R>(static_cast<const c10::BFloat16*>(B), out, S, n, E);
  } else {
    expand_fixed<R>(static_cast<const c10::Half*>(B), out, S, n, E);
  }
}

// One small group (n <= kFusedRows tokens, rank 8 or 16, float compute, contiguous A and B): the
// whole item on raw pointers (no ATen call: decoding runs one of these per adapter per layer):
// y[order[i]] = base + s * B (A x) with A x and B (.) in fp32, rounded once.
void small_block(const at::Tensor& xc, const at::Tensor& A, const at::Tensor& B, at::Tensor& y, const int64_t* order,
                 int64_t n, int64_t g, float s) {
  const int64_t in = xc.size(1), r = A.size(1), out = B.size(1);
  const at::ScalarType st = xc.scalar_type();
  const int64_t esize = xc.element_size();
  thread_local std::vector<float> buf;  // X [n, in], S [n, r], E [n, out], one row of y
  buf.resize(n * in + n * r + n * out + out);
  float *X = buf.data(), *S = X + n * in, *E = S + n * r, *row = E + n * out;
  for (int64_t i = 0; i < n; ++i) load_floats(xc, order[i] * in, in, X + i * in);
  shrink_small(st, static_cast<const char*>(A.const_data_ptr()) + g * r * in * esize, r, in, X, n, S);
  const void* Bg = static_cast<const char*>(B.const_data_ptr()) + g * out * r * esize;
  (r == 8 ? expand_small<8> : expand_small<16>)(st, Bg, out, S, n, E);
  for (int64_t i = 0; i < n; ++i) {
    const float* e = E + i * out;
    load_floats(y, order[i] * out, out, row);
    for (int64_t o = 0; o < out; ++o) row[o] = row[o] + s * e[o];
    store_floats(y, order[i] * out, out, row);
  }
}

struct Block {
  int64_t g, first, n;  // adapter, first position in Groups::order, tokens
};

template <typename acc_t>
at::Tensor lora_forward(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& ids,
                        const at::Tensor& scale, const lowrank::OptTensor& base) {
  const at::ScalarType cd = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t T = x.size(0), in = x.size(1), L = A.size(0), r = A.size(1), out = B.size(1);
  const bool fused = !std::is_same_v<acc_t, double> && A.is_contiguous();
  at::Tensor y = at::empty({T, out}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (base) {
    y.copy_(*base);  // rows without an adapter are the base; the others get base + s E below
  } else {
    y.zero_();
  }
  if (T == 0 || out == 0) return y;
  const at::Tensor xc = x.contiguous();
  const float* sp = scale.const_data_ptr<float>();
  const Groups gr = group_tokens(ids, L);
  std::vector<Block> blocks;
  for (int64_t g = 0; g < L; ++g) {
    const int64_t n = gr.size(g), nb = ceil_div(n, kRowBlock);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t r0 = n * b / nb, r1 = n * (b + 1) / nb;  // even blocks
      blocks.push_back({g, gr.begin[g] + r0, r1 - r0});
    }
  }
  const bool small_rank = fused && B.is_contiguous() && (r == 8 || r == 16);
  parallel_items<5>(int64_t(blocks.size()), [&](int64_t i, Scratch* scratch) {
    const Block& bl = blocks[i];
    const int64_t* order = gr.order.data() + bl.first;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (small_rank && bl.n <= kFusedRows) return small_block(xc, A, B, y, order, bl.n, bl.g, sp[bl.g]);
    }
    const at::Tensor X = gather_rows<acc_t>(xc, order, bl.n, acc_t(1), scratch[0]);
    at::Tensor S = scratch[3].get(cd, bl.n, r);
    at::Tensor E = scratch[4].get(cd, bl.n, out);
    if (fused && bl.n <= kFusedRows) {
      if constexpr (std::is_same_v<acc_t, float>) {
        shrink_small(x.scalar_type(), static_cast<const char*>(A.const_data_ptr()) + bl.g * r * in * x.element_size(),
                     r, in, X.const_data_ptr<float>(), bl.n, S.mutable_data_ptr<float>());
      }
    } else {
      const at::Tensor Ag = as_compute(A.select(0, bl.g), cd, scratch[1]);  // [r, in]
      at::mm_out(S, X, Ag.t());
    }
    const at::Tensor Bg = as_compute(B.select(0, bl.g), cd, scratch[2]);  // [out, r]
    at::mm_out(E, S, Bg.t());
    const acc_t s = acc_t(sp[bl.g]);
    acc_t* e = E.mutable_data_ptr<acc_t>();
    std::vector<acc_t> row(x.scalar_type() != cd ? out : 0);
    for (int64_t r = 0; r < bl.n; ++r) {
      acc_t* er = e + r * out;
      if (x.scalar_type() == cd) {  // y holds the base in the compute type: add in place
        acc_t* yr = y.mutable_data_ptr<acc_t>() + order[r] * out;
        for (int64_t o = 0; o < out; ++o) yr[o] = yr[o] + s * er[o];
      } else {
        load_row(y, order[r], row.data());
        for (int64_t o = 0; o < out; ++o) row[o] = row[o] + s * er[o];
        store_row(y, order[r], row.data());
      }
    }
  });
  return y;
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                             const at::Tensor& A, const at::Tensor& B,
                                                             const at::Tensor& ids, const at::Tensor& scale) {
  const at::ScalarType cd = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t T = x.size(0), in = x.size(1), L = A.size(0), r = A.size(1), out = B.size(1);
  const bool direct = x.scalar_type() == cd;  // gradients computed in the output's dtype: no copy
  at::Tensor grad_x = at::zeros({T, in}, x.options());  // rows without an adapter stay 0
  at::Tensor grad_A = at::empty({L, r, in}, x.options());
  at::Tensor grad_B = at::empty({L, out, r}, x.options());
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  const float* sp = scale.const_data_ptr<float>();
  const Groups gr = group_tokens(ids, L);
  // one item per adapter: its weight gradients sum over all its tokens, in one GEMM each
  parallel_items<8>(L, [&](int64_t g, Scratch* scratch) {
    const int64_t n = gr.size(g);
    at::Tensor gA = grad_A.select(0, g), gB = grad_B.select(0, g);
    if (n == 0) {
      gA.zero_();
      gB.zero_();
      return;
    }
    const int64_t* order = gr.order.data() + gr.begin[g];
    const at::Tensor X = gather_rows<acc_t>(xc, order, n, acc_t(1), scratch[0]);      // [n, in]
    const at::Tensor Gy = gather_rows<acc_t>(gc, order, n, acc_t(sp[g]), scratch[1]);  // s * grad_out rows
    const at::Tensor Ag = as_compute(A.select(0, g), cd, scratch[2]);                  // [r, in]
    const at::Tensor Bg = as_compute(B.select(0, g), cd, scratch[3]);                  // [out, r]
    at::Tensor S = scratch[4].get(cd, n, r);
    at::mm_out(S, X, Ag.t());
    at::Tensor gBc = direct ? gB : scratch[5].get(cd, out, r);
    at::mm_out(gBc, Gy.t(), S);
    if (!direct) gB.copy_(gBc);
    at::Tensor Ga = scratch[4].get(cd, n, r);  // S is no longer needed
    at::mm_out(Ga, Gy, Bg);
    at::Tensor gAc = direct ? gA : scratch[5].get(cd, r, in);
    at::mm_out(gAc, Ga.t(), X);
    if (!direct) gA.copy_(gAc);
    at::Tensor gX = scratch[6].get(cd, n, in);
    at::mm_out(gX, Ga, Ag);
    const acc_t* px = gX.const_data_ptr<acc_t>();
    for (int64_t i = 0; i < n; ++i) store_row(grad_x, order[i], px + i * in);
  });
  return {grad_x, grad_A, grad_B};
}

void check_lora(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& ids,
                const at::Tensor& scale) {
  check_cpu(x, "x");
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be [T, in], got ", x.sizes());
  check_like(A, "A", x);
  check_like(B, "B", x);
  TORCH_CHECK(A.dim() == 3 && A.size(2) == x.size(1), "A must be [L, r, in=", x.size(1), "], got ", A.sizes());
  TORCH_CHECK(B.dim() == 3 && B.size(0) == A.size(0) && B.size(2) == A.size(1), "B must be [L=", A.size(0),
              ", out, r=", A.size(1), "], got ", B.sizes());
  check_cpu(ids, "adapter_ids");
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, "adapter_ids must be int32 or int64");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == x.size(0), "adapter_ids must be [T=", x.size(0), "], got ",
              ids.sizes());
  check_cpu(scale, "scale");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == A.size(0),
              "scale must be float32 [L=", A.size(0), "]");
}

}  // namespace

namespace lowrank {

at::Tensor multi_lora_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& adapter_ids,
                          const at::Tensor& scale, const OptTensor& base) {
  check_lora(x, A, B, adapter_ids, scale);
  if (base) {
    check_like(*base, "base", x);
    TORCH_CHECK(base->dim() == 2 && base->size(0) == x.size(0) && base->size(1) == B.size(1), "base must be [T=",
                x.size(0), ", out=", B.size(1), "], got ", base->sizes());
  }
  const BelowAutograd below_autograd;
  const at::Tensor sc = scale.detach().contiguous();
  const OptTensor bd = base ? OptTensor(base->detach()) : std::nullopt;
  if (x.scalar_type() == at::kDouble) {
    return lora_forward<double>(x.detach(), A.detach(), B.detach(), adapter_ids, sc, bd);
  }
  return lora_forward<float>(x.detach(), A.detach(), B.detach(), adapter_ids, sc, bd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_lora_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                       const at::Tensor& A, const at::Tensor& B,
                                                                       const at::Tensor& adapter_ids,
                                                                       const at::Tensor& scale) {
  check_lora(x, A, B, adapter_ids, scale);
  check_like(grad_out, "grad_out", x);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == B.size(1),
              "grad_out must be [T=", x.size(0), ", out=", B.size(1), "], got ", grad_out.sizes());
  const BelowAutograd below_autograd;
  const at::Tensor sc = scale.detach().contiguous();
  if (x.scalar_type() == at::kDouble) {
    return lora_backward<double>(grad_out.detach(), x.detach(), A.detach(), B.detach(), adapter_ids, sc);
  }
  return lora_backward<float>(grad_out.detach(), x.detach(), A.detach(), B.detach(), adapter_ids, sc);
}

}  // namespace lowrank
}  // namespace mtmerge
