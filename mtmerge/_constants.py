"""Numeric constants shared by every backend of every op family.

Mirrored, name for name (``NAME`` -> ``kName`` in CamelCase), in ``csrc/common/constants.h``;
``tests/test_constants.py`` checks that the two agree. The Triton kernels and the PyTorch
reference import them from here; the kernels never import the reference.
"""

from __future__ import annotations

# ---- magnitude keys: the int bit pattern of |x| in float32 orders like |x| -------------------
INT64_MAX = 2**63 - 1  # a tie cutoff that keeps every tie (the "geq" rule); a flat index bound
F32_INF_KEY = 0x7F800000  # key of +inf; a key above it is a NaN

# ---- DARE's counter-based RNG (see mtmerge/_rng.py) ------------------------------------------
DARE_KEEP_ONE = 1 << 24  # keep threshold that keeps every entry: the hash is 24 bits
DARE_HIGH_WORD_SALT = 0x68E31DA4  # mixed into the hash with the high 32 bits of the flat index

# ---- merge_fused / elect_sign_total / dare_abs_sums argument layouts --------------------------
# task_trim: int64 [T, 4], one row per task
TRIM_THRESHOLD_KEY = 0  # magnitude key of the trim threshold: keep key > it ...
TRIM_TIE_CUTOFF = 1  # ... and key == it at flat index <= this (-1: no tie; INT64_MAX: all)
TRIM_DARE_KEY = 2  # DARE's 32-bit stream key of the task (mtmerge._rng.dare_task_key)
TRIM_DARE_KEEP = 3  # DARE keeps an entry whose 24-bit hash is below this (DARE_KEEP_ONE: no DARE)
TRIM_COLUMNS = 4
# task_scalars: float32 [T, 2]
SCALAR_WEIGHT = 0  # w_t
SCALAR_SCALE = 1  # rescale of the kept entries (DARE: 1/d or the L1 ratio; else 1)
SCALAR_COLUMNS = 2
# merge_scalars: float32 [2]
OUT_LAM = 0  # output = base + lam * merged
OUT_ZERO_FILL = 1  # the elected sign where the elected sum is 0: +1, -1 or 0
OUT_COLUMNS = 2
# rule: int[6]
RULE_ELECT = 0  # ELECT_*
RULE_ELECT_WEIGHTED = 1  # 0/1: elect over w_t * tau_hat_t
RULE_MERGE = 2  # MERGE_*
RULE_DIVISOR = 3  # DIVISOR_*
RULE_WITH_BASE = 4  # 0/1: add base to the output
RULE_CHECK_FINITE = 5  # 0/1: raise on NaN/Inf inputs before writing anything
RULE_LENGTH = 6
ELECT_NONE = 0  # a linear merge: sum_t w_t tau_hat_t (needs MERGE_SUM)
ELECT_SUM = 1
ELECT_COUNT = 2
MERGE_MEAN = 0
MERGE_SUM = 1
MERGE_MAX = 2
DIVISOR_COUNT = 0
DIVISOR_WEIGHT = 1

# ---- MoE ---------------------------------------------------------------------------------------
# gpt-oss's clamped GLU (the "gpt_oss" activation): gate = min(gate, LIMIT),
# up = clamp(up, -LIMIT, LIMIT), a = (up + 1) * gate * sigmoid(ALPHA * gate)
GPT_OSS_LIMIT = 7.0
GPT_OSS_ALPHA = 1.702
