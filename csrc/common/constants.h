// Numeric constants shared by every backend: the C++ mirror of mtmerge/_constants.py, name for
// name (NAME -> kName). tests/test_constants.py parses this file, so keep one plain
// `constexpr <type> kName = <integer literal or simple expression>;` per line.
#pragma once

#include <cstdint>
#include <limits>

namespace mtmerge::constants {

// ---- magnitude keys: the bit pattern of |x| in float32 orders like |x| ----------------------
constexpr int64_t kInt64Max = 9223372036854775807;  // tie cutoff keeping every tie; a flat index bound
constexpr uint32_t kF32InfKey = 0x7F800000;  // key of +inf; a key above it is a NaN

// ---- DARE's counter-based RNG (mtmerge/_rng.py) ----------------------------------------------
constexpr uint32_t kDareKeepOne = 1u << 24;  // keep threshold keeping everything (the hash has 24 bits)
constexpr uint32_t kDareHighWordSalt = 0x68E31DA4;  // mixed in with the high 32 bits of the flat index

// ---- merge_fused / elect_sign_total / dare_abs_sums argument layouts --------------------------
// task_trim: int64 [T, kTrimColumns]
constexpr int64_t kTrimThresholdKey = 0;
constexpr int64_t kTrimTieCutoff = 1;
constexpr int64_t kTrimDareKey = 2;
constexpr int64_t kTrimDareKeep = 3;
constexpr int64_t kTrimColumns = 4;
// task_scalars: float32 [T, kScalarColumns]
constexpr int64_t kScalarWeight = 0;
constexpr int64_t kScalarScale = 1;
constexpr int64_t kScalarColumns = 2;
// merge_scalars: float32 [kOutColumns]
constexpr int64_t kOutLam = 0;
constexpr int64_t kOutZeroFill = 1;
constexpr int64_t kOutColumns = 2;
// rule: int[kRuleLength]
constexpr int64_t kRuleElect = 0;
constexpr int64_t kRuleElectWeighted = 1;
constexpr int64_t kRuleMerge = 2;
constexpr int64_t kRuleDivisor = 3;
constexpr int64_t kRuleWithBase = 4;
constexpr int64_t kRuleCheckFinite = 5;
constexpr int64_t kRuleLength = 6;
constexpr int64_t kElectNone = 0;
constexpr int64_t kElectSum = 1;
constexpr int64_t kElectCount = 2;
constexpr int64_t kMergeMean = 0;
constexpr int64_t kMergeSum = 1;
constexpr int64_t kMergeMax = 2;
constexpr int64_t kDivisorCount = 0;
constexpr int64_t kDivisorWeight = 1;

// MoE: gpt-oss's clamped GLU (the "gpt_oss" activation)
constexpr double kGptOssLimit = 7.0;
constexpr double kGptOssAlpha = 1.702;

static_assert(kInt64Max == std::numeric_limits<int64_t>::max());

}  // namespace mtmerge::constants
