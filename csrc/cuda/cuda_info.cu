// CUDA build facts for `mtmerge info`, compiled only into CUDA builds of mtmerge._C.
//
// The GPU kernels of mtmerge are Triton (kernels/); this folder holds the CUDA C++ pieces
// where Triton is the wrong tool. CI compile-checks every file here with nvcc, with or
// without a GPU.
#include <cuda_runtime.h>

#include <string>

namespace mtmerge {

// "runtime X.Y, driver X.Y, archs sm_..": what this build was compiled for and runs on.
std::string cuda_build_summary() {
  int runtime = 0;
  int driver = 0;
  cudaRuntimeGetVersion(&runtime);
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  std::string summary = "runtime " + std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10);
  summary += driver ? ", driver " + std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10)
                    : std::string(", no driver");
#ifdef __CUDA_ARCH_LIST__
#define MTMERGE_STR2(x) #x
#define MTMERGE_STR(x) MTMERGE_STR2(x)
  summary += ", archs " MTMERGE_STR(__CUDA_ARCH_LIST__);
#endif
  return summary;
}

}  // namespace mtmerge
