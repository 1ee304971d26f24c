// The merge family's only CPU registration: every op's C++ kernel (declared in ops.h).
// The schemas are defined in Python (mtmerge/ops/_merge_ops.py) before mtmerge._C is loaded.
#include <torch/library.h>

#include "merge/ops.h"

TORCH_LIBRARY_IMPL(mtmerge, CPU, m) {
  using namespace mtmerge::merge;
  m.impl("magnitude_threshold", &magnitude_threshold_cpu);
  m.impl("threshold_mask", &threshold_mask_cpu);
  m.impl("delta_threshold", &delta_threshold_cpu);
  m.impl("tie_cutoffs", &tie_cutoffs_cpu);
  m.impl("magnitude_histogram", &magnitude_histogram_cpu);
  m.impl("dare_abs_sums", &dare_abs_sums_cpu);
  m.impl("elect_sign_total", &elect_sign_total_cpu);
  m.impl("merge_fused", &merge_fused_cpu);
  m.impl("task_arithmetic", &task_arithmetic_cpu);
  m.impl("tall_masks", &tall_masks_cpu);
  m.impl("consensus_mask", &consensus_mask_cpu);
}
