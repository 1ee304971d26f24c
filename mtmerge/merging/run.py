"""``merge_checkpoints``: the streaming checkpoint merge (``mtmerge merge CONFIG -o OUT_DIR``).

The entry point: load the config, plan (:mod:`mtmerge.merging.plan`), then run the passes of
:class:`~mtmerge.merging.engine.Engine` into a temporary output directory and move it into
place atomically (:mod:`mtmerge.merging.writer`). What each method computes, and how chunked
tensors and ``scope: global`` are handled, is described in :mod:`mtmerge.merging.engine` and
:mod:`mtmerge.merging.streaming_topk`.

Distributed (``torchrun --nproc-per-node N -m mtmerge merge ...``, see
:mod:`mtmerge.merging.distributed`): tensors are assigned to ranks by a size-balanced greedy
(plan.py); rank 0 creates the temporary directory, the shard files (headers, final sizes) and
the base's non-tensor files; every rank writes its tensors' bytes at their planned offsets;
rank 0 writes the index and moves the directory into place after all ranks have finished.
The files are byte-identical to a single-process merge. Each phase ends with an agreement
step: an error on any rank stops every rank with that error (no hang) and removes the
temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mtmerge.merging.config import MergeConfig, load_config
from mtmerge.merging.distributed import Dist
from mtmerge.merging.engine import Engine
from mtmerge.merging.plan import MergePlan, build_plan
from mtmerge.merging.progress import Progress, peak_rss
from mtmerge.merging.writer import OutputDir, ShardWriter, format_bytes, parse_size, write_text_synced

CONFIG_RECORD = "mtmerge_config.yml"


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
    dist = Dist.setup()
    return _merge(cfg, out_dir, dist, overwrite=overwrite, max_shard=max_shard, dry_run=dry_run, progress=progress,
                  chunk=chunk, device=device, start_time=start_time)


def _merge(cfg: MergeConfig, out_dir: str | os.PathLike | None, dist: Dist, *, overwrite: bool, max_shard: int,
           dry_run: bool, progress: bool | None, chunk: int | None, device: str | torch.device | None,
           start_time: float) -> MergeSummary:
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


def _run(plan: MergePlan, out_dir: Path, dist: Dist, *, overwrite: bool, progress: bool | None,
         device: str | torch.device | None, start_time: float) -> MergeSummary:
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
            engine = Engine(plan, dist, writer, Progress(0, 0, False), device)
            work = sum(tp.in_nbytes * tp.reads for tp in engine.mine)
            engine.progress = Progress(work, len(engine.mine), enabled)
            if cfg.scope == "global":
                engine.global_selection()
            dist.phase(engine.wrap, engine.merge_pass)
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
