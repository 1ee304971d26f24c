// DARE's counter-based RNG, the per-entry half (mtmerge/_rng.py has the whole definition):
//   keep(i) = hash(i, key) < keep_threshold,
//   hash(i, key) = fmix32(fmix32(lo32(i) ^ key) ^ hi32(i) ^ kDareHighWordSalt) >> 8,
// i the flat index (index_offset + position). The per-task key and keep threshold are computed
// on the host and arrive in task_trim, so every backend and tiling draws the same mask.
#pragma once

#include <cstdint>

#include "common/constants.h"
#include "common/simd.h"

namespace mtmerge {
namespace {

// MurmurHash3's 32-bit finalizer: a bijection with full avalanche.
MTMERGE_ALWAYS_INLINE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  return h ^ (h >> 16);
}

// keep[i] &= hash(start + i, task_key) < keep_below, for i in [0, len).
MTMERGE_CLONES void dare_filter(int64_t start, int64_t len, uint32_t task_key, uint32_t keep_below,
                                uint32_t* __restrict keep) {
  const uint64_t first = uint64_t(start), last = uint64_t(start + len - 1);
  if ((first >> 32) == (last >> 32)) {  // one high word for the whole block: a 32-bit loop
    const uint32_t lo = uint32_t(first), hi_salt = uint32_t(first >> 32) ^ constants::kDareHighWordSalt;
    for (int64_t i = 0; i < len; ++i) {
      const uint32_t h = fmix32(fmix32((lo + uint32_t(i)) ^ task_key) ^ hi_salt);
      keep[i] &= uint32_t((h >> 8) < keep_below);
    }
    return;
  }
  for (int64_t i = 0; i < len; ++i) {
    const uint64_t index = uint64_t(start + i);
    uint32_t h = fmix32(uint32_t(index) ^ task_key);
    h = fmix32(h ^ uint32_t(index >> 32) ^ constants::kDareHighWordSalt);
    keep[i] &= uint32_t((h >> 8) < keep_below);
  }
}

}  // namespace
}  // namespace mtmerge
