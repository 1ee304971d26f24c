"""Shared pieces of the merge family's Triton kernels: interpreter detection, autotune configs,
``@triton.jit`` device helpers and the launchers' cheap defensive argument checks.

Float math in the kernels follows the reference's order exactly: every launch doing float math
passes :data:`EXACT` (no FMA contraction), and divisions use ``tl.math.div_rn`` (IEEE).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

import mtmerge._constants as constants

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Every launch doing float math turns fp contraction off: a*b+c must round twice, like torch.
EXACT = {"enable_fp_fusion": False}

# constants the kernels read (globals used inside @triton.jit functions must be tl.constexpr)
F32_INF_KEY = tl.constexpr(constants.F32_INF_KEY)
DARE_KEEP_ONE = tl.constexpr(constants.DARE_KEEP_ONE)
DARE_SALT = tl.constexpr(constants.DARE_HIGH_WORD_SALT)
TRIM_THRESHOLD_KEY = tl.constexpr(constants.TRIM_THRESHOLD_KEY)
TRIM_TIE_CUTOFF = tl.constexpr(constants.TRIM_TIE_CUTOFF)
TRIM_DARE_KEY = tl.constexpr(constants.TRIM_DARE_KEY)
TRIM_DARE_KEEP = tl.constexpr(constants.TRIM_DARE_KEEP)
TRIM_COLUMNS = tl.constexpr(constants.TRIM_COLUMNS)
SCALAR_WEIGHT = tl.constexpr(constants.SCALAR_WEIGHT)
SCALAR_SCALE = tl.constexpr(constants.SCALAR_SCALE)
SCALAR_COLUMNS = tl.constexpr(constants.SCALAR_COLUMNS)
OUT_LAM = tl.constexpr(constants.OUT_LAM)
OUT_ZERO_FILL = tl.constexpr(constants.OUT_ZERO_FILL)


# ---- interpreter detection and autotuning ----------------------------------------------------


def interpreting() -> bool:
    """True when Triton runs on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune(
    configs: list[triton.Config],
    key: list[str],
    reset_to_zero: list[str] | None = None,
    restore_value: list[str] | None = None,
):
    """``triton.autotune`` on a GPU; under the CPU interpreter, just the first config
    (benchmarking configs there is meaningless and slow)."""
    if interpreting():
        return triton.heuristics({name: (lambda _args, v=v: v) for name, v in configs[0].kwargs.items()})
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero, restore_value=restore_value)


# Radix-selection histograms over one flat key tensor.
BLOCK_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]

# Element-wise kernels over the T task vectors. The first config is the interpreter's; smaller
# blocks help large T (T task vectors of one block are live in registers at once).
ELEMENT_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 512}, num_warps=4),
    triton.Config({"BLOCK": 256}, num_warps=2),
]
# per-block outputs are sized for the smallest block; rows past the launched grid stay 0
MIN_BLOCK = min(c.kwargs["BLOCK"] for c in ELEMENT_CONFIGS)


def grid_over(n: int):
    """Launch grid covering n entries with the (autotuned) BLOCK."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


# ---- device helpers --------------------------------------------------------------------------


@triton.jit
def load_f32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)


@triton.jit
def magnitude_key(d):
    """int32 bits(|d|) of fp32 d: orders like |d|, NaN above +inf."""
    return d.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def count_nonfinite(x, mask):
    """How many of the masked entries of fp32 x are NaN or +-Inf."""
    return tl.sum((mask & (magnitude_key(x) >= F32_INF_KEY)).to(tl.int32), axis=0)


@triton.jit
def consensus_bit(cons_ptr, offs, mask):
    """Bit (offs % 8) of byte (offs // 8) of the packed consensus mask."""
    byte = tl.load(cons_ptr + (offs >> 3), mask=mask, other=0).to(tl.int32)
    return ((byte >> (offs & 7).to(tl.int32)) & 1) != 0


@triton.jit
def task_delta(ft_ptr, base, offs, mask, HAS_BASE: tl.constexpr):
    """fp32 finetuned - base (or finetuned)."""
    d = load_f32(ft_ptr, offs, mask)
    if HAS_BASE:
        d = d - base
    return d


@triton.jit
def fmix32(h):
    """MurmurHash3's 32-bit finalizer on uint32 (multiplies wrap mod 2**32)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def dare_kept(index, keep, task_key):
    """DARE's keep test of int64 flat indices: ``fmix32(fmix32(lo ^ key) ^ hi ^ salt) >> 8 < keep``
    (``mtmerge/_rng.py``); ``keep`` and ``task_key`` are int64 scalars from ``task_trim``."""
    h = fmix32(index.to(tl.uint32) ^ task_key.to(tl.uint32))
    h = fmix32(h ^ (index >> 32).to(tl.uint32) ^ DARE_SALT)
    return (h >> 8).to(tl.int64) < keep


@triton.jit
def sign(x):
    """-1, 0 or +1 as fp32 (0 for NaN)."""
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def store_as(ptr, x, mask):
    """Store fp32 x in ptr's dtype, rounding to nearest even like torch. bf16 is rounded with
    integer ops (torch's formula, NaN -> 0x7FC0): the interpreter's own fp32->bf16 cast truncates."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
        r = tl.where(x == x, r, 0x7FC0)
        tl.store(ptr, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_packed(row_ptr, keep, pid, nbytes, BLOCK: tl.constexpr):
    """Pack this block's BLOCK flags into BLOCK // 8 bytes (bit i of byte j = flag 8j + i)."""
    bits = tl.reshape(keep.to(tl.int32), (BLOCK // 8, 8))
    byte = tl.sum(bits << tl.arange(0, 8)[None, :], axis=1).to(tl.uint8)
    byte_offs = pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    tl.store(row_ptr + byte_offs, byte, mask=byte_offs < nbytes)


# ---- launchers: cheap defensive checks (the public layer validates, naming its arguments) ----


def check_tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    return x


def flat(x: Tensor, name: str, dtypes: tuple = INPUT_DTYPES) -> Tensor:
    """x flattened row-major, contiguous (a copy only when x is not contiguous)."""
    check_tensor(x, name)
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {dtypes}, got {x.dtype}")
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)


def task_inputs(
    base: Tensor | None, finetuned: Sequence[Tensor], dtypes: tuple = INPUT_DTYPES
) -> tuple[Tensor | None, tuple[Tensor, ...], int, torch.device]:
    """Flat ``base`` (or None) and finetuned tensors, their numel and device. Every finetuned
    tensor has the dtype, shape and device of ``base`` (or of ``finetuned[0]``)."""
    if len(finetuned) == 0:
        raise ValueError("finetuned must hold at least one tensor")
    ref, ref_name = (base, "base") if base is not None else (finetuned[0], "finetuned[0]")
    check_tensor(ref, ref_name)
    for t, f in enumerate(finetuned):
        name = f"finetuned[{t}]"
        check_tensor(f, name)
        if f.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {f.dtype} but {ref_name} has {ref.dtype}")
        if f.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(f.shape)} but {ref_name} has {tuple(ref.shape)}")
        if f.device != ref.device:
            raise ValueError(f"{name} is on {f.device} but {ref_name} is on {ref.device}")
    b = None if base is None else flat(base, "base", dtypes)
    fts = tuple(flat(f, f"finetuned[{t}]", dtypes) for t, f in enumerate(finetuned))
    return b, fts, ref.numel(), ref.device


def consensus_arg(consensus: Tensor | None, n: int, device: torch.device) -> Tensor | None:
    """The packed consensus mask: uint8 with exactly ceil(n / 8) bytes, as a flat contiguous tensor."""
    if consensus is None:
        return None
    check_tensor(consensus, "consensus")
    if consensus.dtype != torch.uint8:
        raise TypeError(f"consensus must be a packed uint8 mask, got {consensus.dtype}")
    if consensus.numel() != (n + 7) // 8:
        raise ValueError(f"consensus must hold ceil(n / 8) = {(n + 7) // 8} bytes, got {consensus.numel()}")
    if consensus.device != device:
        raise ValueError(f"consensus is on {consensus.device}, expected {device}")
    return consensus.reshape(-1).contiguous()


def per_task_table(x: Tensor, name: str, tasks: int, columns: int | None, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """A per-task device tensor of exactly ``dtype`` and shape ``[tasks, columns]`` (``[tasks]``
    when ``columns`` is None), contiguous."""
    check_tensor(x, name)
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {x.dtype}")
    shape = (tasks,) if columns is None else (tasks, columns)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    return x.contiguous()


def per_task_values(x: Tensor, name: str, tasks: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[tasks]`` values of any real dtype as a flat contiguous tensor of ``dtype`` on ``device``
    (a device-side conversion: no host read)."""
    check_tensor(x, name)
    if x.numel() != tasks:
        raise ValueError(f"{name} must hold one value per task ({tasks}), got {x.numel()}")
    return x.detach().reshape(-1).to(device=device, dtype=dtype).contiguous()


def host_list(values: Sequence, name: str, tasks: int) -> list:
    values = list(values)
    if len(values) != tasks:
        raise ValueError(f"{name} must hold one value per task ({tasks}), got {len(values)}")
    return values


def device_values(values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A short host list as a tensor on ``device`` without waiting for the device: on CUDA
    through pinned memory and a non-blocking copy (a pageable copy would synchronize the stream)."""
    host = torch.tensor(list(values), dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def check_index_offset(index_offset: int) -> int:
    if index_offset < 0:
        raise ValueError(f"index_offset must be >= 0, got {index_offset}")
    return int(index_offset)


def flags(base: Tensor | None, cons: Tensor | None) -> dict:
    return {"HAS_BASE": base is not None, "HAS_CONS": cons is not None}
