// The Python module `mtmerge._C`: build facts for `mtmerge info`, and the merge selection's
// path counters and window ISA (merge/select_stats.h) for tests.
//
// The ops themselves are registered with the dispatcher by TORCH_LIBRARY_IMPL blocks in
// each family's bindings.cpp (e.g. csrc/merge/bindings.cpp); importing this module loads them.
#include <pybind11/pybind11.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/simd.h"
#include "merge/select_stats.h"

namespace py = pybind11;

#ifdef MTMERGE_WITH_CUDA
#include <torch/extension.h>  // at::Tensor <-> Python, for moe_align_cuda only (CUDA builds)

namespace mtmerge {
std::string cuda_build_summary();  // csrc/cuda/cuda_info.cu
}
namespace mtmerge::moe {
// csrc/moe/align_cuda.cpp: the CUDA C++ moe_align (csrc/cuda/moe_align.cu); kernels/moe uses it when present
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cuda(const at::Tensor& ids, int64_t num_experts,
                                                               int64_t capacity);
}
#endif

namespace {

std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

py::dict cpu_features() {
  py::dict features;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  features["sse4.2"] = static_cast<bool>(__builtin_cpu_supports("sse4.2"));
  features["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  features["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
  features["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  features["avx512bw"] = static_cast<bool>(__builtin_cpu_supports("avx512bw"));
#elif defined(__aarch64__)
  features["neon"] = true;
#endif
  return features;
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = compiler_name();
#ifdef MTMERGE_CXX_FLAGS
  info["cxx_flags"] = MTMERGE_CXX_FLAGS;
#else
  info["cxx_flags"] = "";
#endif
  info["cplusplus"] = static_cast<long>(__cplusplus);
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = static_cast<int>(_OPENMP);
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_version"] = 0;
  info["openmp_max_threads"] = 1;
#endif
#if MTMERGE_HAS_CLONES
  info["multiversioned_isas"] = py::make_tuple("default", "avx2", "avx512f");
#else
  info["multiversioned_isas"] = py::make_tuple("default");
#endif
  info["cpu_features"] = cpu_features();
#ifdef MTMERGE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_summary"] = mtmerge::cuda_build_summary();
#else
  info["cuda"] = false;
#endif
  return info;
}

py::dict selection_stats() {
  const mtmerge::merge::SelectionStats& s = mtmerge::merge::selection_stats;
  py::dict stats;
  stats["window_hits"] = s.window_hits.load();
  stats["bracket_misses"] = s.bracket_misses.load();
  stats["window_overflows"] = s.window_overflows.load();
  stats["single_key_brackets"] = s.single_key_brackets.load();
  stats["traced_cutoffs"] = s.traced_cutoffs.load();
  return stats;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mtmerge compiled kernels; ops are reached through torch.ops.mtmerge";
  m.def("build_info", &build_info, "Compiler, flags, OpenMP and CPU features of this build.");
  m.def("selection_stats", &selection_stats, "Counts of the merge selection's paths since the last reset.");
  m.def("reset_selection_stats", [] { mtmerge::merge::selection_stats.reset(); }, "Zero the selection counters.");
  m.def("window_isa", [] { return std::string(mtmerge::merge::window_isa_name()); },
        "The window pass in use: avx512f, avx2 or default (capped by MTMERGE_MAX_ISA).");
#ifdef MTMERGE_WITH_CUDA
  m.def("moe_align_cuda", &mtmerge::moe::moe_align_cuda, "moe_align on CUDA tensors (csrc/cuda/moe_align.cu)",
        py::arg("ids"), py::arg("num_experts"), py::arg("capacity"));
#endif
}
