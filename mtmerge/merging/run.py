"""``merge_checkpoints``: the streaming checkpoint merge (``mtmerge merge CONFIG -o OUT_DIR``).

Per output tensor (sorted names), the base's and every model's chunk is memory-mapped (cast
to the compute dtype where needed), merged by the fused ``mtmerge`` ops into one pooled
output buffer and written at its offset in its shard; then the next chunk. Memory is bounded
by ``T + 2`` chunk buffers plus a small workspace, whatever the model's size.

Methods, as fused-op calls on each tensor (``w`` weights, ``d`` densities, ``lam`` lambda):

* ``task_arithmetic``: ``base + lam * sum_t w_t tau_t`` (``normalize``: ``w / sum(w)``),
  exactly :func:`mtmerge.task_arithmetic`.
* ``ties``: :func:`mtmerge.ties_merge` with ``flavor`` (default ``"mergekit"``) and
  ``merge="mean"`` if ``normalize`` (default) else ``"sum"``.
* ``dare_ties``: ``ties_merge(..., sparsify="dare", seed=s, rescale=...)`` (mergekit's
  default ``rescale: true`` is the L1 rule; ``normalize`` default false: ``merge="sum"``).
* ``dare_linear``: DARE then the weighted sum (``knobs=None`` in the fused op).
* ``consensus_ties`` / ``consensus_task_arithmetic``: :func:`mtmerge.consensus_merge`
  (TALL masks with ``tall_lambda``, at least ``k`` agreeing tasks).

The per-tensor seed ``s`` of DARE is ``dare_seed(seed, name)`` (a blake2b hash): the masks
do not depend on tensor order or on the number of ranks. A tensor processed in chunks passes
each chunk's start as the ops' ``index_offset``, so it draws exactly the unchunked mask; its
L1 rescale uses the whole tensor's sums.

Chunked tensors (bigger than ``chunk_bytes``). Elementwise methods just merge chunk by chunk.
A TIES trim needs the tensor's top-k: it is found with the histogram selection below
restricted to that tensor, and each chunk is merged with ``(threshold, ties kept in this
chunk)``: the result is bitwise identical to the unchunked merge. ``zero_sign="majority"``
(flavor ``paper``) sums the elected signs over all chunks first; the L1 rescale of DARE sums
over all chunks first.

``scope: global`` (exact per-task top-k over the whole model, ``k_t = k_rule(d_t, N)`` with
``N`` the merged parameters, ties broken by flat index in the order of the base's sorted
tensor names). Keys are the float32 bit patterns of ``|model - base|`` (computed as the ops
do), which order like the magnitudes. Pass 1 reads every tensor and builds, per task, a
histogram of the top 15 key bits (32768 bins) and picks the bin holding the k-th largest;
pass 2 reads every tensor again and histograms the low 16 bits of the keys in that bin: the
exact threshold key and how many entries lie above it. The threshold's ties are handed out in
chunk order: in one process while merging (each chunk counts its ties as it is merged), with
several ranks by one extra counting pass over the chunks holding candidates (only when a task
keeps some but not all of its ties: common with bf16 inputs, whose deltas repeat).
``zero_sign="majority"`` adds a pass summing the elected signs over the whole model (the
paper's rule, global as in its code). Then the merge pass calls the fused op with those
thresholds. Histograms are exact int64 counts; with several ranks they are all-reduced
(sums), so the result is the single-process one.

Distributed (``torchrun --nproc-per-node N -m mtmerge merge ...``): with ``WORLD_SIZE > 1``
the process group is initialized (gloo on CPU, nccl with CUDA: then each rank computes on
``cuda:LOCAL_RANK``); tensors are assigned to ranks by a size-balanced greedy (plan.py);
rank 0 creates the temporary directory, the shard files (headers, final sizes) and the
base's non-tensor files; every rank writes its tensors' bytes at their planned offsets; rank
0 writes the index and moves the directory into place after all ranks have finished. The
files are byte-identical to a single-process merge. Each phase ends with an agreement step:
an error on any rank stops every rank with that error (no hang) and removes the temporary
directory.

Testing hook: ``MTMERGE_MERGE_SLOWDOWN=SECONDS`` sleeps after each merged tensor (used by the
tests that kill a merge midway); it has no other effect.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

import mtmerge._library  # noqa: F401  (registers the ops)
from mtmerge.merging.checkpoint import ST_DTYPES, Checkpoint
from mtmerge.merging.config import MergeConfig, load_config
from mtmerge.merging.plan import COMPUTE_DTYPES, CONSENSUS_BLOCK, MergePlan, TensorPlan, build_plan
from mtmerge.merging.writer import OutputDir, ShardWriter, format_bytes, parse_size, write_text_synced
from mtmerge.ops.merge import _DARE_KEEP_ONE, _INT64_MAX, FLAVORS, TiesKnobs, _k_for, resolve_knobs
from mtmerge.reference.merge import dare_keep_threshold

CONFIG_RECORD = "mtmerge_config.yml"
_F32_INF_KEY = 0x7F800000
_HI_BINS, _LO_BINS, _LO_BITS = 32768, 65536, 16


@dataclass
class MergeSummary:
    """What :func:`merge_checkpoints` did.

    Attributes
    ----------
    tensors : int
        Output tensors.
    bytes_in : int
        Stored bytes of the input tensors (base and models, each once).
    bytes_out : int
        Bytes of the written shards.
    seconds : float
        Wall time, planning included.
    throughput : float
        ``bytes_in / seconds`` (bytes per second).
    peak_rss_bytes : int
        Peak resident memory (the largest over ranks). For a dry run: the predicted peak.
    out_dir : Path or None
        The output directory (None for a dry run without one).
    dry_run : bool
    bytes_read : int
        Bytes read over all passes.
    shards : int
    world_size : int
    predicted_peak_bytes : int
    """

    tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float
    throughput: float
    peak_rss_bytes: int
    out_dir: Path | None
    dry_run: bool = False
    bytes_read: int = 0
    shards: int = 0
    world_size: int = 1
    predicted_peak_bytes: int = 0

    def __str__(self) -> str:
        if self.dry_run:
            return (f"dry run: {self.tensors} tensors, {format_bytes(self.bytes_in)} to read, "
                    f"{format_bytes(self.bytes_out)} to write, predicted peak RSS "
                    f"{format_bytes(self.predicted_peak_bytes)}")
        ranks = f" on {self.world_size} ranks" if self.world_size > 1 else ""
        return (f"merged {self.tensors} tensors ({format_bytes(self.bytes_in)} read, {format_bytes(self.bytes_out)} "
                f"written in {self.shards} shard(s)) in {self.seconds:.1f} s{ranks}: "
                f"{format_bytes(self.throughput)}/s; peak RSS {format_bytes(self.peak_rss_bytes)} -> {self.out_dir}")


def dare_seed(seed: int, name: str) -> int:
    """The DARE seed of tensor ``name`` (its chunks use it with their start as index offset)."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def peak_rss() -> int:
    """Peak resident memory of this process so far (bytes): ``VmHWM`` on Linux (not
    ``ru_maxrss``, which keeps the RSS of the process image replaced by ``exec``, e.g. a big
    parent's forked copy), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- progress ------------------------------------------------------------------------------


class Progress:
    """One stderr line updated in place: pass, tensors, bytes, rate, ETA."""

    def __init__(self, total_bytes: int, total_tensors: int, enabled: bool, stream: TextIO | None = None):
        self.total_bytes = max(1, total_bytes)
        self.total_tensors = total_tensors
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done_bytes = 0
        self.done_tensors = 0
        self.label = ""
        self.start = time.perf_counter()
        self._last = 0.0
        self._width = 0

    def start_pass(self, label: str) -> None:
        self.label = label
        self.done_tensors = 0
        self._render(force=True)

    def add(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        self._render()

    def tensor_done(self) -> None:
        self.done_tensors += 1
        self._render()

    def _render(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.2 and self.done_tensors < self.total_tensors:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done_bytes / elapsed
        left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else float("inf")
        eta = "--:--" if left == float("inf") else time.strftime("%H:%M:%S", time.gmtime(max(0.0, left)))
        pct = 100.0 * self.done_bytes / self.total_bytes
        line = (f"mtmerge {self.label}: {pct:5.1f}% | {self.done_tensors}/{self.total_tensors} tensors | "
                f"{format_bytes(self.done_bytes)}/{format_bytes(self.total_bytes)} | {format_bytes(rate)}/s | "
                f"ETA {eta}")
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            self._render(force=True)
            self.stream.write("\n")
            self.stream.flush()


# ---- torch.distributed ---------------------------------------------------------------------


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


_REBUILT = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, OSError)


class _Dist:
    """The process group (or a single process), with error agreement between phases."""

    def __init__(self) -> None:
        self.world = 1
        self.rank = 0
        self.device = torch.device("cpu")  # where collectives run

    @classmethod
    def setup(cls) -> _Dist:
        """Join the caller's process group, or that of a ``torchrun`` launch (``WORLD_SIZE > 1``),
        creating it if needed. A group created here lives until the interpreter exits (destroyed
        then), so several merges in one process share it: torchrun's rendezvous cannot be redone."""
        d = cls()
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        if not initialized and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return d
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
            atexit.register(_destroy_group)
        d.world, d.rank = dist.get_world_size(), dist.get_rank()
        if dist.get_backend() == "nccl":
            d.device = torch.device("cuda", torch.cuda.current_device())
        return d

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        x = t.to(self.device)
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        t.copy_(x.to(t.device))
        return t

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def phase(self, fn, *args, **kwargs) -> Any:
        """Run ``fn`` here; if it failed on any rank, raise that error on every rank."""
        err: Exception | None = None
        result = None
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # BaseException (interrupts) propagates at once
            err = exc
        if self.world == 1:
            if err is not None:
                raise err
            return result
        import torch.distributed as dist

        infos: list[Any] = [None] * self.world
        dist.all_gather_object(infos, None if err is None else (type(err).__name__, str(err)))
        if err is not None:
            raise err
        for r, info in enumerate(infos):
            if info is not None:
                name, message = info
                for cls in _REBUILT:
                    if cls.__name__ == name:
                        raise cls(f"{message} (on rank {r})")
                raise RuntimeError(f"rank {r} failed: {name}: {message}")
        return result


# ---- exact top-k over a stream of chunks --------------------------------------------------


def _key_to_float(key: int) -> float:
    return float(np.array([key], dtype=np.uint32).view(np.float32)[0])


class _Selection:
    """Exact per-task top-``k`` over a sequence of chunks, by two histogram passes.

    Per task: ``"none"`` (keep nothing), ``"all"`` or ``"select"``: the threshold key is found
    from a histogram of the top 15 bits of the 31-bit magnitude keys (pass 1), then one of
    the low 16 bits of the keys in the bin holding the target rank (pass 2).
    """

    def __init__(self, ks: list[int], n: int, selection: str):
        self.ks, self.n, self.selection = ks, n, selection
        self.mode, self.target = [], []
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
        self.hi = torch.zeros(count, _HI_BINS, dtype=torch.int64)
        self.lo = torch.zeros(count, _LO_BINS, dtype=torch.int64)
        self.bin = [0] * count
        self.rank_in_bin = [0] * count
        self.above_hi = [0] * count
        self.t_key = [0] * count
        self.ties_needed = [0] * count
        self.ties_total = [0] * count
        self.inbin: dict[int, list[int]] = {}  # chunk -> entries in the task's bin (pass 2)

    def _histogram(self, base, xs, cons, tasks: list[int], shift: int, bits: int, prefixes: list[int],
                   prefix_shift: int) -> np.ndarray:
        """``mtmerge::magnitude_histogram`` (C++ on CPU, Triton on GPU) for ``tasks``, as rows of
        a ``[len(ks), 2**bits]`` array (zeros for the other tasks)."""
        out = np.zeros((len(self.ks), 1 << bits), dtype=np.int64)
        if tasks:
            rows = torch.ops.mtmerge.magnitude_histogram(base, [xs[t] for t in tasks], shift, bits, prefixes,
                                                         prefix_shift, cons).cpu().numpy()
            out[tasks] = rows
        return out

    def add_hi(self, base, xs, cons, where: str) -> None:
        # the top 15 bits of the 31-bit magnitude keys
        chunk = self._histogram(base, xs, cons, self.active, _LO_BITS, 15, [0] * len(self.active), 31)
        bad = chunk[:, _F32_INF_KEY >> _LO_BITS:].sum(axis=1)
        for t in self.active:
            if int(bad[t]):
                raise ValueError(f"{where}: the task vector of finetuned[{t}] holds {int(bad[t])} NaN or Inf "
                                 "value(s); a magnitude trim cannot rank them")
        self.hi += torch.from_numpy(chunk)

    def pick_bins(self) -> None:
        for t in self.active:
            cum = torch.flip(self.hi[t], [0]).cumsum(0)
            j = int(torch.searchsorted(cum, torch.tensor([self.target[t]])).item())
            self.bin[t] = _HI_BINS - 1 - j
            self.above_hi[t] = int(cum[j - 1]) if j > 0 else 0
            self.rank_in_bin[t] = self.target[t] - self.above_hi[t]

    def add_lo(self, gid: int, base, xs, cons) -> None:
        # the low 16 bits of the keys inside each task's chosen top bin
        lo = self._histogram(base, xs, cons, self.active, 0, _LO_BITS, [self.bin[t] for t in self.active], _LO_BITS)
        self.lo += torch.from_numpy(lo)
        self.inbin[gid] = [int(c) for c in lo.sum(axis=1)]

    def count_ties(self, base, xs, cons, tasks: list[int]) -> dict[int, int]:
        """Entries equal to each task's threshold key in this chunk."""
        lo = self._histogram(base, xs, cons, tasks, 0, _LO_BITS, [self.t_key[t] >> _LO_BITS for t in tasks], _LO_BITS)
        return {t: int(lo[t, self.t_key[t] & (_LO_BINS - 1)]) for t in tasks}

    def finish(self) -> None:
        for t in self.active:
            cum = torch.flip(self.lo[t], [0]).cumsum(0)
            j = int(torch.searchsorted(cum, torch.tensor([self.rank_in_bin[t]])).item())
            low = _LO_BINS - 1 - j
            above = self.above_hi[t] + (int(cum[j - 1]) if j > 0 else 0)
            self.t_key[t] = (self.bin[t] << _LO_BITS) | low
            self.ties_total[t] = int(self.lo[t][low])
            self.ties_needed[t] = self.ks[t] - above if self.selection == "exact" else self.ties_total[t]

    def to_allocate(self) -> dict[int, int]:
        """Tasks keeping some but not all of their threshold ties -> ties to keep."""
        return {t: self.ties_needed[t] for t in self.active
                if self.selection == "exact" and 0 < self.ties_needed[t] < self.ties_total[t]}


class _Ties:
    """Hands out the threshold ties of each task in chunk order (lowest flat index first)."""

    def __init__(self, needed: dict[int, int]):
        self.remaining = dict(needed)
        self.kept: dict[int, dict[int, int]] = {}
        self.last = -1

    @classmethod
    def from_table(cls, needed: dict[int, int], table: torch.Tensor) -> _Ties:
        ties = cls(needed)
        for gid in range(table.shape[0]):
            ties.take(gid, {t: int(table[gid, t]) for t in needed})
        return ties

    def take(self, gid: int, counts: dict[int, int]) -> dict[int, int]:
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


# ---- the engine ----------------------------------------------------------------------------


@dataclass
class _Params:
    weights: list[float]
    densities: list[float]
    lam: float
    knobs: TiesKnobs | None  # None: a linear merge (no election)
    rescale: str
    normalize: bool


@dataclass
class _TensorState:
    """Per-tensor decisions shared by its passes."""

    tp: TensorPlan
    p: _Params
    sel: _Selection | None = None
    ties: _Ties | None = None
    dare_keep: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    zero_fill: int = 1
    one_trim: tuple[torch.Tensor, torch.Tensor] | None = None  # a one-chunk tensor's trim, reused


class _Pool:
    """Reusable flat buffers (first-touch page faults cost more than the math on big tensors)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.slots: dict[Any, torch.Tensor] = {}

    def get(self, key: Any, dtype: torch.dtype, n: int) -> torch.Tensor:
        need = max(1, n * dtype.itemsize)
        buf = self.slots.get(key)
        if buf is None or buf.numel() < need:
            self.slots.pop(key, None)
            del buf
            buf = self.slots[key] = torch.empty(need, dtype=torch.uint8, device=self.device)
        return buf[:n * dtype.itemsize].view(dtype)

    def release(self, key: Any) -> None:
        self.slots.pop(key, None)


def _task_names(message: str, paths: list[Path]) -> str:
    for t in range(len(paths) - 1, -1, -1):
        message = message.replace(f"finetuned[{t}]", f"models[{t}]")
    return message


class _Engine:
    def __init__(self, plan: MergePlan, dist: _Dist, writer: ShardWriter | None, progress: Progress,
                 device: torch.device):
        self.plan = plan
        self.cfg: MergeConfig = plan.config
        self.dist = dist
        self.writer = writer
        self.progress = progress
        self.device = device
        self.ckpts: list[Checkpoint] = [plan.base, *plan.models]
        self.T = plan.num_tasks
        ranks = plan.assign_ranks(dist.world)
        self.mine = [tp for tp, r in zip(plan.tensors, ranks, strict=True) if r == dist.rank]
        self.majority = self.cfg.elect and FLAVORS[self.cfg.flavor].zero_sign == "majority"
        self.pool = _Pool(device)
        self.slowdown = float(os.environ.get("MTMERGE_MERGE_SLOWDOWN", "0") or 0)  # tests only
        self.global_sel: _Selection | None = None
        self.global_ties: _Ties | None = None
        self.global_fill: int | None = None
        self._cache_key: Any = None
        self._cache: Any = None
        self._cons: Any = None

    # -- parameters, inputs, consensus ---------------------------------------------------------

    def params(self, tp: TensorPlan) -> _Params:
        cfg, name = self.cfg, tp.name
        w = cfg.weights(name)
        normalize = cfg.normalize(name)
        if cfg.elect:
            knobs = resolve_knobs(cfg.flavor, merge="mean" if normalize else "sum")
        else:
            knobs = None
            if normalize:
                total = sum(w)
                if abs(total) >= 1e-8:
                    w = [v / total for v in w]
        return _Params(w, cfg.densities(name), cfg.lam(name), knobs, cfg.rescale(name), normalize)

    def chunk_bytes_in(self, tp: TensorPlan, start: int, stop: int) -> int:
        if not tp.merged:
            return (stop - start) * ST_DTYPES[tp.out_code][1]
        return sum((stop - start) * c.tensors[tp.name].itemsize for c in self.ckpts)

    def load(self, tp: TensorPlan, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The chunk of the base and of every model, 1-D in the compute dtype."""
        key = (tp.name, start)
        if self._cache_key == key:
            return self._cache
        self.drop_cache()
        out = []
        for slot, ckpt in enumerate(self.ckpts):
            info = ckpt.tensors[tp.name]
            if info.torch_dtype == tp.compute_dtype:
                self.pool.release(("in", slot))
                x = ckpt.read(tp.name, start, stop)
            else:
                buf = self.pool.get(("in", slot), tp.compute_dtype, stop - start)
                x = ckpt.read(tp.name, start, stop, dtype=tp.compute_dtype, out=buf)
            if self.device.type != "cpu":
                x = x.to(self.device)
            out.append(x)
        self._cache_key, self._cache = key, (out[0], out[1:])
        return self._cache

    def drop_cache(self) -> None:
        self._cache_key, self._cache, self._cons = None, None, None

    def consensus(self, p: _Params, base: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor | None:
        """The packed consensus mask of this chunk, sub-block by sub-block (no n-sized float
        temporary); equal to :func:`mtmerge.consensus_merge`'s."""
        if not self.cfg.consensus:
            return None
        if self._cons is not None and self._cons[0] == self._cache_key and self._cache[0] is base:
            return self._cons[1]
        n = base.numel()
        out = torch.empty((n + 7) // 8, dtype=torch.uint8, device=base.device)
        ones, zeros = [1.0] * self.T, torch.zeros(self.T, dtype=torch.float32, device=base.device)
        keep_all = torch.full((self.T,), _INT64_MAX, dtype=torch.int64, device=base.device)
        lams = [float(self.cfg.tall_lambda)] * self.T
        for s in range(0, n, CONSENSUS_BLOCK):
            e = min(n, s + CONSENSUS_BLOCK)
            b, sub = base[s:e], [x[s:e] for x in xs]
            mtl = torch.empty(e - s, dtype=torch.float32, device=base.device)
            torch.ops.mtmerge.merge_fused(b, sub, p.weights, ones, zeros, keep_all, 0, [_DARE_KEEP_ONE] * self.T,
                                          None, "none", False, 1, "sum", "count", 1.0, False, mtl, 0, False)
            masks = torch.ops.mtmerge.tall_masks(b, sub, mtl, lams)
            out[s // 8:(e + 7) // 8] = torch.ops.mtmerge.consensus_mask(masks, self.cfg.k)
        if self._cache is not None and self._cache[0] is base:
            self._cons = (self._cache_key, out)
        return out

    # -- trims ---------------------------------------------------------------------------------

    def trim(self, st: _TensorState, ci: int, base, xs, cons) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task (threshold, tie cutoff) for chunk ``ci``."""
        device = base.device
        if self.cfg.sparsify != "magnitude":
            return (torch.zeros(self.T, dtype=torch.float32, device=device),
                    torch.full((self.T,), _INT64_MAX, dtype=torch.int64, device=device))
        p, tp = st.p, st.tp
        if st.sel is None:  # one chunk, tensor scope: the fused selection op
            if st.one_trim is None:
                ks = [_k_for(d, tp.numel, p.knobs.k_rule) for d in p.densities]
                st.one_trim = torch.ops.mtmerge.delta_threshold(base, xs, ks, p.knobs.selection, False, cons)
            return st.one_trim
        sel, gid = st.sel, tp.first_chunk + ci
        thr, kept = [], []
        alloc = sel.to_allocate()
        taken: dict[int, int] = {}
        if alloc:
            if gid in st.ties.kept:
                taken = st.ties.kept[gid]
            else:
                inbin = sel.inbin.get(gid)
                tasks = [t for t in alloc if st.ties.remaining[t] > 0 and (inbin is None or inbin[t] > 0)]
                counts = sel.count_ties(base, xs, cons, tasks) if tasks else {}
                taken = st.ties.take(gid, {t: counts.get(t, 0) for t in alloc})
        for t, mode in enumerate(sel.mode):
            if mode == "none":
                thr.append(float("inf"))
                kept.append(0)
            elif mode == "all":
                thr.append(0.0)
                kept.append(_INT64_MAX)
            else:
                thr.append(_key_to_float(sel.t_key[t]))
                kept.append(taken[t] if t in alloc else _INT64_MAX)
        thr_t = torch.tensor(thr, dtype=torch.float32, device=device)
        kept_t = torch.tensor(kept, dtype=torch.int64, device=device)
        if any(0 < k < _INT64_MAX for k in kept):
            return thr_t, torch.ops.mtmerge.tie_cutoffs(base, xs, thr_t, kept_t, cons)
        return thr_t, torch.where(kept_t == 0, torch.full_like(kept_t, -1), kept_t)

    def _selection_passes(self, tensors: list[TensorPlan], sel: _Selection, which: str, label: str) -> None:
        self.progress.start_pass(label)
        for tp in tensors:
            self._feed_selection(sel, tp, self.params(tp), which)
            self.progress.tensor_done()

    def _feed_selection(self, sel: _Selection, tp: TensorPlan, p, which: str) -> None:
        """One histogram pass of ``sel`` ("hi" or "lo") over the chunks of tensor ``tp``."""
        for ci, (start, stop) in enumerate(tp.chunks):
            base, xs = self.load(tp, start, stop)
            cons = self.consensus(p, base, xs)
            if which == "hi":
                sel.add_hi(base, xs, cons, f"tensor {tp.name!r}")
            else:
                sel.add_lo(tp.first_chunk + ci, base, xs, cons)
            self.drop_cache()
            self.progress.add(self.chunk_bytes_in(tp, start, stop))

    # -- scope global --------------------------------------------------------------------------

    def global_selection(self) -> None:
        cfg, dist = self.cfg, self.dist
        merged = [tp for tp in self.plan.tensors if tp.merged]
        mine = [tp for tp in self.mine if tp.merged]
        n = sum(tp.numel for tp in merged)
        knobs = resolve_knobs(cfg.flavor)
        ks = [_k_for(d, n, knobs.k_rule) for d in cfg.densities("")]
        sel = _Selection(ks, n, knobs.selection)
        if sel.active:
            dist.phase(self._wrap, self._selection_passes, mine, sel, "hi", "select 1/2")
            dist.all_reduce(sel.hi)
            sel.pick_bins()
            dist.phase(self._wrap, self._selection_passes, mine, sel, "lo", "select 2/2")
            dist.all_reduce(sel.lo)
            sel.finish()
        alloc = sel.to_allocate()
        if alloc and dist.world > 1:
            table = torch.zeros(self.plan.num_chunks, self.T, dtype=torch.int64)
            dist.phase(self._wrap, self._count_pass, mine, sel, alloc, table)
            dist.all_reduce(table)
            ties = _Ties.from_table(alloc, table)
        else:
            ties = _Ties(alloc)
        self.global_sel, self.global_ties = sel, ties
        if self.majority:
            total = torch.zeros(1, dtype=torch.int64)
            dist.phase(self._wrap, self._sign_pass, mine, total)
            dist.all_reduce(total)
            self.global_fill = int((total > 0).item()) - int((total < 0).item())

    def _count_pass(self, tensors, sel: _Selection, alloc: dict[int, int], table: torch.Tensor) -> None:
        self.progress.start_pass("count ties")
        for tp in tensors:
            p = self.params(tp)
            for ci, (start, stop) in enumerate(tp.chunks):
                gid = tp.first_chunk + ci
                tasks = [t for t in alloc if sel.inbin.get(gid, [1] * self.T)[t] > 0]
                if not tasks:
                    continue
                base, xs = self.load(tp, start, stop)
                cons = self.consensus(p, base, xs)
                for t, c in sel.count_ties(base, xs, cons, tasks).items():
                    table[gid, t] = c
                self.drop_cache()

    def _sign_pass(self, tensors, total: torch.Tensor) -> None:
        self.progress.start_pass("elect signs")
        for tp in tensors:
            st = self._state(tp)
            total += self._sign_total(st)
            self.progress.tensor_done()

    # -- one tensor ----------------------------------------------------------------------------

    def _wrap(self, fn, *args):
        """Run a pass, naming the tensor and the model in op errors."""
        try:
            return fn(*args)
        except ValueError as exc:
            raise ValueError(_task_names(str(exc), self.cfg.paths)) from None

    def _state(self, tp: TensorPlan) -> _TensorState:
        p = self.params(tp)
        st = _TensorState(tp, p, dare_keep=[_DARE_KEEP_ONE] * self.T, scales=[1.0] * self.T)
        if self.cfg.sparsify == "magnitude":
            if self.global_sel is not None:
                st.sel, st.ties = self.global_sel, self.global_ties
            elif tp.chunked:
                ks = [_k_for(d, tp.numel, p.knobs.k_rule) for d in p.densities]
                st.sel = _Selection(ks, tp.numel, p.knobs.selection)
                if st.sel.active:
                    self._local_selection(st)
                st.ties = _Ties(st.sel.to_allocate())
        if self.cfg.sparsify == "dare":
            st.dare_keep = [dare_keep_threshold(d) for d in p.densities]
            if p.rescale == "inverse":
                st.scales = [1.0 / d if d > 0 else 0.0 for d in p.densities]
            elif p.rescale == "l1":
                sums = torch.zeros(self.T, 2, dtype=torch.float64)
                for start, stop in tp.chunks:
                    base, xs = self.load(tp, start, stop)
                    sums += torch.ops.mtmerge.dare_abs_sums(base, xs, dare_seed(self.cfg.seed, tp.name),
                                                            st.dare_keep, 0, start).cpu()
                    if tp.chunked:
                        self.drop_cache()
                        self.progress.add(self.chunk_bytes_in(tp, start, stop))
                st.scales = [b / a if b >= 1e-7 and a >= 1e-7 else 1.0 for b, a in sums.tolist()]
        return st

    def _local_selection(self, st: _TensorState) -> None:
        tp, sel = st.tp, st.sel
        for which in ("hi", "lo"):
            self._feed_selection(sel, tp, st.p, which)
            if which == "hi":
                sel.pick_bins()
        sel.finish()

    def _sign_total(self, st: _TensorState) -> int:
        """``sum sign(elected sum)`` over the tensor (the ``"majority"`` zero-sign pre-pass)."""
        tp, p = st.tp, st.p
        total = 0
        for ci, (start, stop) in enumerate(tp.chunks):
            base, xs = self.load(tp, start, stop)
            cons = self.consensus(p, base, xs)
            thr, cut = self.trim(st, ci, base, xs, cons)
            total += int(torch.ops.mtmerge.elect_sign_total(
                base, xs, p.weights, st.scales, thr, cut, dare_seed(self.cfg.seed, tp.name), st.dare_keep,
                p.knobs.elect, p.knobs.elect_weighted, cons, start))
            if tp.chunked or self.global_sel is not None:
                self.drop_cache()
                self.progress.add(self.chunk_bytes_in(tp, start, stop))
        return total

    def merge_tensor(self, tp: TensorPlan) -> None:
        try:
            if tp.merged:
                self._merge(tp)
            else:
                self._copy(tp)
        except ValueError as exc:
            message = _task_names(str(exc), self.cfg.paths)
            if not message.startswith("tensor "):
                message = f"tensor {tp.name!r}: {message}"
            raise ValueError(message) from None
        finally:
            self.drop_cache()
        self.progress.tensor_done()
        if self.slowdown:
            time.sleep(self.slowdown)

    def _copy(self, tp: TensorPlan) -> None:
        item = ST_DTYPES[tp.out_code][1]
        for start, stop in tp.chunks:
            self.writer.write(tp.name, self.plan.base.raw(tp.name, start * item, stop * item), start * item)
            self.progress.add((stop - start) * item)

    def _merge(self, tp: TensorPlan) -> None:
        st = self._state(tp)
        p = st.p
        if p.knobs is not None and self.majority:
            if self.global_fill is not None:
                st.zero_fill = self.global_fill
            else:
                total = self._sign_total(st)
                st.zero_fill = (total > 0) - (total < 0)
        if p.knobs is None:
            elect, elect_weighted, merge, divisor = "none", False, "sum", "count"
        else:
            elect, elect_weighted = p.knobs.elect, p.knobs.elect_weighted
            merge, divisor = p.knobs.merge, p.knobs.divisor
        out_dtype = tp.out_dtype
        direct = out_dtype in COMPUTE_DTYPES
        item = ST_DTYPES[tp.out_code][1]
        for ci, (start, stop) in enumerate(tp.chunks):
            base, xs = self.load(tp, start, stop)
            cons = self.consensus(p, base, xs)
            thr, cut = self.trim(st, ci, base, xs, cons)
            out = self.pool.get("out", out_dtype if direct else torch.float32, stop - start)
            torch.ops.mtmerge.merge_fused(base, xs, p.weights, st.scales, thr, cut,
                                          dare_seed(self.cfg.seed, tp.name), st.dare_keep, cons, elect,
                                          elect_weighted, st.zero_fill, merge, divisor, p.lam, False, out, 0, True,
                                          start)
            if not direct:
                out = out.to(out_dtype)
            if out.device.type != "cpu":
                out = out.cpu()
            self.writer.write(tp.name, out.view(torch.uint8).numpy(), start * item)
            del out
            self.drop_cache()
            self.progress.add(self.chunk_bytes_in(tp, start, stop))

    def merge_pass(self) -> None:
        self.progress.start_pass("merge")
        for tp in self.mine:
            self.merge_tensor(tp)


# ---- entry point ---------------------------------------------------------------------------


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _write_aux(plan: MergePlan, tmp: Path) -> None:
    cfg = plan.config
    out_dtype = cfg.out_dtype or cfg.dtype
    for src in plan.aux_files:
        dst = tmp / src.name
        if src.name == "config.json" and out_dtype is not None:
            try:
                data = json.loads(src.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict):
                name = str(out_dtype).removeprefix("torch.")
                data["torch_dtype"] = name
                if "dtype" in data:
                    data["dtype"] = name
                write_text_synced(dst, json.dumps(data, indent=2) + "\n")
                continue
        shutil.copyfile(src, dst)
    if cfg.text:
        write_text_synced(tmp / CONFIG_RECORD, cfg.text)


def merge_checkpoints(
    config: MergeConfig | dict | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    dry_run: bool = False,
    progress: bool | None = None,
    chunk_bytes: int | str | None = None,
    device: str | torch.device | None = None,
) -> MergeSummary:
    """Merge local safetensors checkpoints as a mergekit-style config says, streaming.

    Parameters
    ----------
    config : MergeConfig, dict, str or PathLike
        The config: an object, a parsed mapping, a YAML file path or YAML text (see
        :mod:`mtmerge.merging.config`).
    out_dir : str or PathLike, optional
        Output directory (required unless ``dry_run``). Created atomically; an existing one
        is an error unless ``overwrite``.
    overwrite : bool
        Replace an existing ``out_dir``, once the new output is complete.
    max_shard_size : int or str
        Largest shard, e.g. ``"5GB"`` (default, 5 * 10**9 bytes) or ``"2GiB"``.
    dry_run : bool
        Validate and print the plan (tensors, bytes, predicted peak memory); write nothing.
    progress : bool, optional
        Show the progress line on stderr (default: when stderr is a terminal; rank 0 only).
    chunk_bytes : int or str, optional
        Tensors with buffers larger than this are processed in chunks (default 256 MiB).
    device : str or torch.device, optional
        Where the ops run (default CPU; ``cuda:LOCAL_RANK`` under an nccl process group).

    Returns
    -------
    MergeSummary
        Tensors, bytes, time, throughput, peak RSS and the output directory.

    Raises
    ------
    ValueError
        Bad config (naming the key), mismatched checkpoints (listing the first mismatches),
        pickle checkpoints, NaN/Inf in a task vector (naming the tensor and model).
    FileNotFoundError
        A missing config, checkpoint or output parent directory.
    FileExistsError
        ``out_dir`` exists and ``overwrite`` is False.
    OSError
        Not enough disk space for the output.
    """
    start_time = time.perf_counter()
    cfg = load_config(config)
    max_shard = parse_size(max_shard_size, "max_shard_size")
    chunk = None if chunk_bytes is None else parse_size(chunk_bytes, "chunk_bytes")
    if out_dir is None and not dry_run:
        raise ValueError("out_dir is required (or pass dry_run=True)")
    dist = _Dist.setup()
    return _merge(cfg, out_dir, dist, overwrite=overwrite, max_shard=max_shard, dry_run=dry_run, progress=progress,
                  chunk=chunk, device=device, start_time=start_time)


def _merge(cfg: MergeConfig, out_dir, dist: _Dist, *, overwrite: bool, max_shard: int, dry_run: bool,
           progress: bool | None, chunk: int | None, device, start_time: float) -> MergeSummary:
    plan: MergePlan = dist.phase(build_plan, cfg, chunk_bytes=chunk, max_shard_size=max_shard)
    try:
        if dry_run:
            if dist.rank == 0:
                print(plan.describe(out_dir, dist.world), flush=True)
            seconds = time.perf_counter() - start_time
            return MergeSummary(len(plan.tensors), plan.bytes_in, plan.bytes_out, seconds, 0.0,
                                plan.predicted_peak(), None if out_dir is None else Path(out_dir), dry_run=True,
                                bytes_read=plan.bytes_read, shards=len(plan.layouts), world_size=dist.world,
                                predicted_peak_bytes=plan.predicted_peak())
        return _run(plan, Path(out_dir), dist, overwrite=overwrite, progress=progress, device=device,
                    start_time=start_time)
    finally:
        for ckpt in (plan.base, *plan.models):
            ckpt.close()


def _run(plan: MergePlan, out_dir: Path, dist: _Dist, *, overwrite: bool, progress: bool | None, device,
         start_time: float) -> MergeSummary:
    cfg = plan.config
    output = OutputDir(out_dir, overwrite)
    if device is None:
        device = dist.device
    device = torch.device(device)

    def prepare() -> str | None:
        if dist.rank != 0:
            return None
        output.check()
        for path in cfg.paths:
            if _inside(path, output.out_dir):
                raise ValueError(f"the input {str(path)!r} is inside the output directory {str(output.out_dir)!r}")
        plan.check_disk(out_dir)
        tmp = output.create()
        ShardWriter(tmp, plan.layouts).create()
        _write_aux(plan, tmp)
        return str(tmp)

    try:
        tmp = dist.broadcast(dist.phase(prepare))
        writer = ShardWriter(Path(tmp), plan.layouts)
        try:
            enabled = (sys.stderr.isatty() if progress is None else bool(progress)) and dist.rank == 0
            engine = _Engine(plan, dist, writer, Progress(0, 0, False), device)
            work = sum(tp.in_nbytes * tp.reads for tp in engine.mine)
            engine.progress = Progress(work, len(engine.mine), enabled)
            if cfg.scope == "global":
                engine.global_selection()
            dist.phase(engine._wrap, engine.merge_pass)
            engine.progress.close()
            dist.phase(writer.close)
        finally:
            writer.close(sync=False)

        def commit() -> None:
            if dist.rank == 0:
                writer.write_index()
                output.commit()

        dist.phase(commit)
    finally:
        if dist.rank == 0:
            output.abort()
    seconds = time.perf_counter() - start_time
    rss = torch.tensor([peak_rss()], dtype=torch.int64)
    dist.all_reduce(rss, op="max")
    return MergeSummary(len(plan.tensors), plan.bytes_in, plan.bytes_out, seconds, plan.bytes_in / max(seconds, 1e-9),
                        int(rss.item()), output.out_dir, bytes_read=plan.bytes_read, shards=len(plan.layouts),
                        world_size=dist.world, predicted_peak_bytes=plan.predicted_peak())
