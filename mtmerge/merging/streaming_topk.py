"""Exact per-task top-k over a stream of chunks, by two histogram passes.

Used for a TIES trim whose scope does not fit one op call: one tensor merged in chunks, or
``scope: global`` (the whole model, ``k_t = k_rule(d_t, N)`` with ``N`` the merged
parameters, ties broken by flat index in the order of the base's sorted tensor names).

Keys are the float32 bit patterns of ``|model - base|`` (computed as the ops do), which order
like the magnitudes; ``mtmerge::magnitude_histogram`` counts them. Pass 1 builds, per task, a
histogram of the top 15 bits of the 31-bit keys (32768 bins) and picks the bin holding the
k-th largest; pass 2 histograms the low 16 bits of the keys in that bin: the exact threshold
key and how many entries lie above it. The threshold's ties are handed out in chunk order
(:class:`Ties`): in one process while merging (each chunk counts its ties as it is merged),
with several ranks from a table filled by one extra counting pass over the chunks that hold
candidates (only when a task keeps some but not all of its ties: common with bf16 inputs,
whose deltas repeat). Histograms are exact int64 counts; with several ranks they are summed
over the ranks, so the result is the single-process one.

The histograms are read on the host (``.cpu()``): they steer the selection (which bin, how
many ties), so this is where the streaming selection syncs with the device, once per chunk
and pass.
"""

from __future__ import annotations

import numpy as np
import torch

import mtmerge._library  # noqa: F401  (registers the ops)
from mtmerge._constants import F32_INF_KEY, INT64_MAX

HI_BITS = 15  # pass 1: the top 15 bits of the 31-bit magnitude keys
LO_BITS = 16  # pass 2: the low 16 bits, inside one top bin
HI_BINS = 1 << HI_BITS
LO_BINS = 1 << LO_BITS
_KEY_BITS = HI_BITS + LO_BITS


def key_to_float(key: int) -> float:
    """The float32 whose bit pattern is ``key`` (a magnitude key), as a Python float."""
    return float(np.array([key], dtype=np.uint32).view(np.float32)[0])


class Selection:
    """Exact per-task top-``k`` over a sequence of chunks.

    Parameters
    ----------
    ks : list of int
        Entries each task keeps.
    n : int
        Entries in the scope (all chunks together).
    selection : {"exact", "geq"}
        The tie rule (see :func:`mtmerge.magnitude_threshold`).

    Attributes
    ----------
    mode : list of str
        Per task: ``"none"`` (keep nothing), ``"all"`` or ``"select"`` (needs the passes).
    active : list of int
        The ``"select"`` tasks.
    t_key : list of int
        Per task, after :meth:`finish`: the threshold key.
    inbin : dict of int to list of int
        Chunk id -> entries of each task in its pass-2 bin (filled by :meth:`add_lo`).
    """

    def __init__(self, ks: list[int], n: int, selection: str) -> None:
        self.ks, self.n, self.selection = ks, n, selection
        self.mode: list[str] = []
        self.target: list[int] = []
        for k in ks:
            if selection == "exact":
                mode = "none" if k == 0 else "all" if k >= n else "select"
                target = k
            else:  # geq: keep >= the (k+1)-th largest; k = n keeps all
                mode = "all" if k >= n else "select"
                target = min(k + 1, n)
            self.mode.append(mode)
            self.target.append(target)
        self.active = [t for t, m in enumerate(self.mode) if m == "select"]
        count = len(ks)
        self.hi = torch.zeros(count, HI_BINS, dtype=torch.int64)
        self.lo = torch.zeros(count, LO_BINS, dtype=torch.int64)
        self.bin = [0] * count
        self.rank_in_bin = [0] * count
        self.above_hi = [0] * count
        self.t_key = [0] * count
        self.ties_needed = [0] * count
        self.ties_total = [0] * count
        self.inbin: dict[int, list[int]] = {}

    @property
    def checks_every_task(self) -> bool:
        """Whether pass 1 reads (and so rejects NaN/Inf in) every task vector."""
        return len(self.active) == len(self.ks)

    def _histogram(self, base: torch.Tensor | None, xs: list[torch.Tensor], cons: torch.Tensor | None,
                   tasks: list[int], shift: int, bits: int, prefixes: list[int], prefix_shift: int) -> np.ndarray:
        """``mtmerge::magnitude_histogram`` for ``tasks`` as the rows of a ``[T, 2**bits]`` host
        array (zeros for the other tasks)."""
        out = np.zeros((len(self.ks), 1 << bits), dtype=np.int64)
        if tasks:
            rows = torch.ops.mtmerge.magnitude_histogram(base=base, finetuned=[xs[t] for t in tasks], shift=shift,
                                                         bits=bits, prefixes=prefixes, prefix_shift=prefix_shift,
                                                         consensus=cons)
            out[tasks] = rows.cpu().numpy()  # host sync: the histogram steers the selection
        return out

    def add_hi(self, base: torch.Tensor | None, xs: list[torch.Tensor], cons: torch.Tensor | None,
               where: str) -> None:
        """Pass 1 over one chunk: histogram the top 15 key bits of every active task.

        Raises
        ------
        ValueError
            A task vector holds NaN or Inf (``where`` names the tensor).
        """
        chunk = self._histogram(base, xs, cons, self.active, LO_BITS, HI_BITS, [0] * len(self.active), _KEY_BITS)
        bad = chunk[:, F32_INF_KEY >> LO_BITS:].sum(axis=1)
        for t in self.active:
            if int(bad[t]):
                raise ValueError(f"{where}: the task vector of finetuned[{t}] holds {int(bad[t])} NaN or Inf "
                                 "value(s); a magnitude trim cannot rank them")
        self.hi += torch.from_numpy(chunk)

    def pick_bins(self) -> None:
        """After pass 1 (summed over every chunk and rank): each task's top bin."""
        for t in self.active:
            cum = torch.flip(self.hi[t], [0]).cumsum(0)
            j = int(torch.searchsorted(cum, torch.tensor([self.target[t]])).item())
            self.bin[t] = HI_BINS - 1 - j
            self.above_hi[t] = int(cum[j - 1]) if j > 0 else 0
            self.rank_in_bin[t] = self.target[t] - self.above_hi[t]

    def add_lo(self, gid: int, base: torch.Tensor | None, xs: list[torch.Tensor], cons: torch.Tensor | None) -> None:
        """Pass 2 over chunk ``gid``: histogram the low 16 key bits inside each task's top bin."""
        lo = self._histogram(base, xs, cons, self.active, 0, LO_BITS, [self.bin[t] for t in self.active], LO_BITS)
        self.lo += torch.from_numpy(lo)
        self.inbin[gid] = [int(c) for c in lo.sum(axis=1)]

    def count_ties(self, base: torch.Tensor | None, xs: list[torch.Tensor], cons: torch.Tensor | None,
                   tasks: list[int]) -> dict[int, int]:
        """Entries equal to each task's threshold key in this chunk, for ``tasks``."""
        lo = self._histogram(base, xs, cons, tasks, 0, LO_BITS, [self.t_key[t] >> LO_BITS for t in tasks], LO_BITS)
        return {t: int(lo[t, self.t_key[t] & (LO_BINS - 1)]) for t in tasks}

    def finish(self) -> None:
        """After pass 2 (summed over every chunk and rank): thresholds and tie counts."""
        for t in self.active:
            cum = torch.flip(self.lo[t], [0]).cumsum(0)
            j = int(torch.searchsorted(cum, torch.tensor([self.rank_in_bin[t]])).item())
            low = LO_BINS - 1 - j
            above = self.above_hi[t] + (int(cum[j - 1]) if j > 0 else 0)
            self.t_key[t] = (self.bin[t] << LO_BITS) | low
            self.ties_total[t] = int(self.lo[t][low])
            self.ties_needed[t] = self.ks[t] - above if self.selection == "exact" else self.ties_total[t]

    def to_allocate(self) -> dict[int, int]:
        """Tasks keeping some but not all of their threshold ties -> ties to keep."""
        return {t: self.ties_needed[t] for t in self.active
                if self.selection == "exact" and 0 < self.ties_needed[t] < self.ties_total[t]}

    def chunk_trim(self, taken: dict[int, int]) -> tuple[list[float], list[int]]:
        """Per task, the threshold and the threshold ties kept in one chunk.

        Parameters
        ----------
        taken : dict of int to int
            Ties kept in this chunk by each task of :meth:`to_allocate` (from :class:`Ties`).

        Returns
        -------
        thresholds : list of float
            ``+inf`` for ``"none"``, 0 for ``"all"``, else the threshold magnitude.
        kept : list of int
            Ties kept in this chunk: 0 (none), ``INT64_MAX`` (all) or a count.
        """
        thresholds, kept = [], []
        for t, mode in enumerate(self.mode):
            if mode == "none":
                thresholds.append(float("inf"))
                kept.append(0)
            elif mode == "all":
                thresholds.append(0.0)
                kept.append(INT64_MAX)
            else:
                thresholds.append(key_to_float(self.t_key[t]))
                kept.append(taken.get(t, INT64_MAX))
        return thresholds, kept


class Ties:
    """Hands out the threshold ties of each task in chunk order (lowest flat index first).

    Parameters
    ----------
    needed : dict of int to int
        Task -> ties it keeps in the whole scope (:meth:`Selection.to_allocate`).
    """

    def __init__(self, needed: dict[int, int]) -> None:
        self.remaining = dict(needed)
        self.kept: dict[int, dict[int, int]] = {}
        self.last = -1

    @classmethod
    def from_table(cls, needed: dict[int, int], table: torch.Tensor) -> Ties:
        """Allocate every chunk at once from ``table`` (int64 ``[chunks, T]``: ties per chunk)."""
        ties = cls(needed)
        for gid in range(table.shape[0]):
            ties.take(gid, {t: int(table[gid, t]) for t in needed})
        return ties

    def take(self, gid: int, counts: dict[int, int]) -> dict[int, int]:
        """Chunk ``gid`` holds ``counts[t]`` ties of task ``t``: how many of them it keeps.

        Raises
        ------
        AssertionError
            Chunks were not taken in increasing order.
        """
        if gid <= self.last:
            raise AssertionError("ties must be allocated in chunk order")
        self.last = gid
        out = {}
        for t, c in counts.items():
            k = min(c, self.remaining[t])
            self.remaining[t] -= k
            out[t] = k
        self.kept[gid] = out
        return out
