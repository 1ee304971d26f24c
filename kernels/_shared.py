"""Triton helpers every op family shares (block sizes, dtype checks, an exact dot, rounding);
the family packages re-export what their kernels use. Family-specific pieces stay in
``<family>/_common.py``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .merge._common import interpreting

__all__ = ["FLOAT_DTYPES", "INTERPRETER", "block", "check_float", "mm", "pow2", "round_to"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INTERPRETER = tl.constexpr(interpreting())


def pow2(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor)."""
    return max(triton.next_power_of_2(max(int(n), 1)), floor)


def block(gpu: int, interpreter: int) -> int:
    """A block size: ``gpu`` when compiled, the (smaller) ``interpreter`` one under TRITON_INTERPRET=1."""
    return interpreter if interpreting() else gpu


def check_float(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of {FLOAT_DTYPES}, got {x.dtype}")
    return x


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x rounded to ``dtype`` to nearest even, like torch; bf16 by integer ops (the interpreter's
    fp32 -> bf16 cast truncates)."""
    if x.dtype == dtype:
        return x
    elif dtype == tl.bfloat16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def mm(acc, a, b):
    """acc + a @ b with a and b of one dtype. fp32 in IEEE precision (never TF32); fp64 as a
    broadcast product (not every Triton has an fp64 tl.dot; fp64 runs small tiles only); bf16 under
    the interpreter through fp32 (exact products; the interpreter's bf16 dot is wrong)."""
    if a.dtype == tl.float64:
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif INTERPRETER and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
