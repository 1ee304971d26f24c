"""The merge plan: validation, chunking, output layout, memory and disk estimates, dry-run text.

Built from a :class:`~mtmerge.merging.config.MergeConfig` before anything is written:

* every checkpoint is opened (headers only) and checked: the same tensor names and shapes as
  the base, float where the base is float, data inside the files; the error lists the first
  mismatches of each model;
* every tensor of the base is either *merged* (floating point) or *copied* from the base
  (integer/bool buffers such as ``position_ids``). Merged tensors are computed in the
  config's ``dtype`` (default: the base tensor's own, float32 for float64/float8) and
  written in ``out_dtype`` (default: ``dtype``, else the base tensor's dtype);
* a tensor whose buffers would exceed ``chunk_bytes`` (default 256 MiB) is processed in
  chunks of whole rows (flat ranges when one row is bigger than a chunk), each chunk at
  most ``chunk_bytes`` in any of its buffers;
* the output layout (shards, headers, offsets) is fixed here: see ``writer.py``;
* the predicted peak resident memory is the interpreter's baseline plus ``T + 2`` chunk
  buffers (``T`` models and the base mapped, one output buffer) plus a small workspace
  (histograms, consensus masks, 2 MiB temporaries): independent of the model's size.
"""

from __future__ import annotations

import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mtmerge.merging.checkpoint import ST_DTYPES, TORCH_TO_ST, Checkpoint, TensorInfo
from mtmerge.merging.config import MergeConfig
from mtmerge.merging.writer import ShardLayout, format_bytes, shard_layouts
from mtmerge.ops.recipe import FLAVORS, k_for

DEFAULT_CHUNK_BYTES = 256 * 2**20
SUBBLOCK = 1 << 18  # elements per temporary block of the histogram passes (multiple of 8)
CONSENSUS_BLOCK = 1 << 18  # elements per block of the consensus-mask ops (multiple of 8)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_LISTED = 8


@dataclass
class TensorPlan:
    """How one output tensor is produced.

    Attributes
    ----------
    name, shape, numel : the tensor.
    merged : bool
        Merged from the task vectors (float), else copied from the base.
    compute_dtype : torch.dtype or None
        Inputs are cast to it (merged tensors only).
    out_code : str
        Output safetensors dtype code.
    chunks : tuple of (start, stop)
        Flat element ranges processed one at a time (one range: not chunked).
    in_nbytes : int
        Stored bytes of this tensor over the base and the models (base only if copied).
    out_nbytes : int
    first_chunk : int
        Global index of this tensor's first chunk (chunks are numbered in plan order).
    reads : int
        Reading passes over this tensor's inputs (for progress).
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    merged: bool
    compute_dtype: torch.dtype | None
    out_code: str
    chunks: tuple[tuple[int, int], ...]
    in_nbytes: int
    out_nbytes: int
    first_chunk: int = 0
    reads: int = 1

    @property
    def out_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.out_code][0]

    @property
    def chunked(self) -> bool:
        return len(self.chunks) > 1


@dataclass
class MergePlan:
    """Everything decided before a merge starts (see the module docstring)."""

    config: MergeConfig
    base: Checkpoint
    models: list[Checkpoint]
    tensors: list[TensorPlan]
    layouts: list[ShardLayout]
    chunk_bytes: int
    max_shard_size: int
    max_chunk_elems: int
    baseline_rss: int

    @property
    def num_tasks(self) -> int:
        return len(self.models)

    @property
    def merged(self) -> list[TensorPlan]:
        return [tp for tp in self.tensors if tp.merged]

    @property
    def bytes_in(self) -> int:
        """Stored bytes of every input tensor, each read once."""
        return sum(tp.in_nbytes for tp in self.tensors)

    @property
    def bytes_read(self) -> int:
        """Bytes read over all passes (progress total)."""
        return sum(tp.in_nbytes * tp.reads for tp in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(layout.size for layout in self.layouts)

    @property
    def num_chunks(self) -> int:
        return sum(len(tp.chunks) for tp in self.tensors)

    @property
    def aux_files(self) -> list[Path]:
        return list(self.base.aux_files())

    @property
    def global_passes(self) -> int:
        """Whole-model reading passes before the merge pass (scope global)."""
        if self.config.scope != "global":
            return 0
        majority = self.config.elect and FLAVORS[self.config.flavor].zero_sign == "majority"
        return 2 + int(majority)

    def workspace_bytes(self) -> int:
        """Memory besides the ``T + 2`` chunk buffers: histograms, masks, temporaries, the
        ops' selection windows, and some allocator slack (an estimate)."""
        t = self.num_tasks
        hist = t * (32768 + 65536) * 8 * 2
        temps = SUBBLOCK * 4 * 8
        ops = self.max_chunk_elems * 4 * t // 32  # the selection's candidate windows
        consensus = 0
        if self.config.consensus:
            consensus = (t + 1) * (self.max_chunk_elems + 7) // 8 + CONSENSUS_BLOCK * 4 * (t + 2)
        return hist + temps + ops + consensus + 8 * 2**20

    def chunk_buffer_bytes(self) -> int:
        """The largest chunk buffer (inputs in compute dtype, output in out dtype)."""
        best = 0
        for tp in self.merged:
            elems = max(stop - start for start, stop in tp.chunks)
            item = max(tp.compute_dtype.itemsize, ST_DTYPES[tp.out_code][1])
            best = max(best, elems * item)
        return best

    def predicted_peak(self) -> int:
        return self.baseline_rss + (self.num_tasks + 2) * self.chunk_buffer_bytes() + self.workspace_bytes()

    def memory_bound(self) -> int:
        """The issue's bound: ``(T + 2) x the largest chunk + 300 MB``."""
        return (self.num_tasks + 2) * self.chunk_buffer_bytes() + 300 * 10**6

    def assign_ranks(self, world_size: int) -> list[int]:
        """Rank of each tensor: greedy size balancing (biggest first, lowest loaded rank,
        ties by name and rank number): deterministic on every rank."""
        loads = [0] * world_size
        ranks = [0] * len(self.tensors)
        order = sorted(range(len(self.tensors)),
                       key=lambda i: (-self.tensors[i].in_nbytes * self.tensors[i].reads, self.tensors[i].name))
        for i in order:
            r = min(range(world_size), key=lambda q: (loads[q], q))
            ranks[i] = r
            loads[r] += self.tensors[i].in_nbytes * self.tensors[i].reads
        return ranks

    def describe(self, out_dir: str | os.PathLike | None = None, world_size: int = 1) -> str:
        """The dry-run report."""
        cfg = self.config
        merged = self.merged
        chunked = [tp for tp in merged if tp.chunked]
        lines = ["mtmerge merge plan"]
        method = cfg.merge_method
        extra = []
        if cfg.elect:
            extra.append(f"flavor {cfg.flavor}")
        if cfg.sparsify == "magnitude":
            extra.append(f"scope {cfg.scope}")
        if cfg.sparsify == "dare":
            extra.append(f"seed {cfg.seed}")
        lines.append(f"  method     {method}" + (f" ({', '.join(extra)})" if extra else "")
                     + f": {self.num_tasks} model(s) + base")
        lines.append(f"  base       {cfg.base_model}  ({len(self.base.tensors)} tensors, "
                     f"{format_bytes(self.base.nbytes)})")
        for t, ckpt in enumerate(self.models):
            first = merged[0].name if merged else ""
            w = cfg.weights(first)[t] if merged else 1.0
            d = cfg.densities(first)[t] if merged else 1.0
            lines.append(f"  models[{t}]  {ckpt.path}  (weight {w:g}, density {d:g}"
                         + (", per-tensor filters" if isinstance(cfg.models[t].weight, tuple)
                            or isinstance(cfg.models[t].density, tuple) else "") + ")")
        lines.append(f"  tensors    {len(self.tensors)}: {len(merged)} merged, {len(self.tensors) - len(merged)} "
                     f"copied from base; {len(chunked)} processed in chunks of <= {format_bytes(self.chunk_bytes)}")
        dtypes = sorted({(str(tp.compute_dtype).removeprefix("torch."), str(tp.out_dtype).removeprefix("torch."))
                         for tp in merged})
        lines.append("  dtypes     " + ", ".join(f"compute {c} -> out {o}" for c, o in dtypes))
        lines.append(f"  read       {format_bytes(self.bytes_in)} from {self.num_tasks + 1} checkpoints; "
                     f"{format_bytes(self.bytes_read)} over all passes")
        passes = "1 merge pass"
        if self.global_passes:
            passes = f"{self.global_passes} whole-model selection pass(es) + 1 merge pass (scope global)"
        lines.append(f"  passes     {passes}" + (f"; {world_size} ranks" if world_size > 1 else ""))
        lines.append(f"  write      {format_bytes(self.bytes_out)} in {len(self.layouts)} shard(s) (max "
                     f"{format_bytes(self.max_shard_size)})" + (" + index" if len(self.layouts) > 1 else "")
                     + f" + {len(self.aux_files)} file(s) from the base"
                     + (f" -> {out_dir}" if out_dir is not None else ""))
        chunk = self.chunk_buffer_bytes()
        lines.append(f"  memory     predicted peak RSS {format_bytes(self.predicted_peak())} per process = "
                     f"{format_bytes(self.baseline_rss)} baseline + {self.num_tasks + 2} x {format_bytes(chunk)} "
                     f"chunk buffers + {format_bytes(self.workspace_bytes())} workspace")
        if out_dir is not None:
            if Path(out_dir).exists():
                lines.append(f"  note       {out_dir} exists: the merge replaces it only with --overwrite")
            parent = Path(out_dir).absolute().parent
            if parent.is_dir():
                free = shutil.disk_usage(parent).free
                lines.append(f"  disk       {format_bytes(self.bytes_out)} needed, {format_bytes(free)} free "
                             f"in {parent}")
        return "\n".join(lines)

    def check_disk(self, out_dir: str | os.PathLike) -> None:
        parent = Path(out_dir).absolute().parent
        need = self.bytes_out + sum(p.stat().st_size for p in self.aux_files) + 16 * 2**20
        free = shutil.disk_usage(parent).free
        if free < need:
            raise OSError(f"not enough disk space in {str(parent)!r}: the merge writes {format_bytes(need)}, "
                          f"{format_bytes(free)} are free")


def current_rss() -> int:
    """Resident set size of this process now (bytes)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mismatches(base: Checkpoint, other: Checkpoint) -> tuple[list[str], int]:
    problems = []
    for name in base.names():
        info = other.tensors.get(name)
        ref = base.tensors[name]
        if info is None:
            problems.append(f"missing tensor {name!r}")
        elif info.shape != ref.shape:
            problems.append(f"{name!r} has shape {list(info.shape)}, the base has {list(ref.shape)}")
        elif info.is_float != ref.is_float:
            problems.append(f"{name!r} has dtype {info.dtype}, the base has {ref.dtype}")
    for name in other.names():
        if name not in base.tensors:
            problems.append(f"unexpected tensor {name!r} (not in the base)")
    return problems[:_MAX_LISTED], len(problems)


def open_checkpoints(config: MergeConfig) -> tuple[Checkpoint, list[Checkpoint]]:
    """Open the base and the models and check they match (names, shapes, float-ness)."""
    base = Checkpoint(config.base_model, "base_model")
    models = [Checkpoint(spec.path, f"models[{t}]") for t, spec in enumerate(config.models)]
    errors = []
    for t, ckpt in enumerate(models):
        listed, total = _mismatches(base, ckpt)
        if total:
            more = f"; ... and {total - len(listed)} more" if total > len(listed) else ""
            errors.append(f"models[{t}] ({str(ckpt.path)!r}) does not match base_model ({str(base.path)!r}): "
                          + "; ".join(listed) + more)
    if errors:
        raise ValueError("\n".join(errors))
    return base, models


def _chunks(numel: int, shape: tuple[int, ...], elems: int) -> tuple[tuple[int, int], ...]:
    if numel <= elems:
        return ((0, numel),)
    row = numel // shape[0] if len(shape) >= 2 and shape[0] else 1
    if row <= elems:
        elems = (elems // row) * row
    return tuple((s, min(numel, s + elems)) for s in range(0, numel, elems))


def _compute_dtype(config: MergeConfig, info: TensorInfo) -> torch.dtype:
    if config.dtype is not None:
        return config.dtype
    stored = info.torch_dtype
    return stored if stored in COMPUTE_DTYPES else torch.float32


def _out_code(config: MergeConfig, info: TensorInfo) -> str:
    if config.out_dtype is not None:
        return TORCH_TO_ST[config.out_dtype]
    if config.dtype is not None:
        return TORCH_TO_ST[config.dtype]
    return info.dtype


def _needs_selection(config: MergeConfig, tp_name: str, numel: int) -> bool:
    """Whether a magnitude trim of this tensor needs a selection (some task keeps 0 < k < n)."""
    if config.sparsify != "magnitude":
        return False
    if config.scope == "global":
        return True
    knobs = FLAVORS[config.flavor]
    for d in config.densities(tp_name):
        k = k_for(d, numel, knobs.k_rule)
        if knobs.selection == "geq" or 0 < k < numel:
            return True
    return False


def build_plan(config: MergeConfig, *, chunk_bytes: int | None = None, max_shard_size: int = 5 * 10**9,
               base: Checkpoint | None = None, models: list[Checkpoint] | None = None) -> MergePlan:
    """Validate the checkpoints and decide everything about the merge (see the module docstring)."""
    chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    if chunk_bytes < 64:
        raise ValueError(f"chunk_bytes must be at least 64, got {chunk_bytes}")
    if base is None or models is None:
        base, models = open_checkpoints(config)
    majority = config.elect and FLAVORS[config.flavor].zero_sign == "majority"
    tensors = []
    max_elems = 0
    first_chunk = 0
    for name in base.names():
        info = base.tensors[name]
        if info.is_float and info.numel > 0:
            compute = _compute_dtype(config, info)
            out_code = _out_code(config, info)
            out_item = ST_DTYPES[out_code][1]
            if ST_DTYPES[out_code][0] not in COMPUTE_DTYPES:
                out_item += 4  # a float32 buffer, then the cast
            elems = max(8, chunk_bytes // max(compute.itemsize, out_item))
            chunks = _chunks(info.numel, info.shape, elems)
            in_nbytes = info.nbytes + sum(m.tensors[name].nbytes for m in models)
            reads = 1
            if config.scope == "global":
                reads += 2 + int(majority)
            elif len(chunks) > 1:
                if _needs_selection(config, name, info.numel):
                    reads += 2
                if majority:
                    reads += 1
                if config.sparsify == "dare" and "l1" in (config.rescale(name),):
                    reads += 1
            tp = TensorPlan(name, info.shape, info.numel, True, compute, out_code, chunks, in_nbytes,
                            info.numel * ST_DTYPES[out_code][1], first_chunk, reads)
        else:
            elems = max(1, chunk_bytes // info.itemsize)
            chunks = tuple((s, min(info.numel, s + elems)) for s in range(0, info.numel, elems)) or ((0, 0),)
            tp = TensorPlan(name, info.shape, info.numel, False, None, info.dtype, chunks, info.nbytes, info.nbytes,
                            first_chunk, 1)
        if tp.merged:
            max_elems = max(max_elems, max(stop - start for start, stop in tp.chunks))
        first_chunk += len(tp.chunks)
        tensors.append(tp)
    entries = [(tp.name, tp.out_code, tp.shape, tp.out_nbytes) for tp in tensors]
    layouts = shard_layouts(entries, max_shard_size)
    return MergePlan(config, base, models, tensors, layouts, chunk_bytes, max_shard_size, max_elems, current_rss())
