// Exact top-k selection by magnitude: CPU kernels for
//   mtmerge::magnitude_threshold(Tensor[] xs, int k, str selection) -> (Tensor, Tensor)
//   mtmerge::threshold_mask(Tensor[] xs, Tensor threshold, Tensor ties_kept, str selection,
//                           bool packed) -> Tensor[]
// Semantics: mtmerge/reference/merge.py. Schemas: mtmerge/ops/_merge_ops.py.
//
// The selection machinery (radix passes, sampled window fast path) is in select.h.
#include "merge/select.h"

#include "merge/ops.h"

namespace mtmerge {
namespace {

// ---------------------------------------------------------------------------------------
// Op: magnitude_threshold
// ---------------------------------------------------------------------------------------

enum class Selection { kExact, kGeq };

Selection parse_selection(std::string_view selection) {
  if (selection == "exact") return Selection::kExact;
  if (selection == "geq") return Selection::kGeq;
  TORCH_CHECK_VALUE(false, "selection must be 'exact' or 'geq', got '", std::string(selection), "'");
  return Selection::kExact;  // unreachable
}

std::vector<at::Tensor> contiguous_inputs(at::TensorList xs) {
  TORCH_CHECK_VALUE(!xs.empty(), "x must hold at least one tensor");
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const auto& x : xs) {
    TORCH_CHECK_TYPE(x.scalar_type() == xs[0].scalar_type(), "x: all tensors must share one dtype, got ",
                     xs[0].scalar_type(), " and ", x.scalar_type());
    TORCH_CHECK_VALUE(x.device().is_cpu(), "x: the CPU kernel needs CPU tensors, got ", x.device());
    out.push_back(x.contiguous());
  }
  return out;
}

template <typename K>
KeySegments<K> segments_of(const std::vector<at::Tensor>& xs) {
  KeySegments<K> segs;
  segs.offsets.push_back(0);
  for (const auto& x : xs) {
    segs.data.push_back(static_cast<const K*>(x.const_data_ptr()));
    segs.offsets.push_back(segs.offsets.back() + x.numel());
  }
  return segs;
}

template <typename K>
void store_key(at::Tensor& t, uint32_t key) {
  K value = K(key);
  std::memcpy(t.mutable_data_ptr(), &value, sizeof(K));
}

template <typename K, typename Loops>
std::tuple<at::Tensor, at::Tensor> magnitude_threshold_impl(const std::vector<at::Tensor>& xs,
                                                            int64_t k, Selection selection) {
  const KeyFormat fmt = key_format(xs[0].scalar_type());
  const KeySegments<K> segs = segments_of<K>(xs);
  const int64_t n = segs.total();
  TORCH_CHECK_VALUE(k >= 0 && k <= n, "k must be in [0, ", n, "] (the number of entries), got ", k);

  at::Tensor threshold = at::empty({}, xs[0].options());
  at::Tensor ties_kept = at::empty({}, xs[0].options().dtype(at::kLong));
  uint32_t key = fmt.inf_key;
  int64_t ties = 0;
  if (selection == Selection::kExact) {
    if (k > 0) {
      const Selected s = select_rank<K, Loops>(segs, fmt, k);
      key = s.key;
      ties = k - s.greater;
    } else {
      check_no_nan<K>(segs, fmt);  // nothing is selected, but NaN is still rejected
    }
  } else if (n > 0) {
    // Keep |x| >= the (n-k)-th smallest = the (k+1)-th largest; k = n keeps everything,
    // which the smallest |x| (the n-th largest) does.
    const Selected s = select_rank<K, Loops>(segs, fmt, std::min(k + 1, n));
    key = s.key;
    ties = s.equal;
  }
  store_key<K>(threshold, key);
  *ties_kept.mutable_data_ptr<int64_t>() = ties;
  return {threshold, ties_kept};
}

}  // namespace

namespace merge {

std::tuple<at::Tensor, at::Tensor> magnitude_threshold_cpu(at::TensorList xs, int64_t k,
                                                           c10::string_view selection) {
  const Selection sel = parse_selection(selection);
  const std::vector<at::Tensor> inputs = contiguous_inputs(xs);
  if (inputs[0].scalar_type() == at::kFloat) return magnitude_threshold_impl<uint32_t, Loops32>(inputs, k, sel);
  key_format(inputs[0].scalar_type());  // rejects unsupported dtypes with a TypeError
  return magnitude_threshold_impl<uint16_t, Loops16>(inputs, k, sel);
}

}  // namespace merge

// ---------------------------------------------------------------------------------------
// Op: threshold_mask
// ---------------------------------------------------------------------------------------

namespace {

// A block never spans two tensors and starts at a multiple of 8 inside its tensor, so
// packed blocks own whole bytes.
struct Block {
  int64_t tensor;
  int64_t start;
  int64_t len;
};

constexpr int64_t kBlock = int64_t(1) << 16;

template <typename K, typename Loops>
std::vector<at::Tensor> threshold_mask_impl(const std::vector<at::Tensor>& xs, at::TensorList originals,
                                            const at::Tensor& threshold, int64_t ties_kept,
                                            Selection selection, bool packed) {
  const KeyFormat fmt = key_format(xs[0].scalar_type());
  K t_bits;
  std::memcpy(&t_bits, threshold.const_data_ptr(), sizeof(K));
  const uint32_t t = uint32_t(t_bits) & fmt.abs_mask;
  const bool geq = selection == Selection::kGeq;

  std::vector<at::Tensor> masks;
  std::vector<Block> blocks;
  for (size_t i = 0; i < xs.size(); ++i) {
    const int64_t n = xs[i].numel();
    masks.push_back(packed ? at::empty({(n + 7) / 8}, xs[i].options().dtype(at::kByte))
                           : at::empty(originals[i].sizes(), xs[i].options().dtype(at::kBool)));
    for (int64_t s = 0; s < n; s += kBlock) blocks.push_back({int64_t(i), s, std::min(kBlock, n - s)});
  }
  const int64_t nblocks = int64_t(blocks.size());
  auto keys_of = [&](const Block& b) { return static_cast<const K*>(xs[b.tensor].const_data_ptr()) + b.start; };

  // One parallel pass writes |x| > t (or >= t) and counts the ties per block. "exact" then
  // keeps ties in flat order until ties_kept of them are: an exclusive scan of the counts
  // tells each block how many ties precede it, and only blocks with budget left are patched.
  std::vector<int64_t> equal(nblocks, 0);
  at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const Block& b = blocks[j];
      equal[j] = packed ? Loops::compare_packed(keys_of(b), b.len, fmt.abs_mask, t, geq,
                                                masks[b.tensor].mutable_data_ptr<uint8_t>() + b.start / 8)
                        : Loops::compare(keys_of(b), b.len, fmt.abs_mask, t, geq,
                                         masks[b.tensor].mutable_data_ptr<bool>() + b.start);
    }
  });
  if (geq || ties_kept == 0) return masks;

  std::vector<int64_t> ties_before(nblocks, 0);
  for (int64_t j = 1; j < nblocks; ++j) ties_before[j] = ties_before[j - 1] + equal[j - 1];
  at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      const Block& b = blocks[j];
      int64_t budget = std::min(ties_kept - ties_before[j], equal[j]);
      const K* keys = keys_of(b);
      for (int64_t i = 0; i < b.len && budget > 0; ++i) {
        if ((uint32_t(keys[i]) & fmt.abs_mask) != t) continue;
        if (packed) {
          masks[b.tensor].mutable_data_ptr<uint8_t>()[(b.start + i) / 8] |= uint8_t(1u << ((b.start + i) % 8));
        } else {
          masks[b.tensor].mutable_data_ptr<bool>()[b.start + i] = true;
        }
        --budget;
      }
    }
  });
  return masks;
}

}  // namespace

namespace merge {

std::vector<at::Tensor> threshold_mask_cpu(at::TensorList xs, const at::Tensor& threshold,
                                           const at::Tensor& ties_kept, c10::string_view selection,
                                           bool packed) {
  const Selection sel = parse_selection(selection);
  const std::vector<at::Tensor> inputs = contiguous_inputs(xs);
  TORCH_CHECK_TYPE(threshold.scalar_type() == inputs[0].scalar_type(), "threshold must have x's dtype ",
                   inputs[0].scalar_type(), ", got ", threshold.scalar_type());
  TORCH_CHECK_VALUE(threshold.numel() == 1, "threshold must be a one-element tensor, got ", threshold.numel(),
                    " elements");
  TORCH_CHECK_TYPE(ties_kept.scalar_type() == at::kLong, "ties_kept must be int64, got ", ties_kept.scalar_type());
  TORCH_CHECK_VALUE(ties_kept.numel() == 1, "ties_kept must be a one-element tensor, got ", ties_kept.numel(),
                    " elements");
  const at::Tensor t = threshold.cpu();
  const int64_t ties = ties_kept.cpu().item<int64_t>();
  TORCH_CHECK_VALUE(ties >= 0, "ties_kept must be >= 0, got ", ties);
  if (inputs[0].scalar_type() == at::kFloat) return threshold_mask_impl<uint32_t, Loops32>(inputs, xs, t, ties, sel, packed);
  key_format(inputs[0].scalar_type());
  return threshold_mask_impl<uint16_t, Loops16>(inputs, xs, t, ties, sel, packed);
}

}  // namespace merge
}  // namespace mtmerge
