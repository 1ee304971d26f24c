// TALL masks and Consensus: CPU kernels for
//   mtmerge::tall_masks, consensus_mask
// Semantics: mtmerge/reference/merge.py. Schemas: mtmerge/ops/_merge_ops.py.
// Masks are bit-packed: uint8, bit i of byte j is flat index 8j+i (numpy bitorder="little").
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>

#include "common/dtype_io.h"
#include "merge/ops.h"
#include "merge/task_inputs.h"

namespace mtmerge {
namespace {

// bits[i] = |tau_i| > lam * |merged_i - tau_i|, in float32.
MTMERGE_CLONES void tall_bits(const float* d, const float* m, int64_t len, float lam, uint8_t* bits) {
  for (int64_t i = 0; i < len; ++i) bits[i] = uint8_t(std::fabs(d[i]) > lam * std::fabs(m[i] - d[i]));
}

}  // namespace

namespace merge {

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
  TORCH_CHECK_TYPE(masks.scalar_type() == at::kByte, "masks must be uint8, got ", masks.scalar_type());
  TORCH_CHECK_VALUE(masks.dim() == 2, "masks must be uint8 [T, nbytes], got shape ", masks.sizes());
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

}  // namespace merge
}  // namespace mtmerge
