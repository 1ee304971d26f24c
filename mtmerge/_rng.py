"""DARE's counter-based RNG: keep decisions that every backend, thread count and tiling agree on.

Entry ``i`` of task ``t`` is kept when ``hash(i, key_t) < round(d * 2**24)`` with

    hash(i, key) = fmix32(fmix32(lo32(i) ^ key) ^ hi32(i) ^ DARE_HIGH_WORD_SALT) >> 8
    key_t        = fmix32(fmix32(fmix32(t + 0x9E3779B9) ^ hi32(seed)) ^ lo32(seed))

``fmix32`` is MurmurHash3's 32-bit finalizer. The per-task keys are computed here, on the host,
and handed to the kernels in ``task_trim`` (``TRIM_DARE_KEY``); the kernels implement only
``hash``.
"""

from __future__ import annotations

from mtmerge._constants import DARE_KEEP_ONE

_M32 = 0xFFFFFFFF


def fmix32(x: int) -> int:
    """MurmurHash3's 32-bit finalizer on a Python int (a bijection of [0, 2**32))."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def dare_task_key(seed: int, task: int) -> int:
    """The 32-bit stream key of DARE task number ``task`` under ``seed`` (``0 <= seed < 2**63``)."""
    return fmix32(fmix32(fmix32(task + 0x9E3779B9) ^ ((seed >> 32) & _M32)) ^ (seed & _M32))


def dare_keep_threshold(density: float) -> int:
    """DARE keeps an entry when its 24-bit hash is below this: ``round(density * 2**24)``."""
    return min(DARE_KEEP_ONE, max(0, round(float(density) * DARE_KEEP_ONE)))
