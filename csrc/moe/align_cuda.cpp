// moe_align on CUDA tensors: the torch wrapper around the plain-CUDA launcher of
// csrc/cuda/moe_align.cu. Compiled only into CUDA builds (setup.py defines MTMERGE_WITH_CUDA);
// exposed as mtmerge._C.moe_align_cuda, which the Triton launcher of kernels/moe/align.py
// prefers on CUDA tensors. Nothing is read back to the host: outputs have static sizes.
#ifdef MTMERGE_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <tuple>

namespace mtmerge {
namespace moe {

// csrc/cuda/moe_align.cu
int64_t moe_align_workspace_size(int64_t n, int64_t num_experts);
cudaError_t moe_align_launch(const void* ids, bool ids_int64, int64_t n, int64_t num_experts, int64_t capacity,
                             int64_t* sorted_slots, int64_t* expert_offsets, int64_t* dropped, int64_t* workspace,
                             cudaStream_t stream);

// ids [T, k] int32/int64 on a CUDA device -> (sorted_slots [T*k], expert_offsets [E+1], dropped []), int64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_cuda(const at::Tensor& ids, int64_t num_experts,
                                                               int64_t capacity) {
  TORCH_CHECK(ids.is_cuda(), "moe_align_cuda: ids must be a CUDA tensor");
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "moe_align_cuda: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(num_experts >= 0, "moe_align_cuda: num_experts must be >= 0, got ", num_experts);
  TORCH_CHECK(capacity >= -1, "moe_align_cuda: capacity must be -1 (unlimited) or >= 0, got ", capacity);
  const c10::cuda::CUDAGuard guard(ids.device());
  const at::Tensor flat = ids.contiguous();
  const int64_t n = flat.numel();
  const auto options = flat.options().dtype(at::kLong);
  at::Tensor sorted_slots = at::empty({n}, options);
  at::Tensor offsets = at::empty({num_experts + 1}, options);
  at::Tensor dropped = at::empty({}, options);
  at::Tensor workspace = at::empty({moe_align_workspace_size(n, num_experts)}, options);
  const cudaError_t err = moe_align_launch(flat.data_ptr(), flat.scalar_type() == at::kLong, n, num_experts, capacity,
                                           sorted_slots.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                           dropped.data_ptr<int64_t>(), workspace.data_ptr<int64_t>(),
                                           c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "moe_align_cuda: ", cudaGetErrorString(err));
  return {sorted_slots, offsets, dropped};
}

}  // namespace moe
}  // namespace mtmerge

#endif  // MTMERGE_WITH_CUDA
