// moe_align on CUDA: the stable counting sort of the routed slots by expert (DESIGN.md, "MoE
// semantics"; the same algorithm as the Triton kernel of kernels/moe/align.py).
//
// Plain CUDA, no torch headers: kernels plus a host launcher on raw pointers and a stream
// (csrc/moe/align_cuda.cpp wraps it for torch). Slot s = t * k + j of the flat ids; an id outside
// [0, E) is "not routed". Three kernels, deterministic (the only atomics are integer counts
// into a histogram, where order cannot matter):
//   1. count:   counts[b][e] = slots of block b (kSlotsPerBlock slots) routed to expert e
//   2. scan:    one CTA: prefix[b][e] (expert e's slots in blocks before b), the kept counts
//               under the capacity, expert_offsets, kept_before[b] (kept slots before block b),
//               dropped
//   3. scatter: per slot, its rank among its expert's slots (prefix + rank inside the block):
//               kept slots go to offsets[e] + rank, all others after offsets[E] in slot order.
#include <cuda_runtime.h>

#include <cstdint>

namespace mtmerge {
namespace moe {
namespace {

constexpr int kSlotsPerBlock = 256;      // one thread per slot in count / scatter
constexpr int kScanThreads = 1024;       // the single CTA of the scan kernel
constexpr int64_t kSharedExperts = 8192;  // up to this many experts, the histogram lives in shared memory

template <typename Id>
__device__ __forceinline__ int64_t expert_of(const Id* ids, int64_t s, int64_t n, int64_t num_experts) {
  if (s >= n) return -1;
  const int64_t e = static_cast<int64_t>(ids[s]);
  return (e >= 0 && e < num_experts) ? e : -1;
}

template <typename Id>
__global__ void count_kernel(const Id* ids, int64_t n, int64_t num_experts, int64_t* counts) {
  extern __shared__ int hist[];
  const bool shared = num_experts <= kSharedExperts;
  int64_t* row = counts + static_cast<int64_t>(blockIdx.x) * num_experts;
  if (shared) {
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) hist[e] = 0;
    __syncthreads();
  }
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kSlotsPerBlock + threadIdx.x;
  const int64_t e = expert_of(ids, s, n, num_experts);
  if (e >= 0) {
    // integer counts: the result does not depend on the order of the atomics
    if (shared) {
      atomicAdd(&hist[e], 1);
    } else {
      atomicAdd(reinterpret_cast<unsigned long long*>(row + e), 1ULL);  // row zeroed by the launcher
    }
  }
  if (shared) {
    __syncthreads();
    for (int64_t x = threadIdx.x; x < num_experts; x += blockDim.x) row[x] = hist[x];
  }
}

// In-place inclusive scan of data[0, len) by the whole CTA (chunks of blockDim.x with a carry).
__device__ void cta_inclusive_scan(int64_t* data, int64_t len, int64_t* buf) {
  int64_t carry = 0;
  for (int64_t base = 0; base < len; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    buf[threadIdx.x] = i < len ? data[i] : 0;
    __syncthreads();
    for (unsigned off = 1; off < blockDim.x; off <<= 1) {
      const int64_t add = threadIdx.x >= off ? buf[threadIdx.x - off] : 0;
      __syncthreads();
      buf[threadIdx.x] += add;
      __syncthreads();
    }
    if (i < len) data[i] = buf[threadIdx.x] + carry;
    carry += buf[blockDim.x - 1];
    __syncthreads();
  }
  __syncthreads();
}

__global__ void scan_kernel(const int64_t* counts, int64_t blocks, int64_t num_experts, int64_t capacity,
                            int64_t* prefix, int64_t* offsets, int64_t* kept_before, int64_t* dropped) {
  __shared__ int64_t buf[kScanThreads];
  // per expert, serially over the blocks: prefix[b][e], and its kept count into offsets[e + 1]
  int64_t routed = 0;
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int64_t run = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      prefix[b * num_experts + e] = run;
      run += counts[b * num_experts + e];
    }
    routed += run;
    offsets[e + 1] = capacity < 0 ? run : (run < capacity ? run : capacity);
  }
  __syncthreads();  // prefix complete
  // kept slots per block into kept_before[b + 1]
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) {
    int64_t kept = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t c = counts[b * num_experts + e];
      if (capacity < 0) {
        kept += c;
      } else {
        const int64_t room = capacity - prefix[b * num_experts + e];
        kept += room <= 0 ? 0 : (room < c ? room : c);
      }
    }
    kept_before[b + 1] = kept;
  }
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    kept_before[0] = 0;
  }
  // total routed slots: a fixed-shape tree over the threads (integers: exact anyway)
  buf[threadIdx.x] = routed;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) buf[threadIdx.x] += buf[threadIdx.x + half];
    __syncthreads();
  }
  const int64_t total_routed = buf[0];
  __syncthreads();
  cta_inclusive_scan(offsets + 1, num_experts, buf);
  cta_inclusive_scan(kept_before + 1, blocks, buf);
  if (threadIdx.x == 0) *dropped = total_routed - offsets[num_experts];
}

template <typename Id>
__global__ void scatter_kernel(const Id* ids, int64_t n, int64_t num_experts, int64_t capacity, const int64_t* prefix,
                               const int64_t* offsets, const int64_t* kept_before, int64_t* sorted_slots) {
  __shared__ int64_t experts[kSlotsPerBlock];
  __shared__ int64_t scan[kSlotsPerBlock];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t s = b * kSlotsPerBlock + tid;
  const int64_t e = expert_of(ids, s, n, num_experts);
  experts[tid] = e;
  __syncthreads();
  // rank inside the block among the slots of the same expert (broadcast reads of shared memory)
  int64_t rank = 0;
  if (e >= 0) {
    for (int j = 0; j < tid; ++j) rank += experts[j] == e;
    rank += prefix[b * num_experts + e];
  }
  const bool kept = e >= 0 && (capacity < 0 || rank < capacity);
  // exclusive scan of the kept flags over the block
  scan[tid] = kept ? 1 : 0;
  __syncthreads();
  for (int off = 1; off < kSlotsPerBlock; off <<= 1) {
    const int64_t add = tid >= off ? scan[tid - off] : 0;
    __syncthreads();
    scan[tid] += add;
    __syncthreads();
  }
  const int64_t kept_excl = scan[tid] - (kept ? 1 : 0);
  if (s < n) {
    const int64_t pos = kept ? offsets[e] + rank : offsets[num_experts] + s - (kept_before[b] + kept_excl);
    sorted_slots[pos] = s;
  }
}

template <typename Id>
cudaError_t launch(const Id* ids, int64_t n, int64_t num_experts, int64_t capacity, int64_t* sorted_slots,
                   int64_t* offsets, int64_t* dropped, int64_t* workspace, cudaStream_t stream) {
  if (n == 0) {
    cudaError_t err = cudaMemsetAsync(offsets, 0, sizeof(int64_t) * (num_experts + 1), stream);
    if (err != cudaSuccess) return err;
    return cudaMemsetAsync(dropped, 0, sizeof(int64_t), stream);
  }
  const int64_t blocks = (n + kSlotsPerBlock - 1) / kSlotsPerBlock;
  int64_t* counts = workspace;
  int64_t* prefix = counts + blocks * num_experts;
  int64_t* kept_before = prefix + blocks * num_experts;
  const bool shared = num_experts <= kSharedExperts;
  if (!shared) {
    cudaError_t err = cudaMemsetAsync(counts, 0, sizeof(int64_t) * blocks * num_experts, stream);
    if (err != cudaSuccess) return err;
  }
  const size_t smem = shared ? sizeof(int) * static_cast<size_t>(num_experts) : 0;
  count_kernel<Id><<<static_cast<unsigned>(blocks), kSlotsPerBlock, smem, stream>>>(ids, n, num_experts, counts);
  scan_kernel<<<1, kScanThreads, 0, stream>>>(counts, blocks, num_experts, capacity, prefix, offsets, kept_before,
                                              dropped);
  scatter_kernel<Id><<<static_cast<unsigned>(blocks), kSlotsPerBlock, 0, stream>>>(
      ids, n, num_experts, capacity, prefix, offsets, kept_before, sorted_slots);
  return cudaGetLastError();
}

}  // namespace

// int64 elements of scratch moe_align_launch needs for n slots and num_experts experts.
int64_t moe_align_workspace_size(int64_t n, int64_t num_experts) {
  const int64_t blocks = (n + kSlotsPerBlock - 1) / kSlotsPerBlock;
  return 2 * blocks * num_experts + blocks + 1;
}

// The stable counting sort of the n = T * k slots of `ids` (int32 or int64 per ids_int64) by
// expert: sorted_slots [n], expert_offsets [num_experts + 1], dropped [1], all int64 on the
// device; capacity -1 keeps every routed slot. workspace: moe_align_workspace_size(...) int64.
// Queued on `stream`; returns the launch error, if any.
cudaError_t moe_align_launch(const void* ids, bool ids_int64, int64_t n, int64_t num_experts, int64_t capacity,
                             int64_t* sorted_slots, int64_t* expert_offsets, int64_t* dropped, int64_t* workspace,
                             cudaStream_t stream) {
  if (ids_int64) {
    return launch(static_cast<const int64_t*>(ids), n, num_experts, capacity, sorted_slots, expert_offsets, dropped,
                  workspace, stream);
  }
  return launch(static_cast<const int32_t*>(ids), n, num_experts, capacity, sorted_slots, expert_offsets, dropped,
                workspace, stream);
}

}  // namespace moe
}  // namespace mtmerge
