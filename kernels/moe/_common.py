"""Shared pieces of the MoE family's Triton kernels: block sizes, autotune configs, the grouped
tile schedule, activations (and their derivatives), dot and rounding helpers.

Block sizes: on a GPU the GEMMs are autotuned over :data:`GEMM_CONFIGS`; under the CPU
interpreter (``TRITON_INTERPRET=1``) one small config runs, so the tests on tiny shapes still
cross tile and K-loop boundaries. Every ``tl.dot`` is at least 16 x 16 x 16 (masked), which
compiles on every GPU Triton supports.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from mtmerge import _constants

from .._shared import FLOAT_DTYPES, block, check_float, mm, pow2, round_to
from ..merge._common import EXACT, interpreting, store_as

__all__ = [
    "ACTIVATIONS",
    "EXACT",
    "FLOAT_DTYPES",
    "activation_code",
    "block",
    "check_float",
    "gemm_autotune",
    "interpreting",
    "launch_gemm",
    "mm",
    "pow2",
    "round_to",
    "store_as",
]


# activation codes (constexpr ACT of the kernels)
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "gpt_oss": 4}
ACT_GPT_OSS = tl.constexpr(4)
GPT_OSS_LIMIT = tl.constexpr(_constants.GPT_OSS_LIMIT)
GPT_OSS_ALPHA = tl.constexpr(_constants.GPT_OSS_ALPHA)
SQRT1_2 = tl.constexpr(0.7071067811865476)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
GELU_TANH_C = tl.constexpr(0.044715)

# Grouped GEMM tiles on a GPU (the first entry is only a starting point: autotuned per shape).
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
# The interpreter's one config: small, so tiny test shapes still span several tiles.
INTERPRETER_GEMM = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


# fp64 (gradcheck only) runs the broadcast product of mm() on these fixed small tiles, never autotuned.
F64_GEMM = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


def launch_gemm(kernel, grid, f64: bool, *args, **kwargs) -> None:
    """Launch an autotuned GEMM kernel; fp64 launches its plain kernel with :data:`F64_GEMM`."""
    if f64:
        kernel.fn[grid(F64_GEMM)](*args, **kwargs, **F64_GEMM)
    else:
        kernel[grid](*args, **kwargs)


def gemm_autotune(key: list[str]):
    """``triton.autotune`` over :data:`GEMM_CONFIGS` on a GPU; the fixed small tile of
    :data:`INTERPRETER_GEMM` under the interpreter (benchmarking configs there is meaningless).
    ``MTMERGE_AUTOTUNE=0`` (read at import) pins the first GPU config: one compile per kernel
    variant, for test runs where compile time dominates."""
    if interpreting():
        fixed = INTERPRETER_GEMM
    elif os.environ.get("MTMERGE_AUTOTUNE", "1") == "0":
        fixed = GEMM_CONFIGS[0].kwargs
    else:
        return triton.autotune(configs=GEMM_CONFIGS, key=key)
    return triton.heuristics({name: (lambda _args, v=v: v) for name, v in fixed.items()})


def activation_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


# ---- device helpers --------------------------------------------------------------------------


@triton.jit
def sigmoid(x):
    # through z = e^-|x| <= 1: no overflow for any x
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def tanh(x):
    # sign(x) (1 - z) / (1 + z), z = e^-2|x| <= 1: no overflow for any x
    z = tl.exp(tl.abs(x) * -2.0)
    t = (1.0 - z) / (1.0 + z)
    return tl.where(x < 0, -t, t)


# (constexpr factors go on the right of a tensor: the interpreter's constexpr * tensor breaks)


@triton.jit
def activate(g, u, ACT: tl.constexpr):
    """a = act(gate) * up for the activation code ACT (gpt_oss: its clamped GLU)."""
    if ACT == 0:
        a = g * sigmoid(g) * u
    elif ACT == 1:
        a = g * 0.5 * (1.0 + tl.math.erf(g * SQRT1_2)) * u
    elif ACT == 2:
        a = g * 0.5 * (1.0 + tanh((g + g * g * g * GELU_TANH_C) * SQRT_2_OVER_PI)) * u
    elif ACT == 3:
        a = tl.maximum(g, 0.0) * u
    else:
        gc = tl.minimum(g, GPT_OSS_LIMIT)
        uc = tl.minimum(tl.maximum(u, -GPT_OSS_LIMIT), GPT_OSS_LIMIT)
        a = (uc + 1.0) * (gc * sigmoid(gc * GPT_OSS_ALPHA))
    return a


@triton.jit
def activate_backward(g, u, ga, ACT: tl.constexpr):
    """(dL/dgate, dL/dup) given the pre-activations g, u and dL/da = ga."""
    if ACT == 0:
        s = sigmoid(g)
        act = g * s
        dact = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        act = 0.5 * g * (1.0 + tl.math.erf(g * SQRT1_2))
        dact = 0.5 * (1.0 + tl.math.erf(g * SQRT1_2)) + g * tl.exp(g * g * -0.5) * INV_SQRT_2PI
    elif ACT == 2:
        t = tanh((g + g * g * g * GELU_TANH_C) * SQRT_2_OVER_PI)
        act = 0.5 * g * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + g * g * (3.0 * GELU_TANH_C))
    elif ACT == 3:
        act = tl.maximum(g, 0.0)
        dact = tl.where(g > 0.0, 1.0, 0.0)
    if ACT != 4:
        return ga * u * dact, ga * act
    else:
        # clamps pass the gradient inside their closed range (torch.clamp's convention)
        gc = tl.minimum(g, GPT_OSS_LIMIT)
        uc = tl.minimum(tl.maximum(u, -GPT_OSS_LIMIT), GPT_OSS_LIMIT)
        s = sigmoid(gc * GPT_OSS_ALPHA)
        glu = gc * s
        dgc = ga * (uc + 1.0) * (s + gc * GPT_OSS_ALPHA * s * (1.0 - s))
        dg = tl.where(g <= GPT_OSS_LIMIT, dgc, 0.0)
        du = tl.where((u >= -GPT_OSS_LIMIT) & (u <= GPT_OSS_LIMIT), ga * glu, 0.0)
        return dg, du


@triton.jit
def gate_up_rows(n, F, ACT: tl.constexpr):
    """Rows of gate_up holding the gate and up pre-activations of column n of ``a``:
    (n, F + n), or interleaved (2n, 2n + 1) for gpt_oss."""
    if ACT == ACT_GPT_OSS:
        return 2 * n, 2 * n + 1
    else:
        return n, F + n


@triton.jit
def tile_rows(pid_m, offsets_ptr, sorted_ptr, ids_ptr, E, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr,
              E_P2: tl.constexpr):
    """The rows of grouped-GEMM tile ``pid_m``: (expert, slots [BLOCK_M] int64, row mask).

    Sorted: expert e owns cdiv(count_e, BLOCK_M) consecutive tiles over its sorted slots
    (``offsets[e]`` .. ``offsets[e + 1]``); the launch grid has cdiv(n_slots, BLOCK_M) + E tiles, an
    upper bound, and the tiles past the last expert get expert E (nothing to do). DIRECT (few
    slots, no sort): tile s is slot s alone, expert ids[s] (E when outside [0, E): nothing to do).
    """
    r = tl.arange(0, BLOCK_M)
    if DIRECT:
        e = tl.load(ids_ptr + pid_m).to(tl.int32)
        e = tl.where((e >= 0) & (e < E), e, E)
        slots = pid_m.to(tl.int64) + r * 0
        rows = r == 0
    else:
        ex = tl.arange(0, E_P2)
        lo = tl.load(offsets_ptr + ex, mask=ex < E, other=0)
        hi = tl.load(offsets_ptr + ex + 1, mask=ex < E, other=0)
        tiles = ((hi - lo + BLOCK_M - 1) // BLOCK_M).to(tl.int32)
        ends = tl.cumsum(tiles, axis=0)
        e = tl.sum((ends <= pid_m).to(tl.int32), axis=0)  # experts whose tiles all come before pid_m
        first = tl.sum(tl.where(ex == e, ends - tiles, 0), axis=0)
        start = tl.sum(tl.where(ex == e, lo, 0), axis=0)
        stop = tl.sum(tl.where(ex == e, hi, 0), axis=0)
        pos = start + (pid_m - first).to(tl.int64) * BLOCK_M + r
        rows = pos < stop
        slots = tl.load(sorted_ptr + pos, mask=rows, other=0)
    return e, slots, rows
