"""The merge engine: every pass over the chunks of the tensors one rank merges.

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
* ``dare_linear``: DARE then the weighted sum (no election).
* ``consensus_ties`` / ``consensus_task_arithmetic``: :func:`mtmerge.consensus_merge`
  (TALL masks with ``tall_lambda``, at least ``k`` agreeing tasks).

Each tensor's merge is one :class:`~mtmerge.ops.recipe.MergeRecipe`; its methods build every
op argument (``task_trim``, ``task_scalars``, ``rule``, ``merge_scalars``). The per-tensor seed
``s`` of DARE is :func:`dare_seed` (a blake2b hash; the recipe turns it into the per-task keys
of :func:`mtmerge._rng.dare_task_key`, task offset 0): the masks do not depend on tensor order
or on the number of ranks. A tensor processed in chunks passes each chunk's start as the ops'
``index_offset``, so it draws exactly the unchunked mask; its L1 rescale uses the whole
tensor's sums.

Chunked tensors (bigger than ``chunk_bytes``). Elementwise methods just merge chunk by chunk.
A TIES trim needs the tensor's top-k: it is found by :mod:`mtmerge.merging.streaming_topk`
restricted to that tensor, and each chunk is merged with ``(threshold, ties kept in this
chunk)``: the result is bitwise identical to the unchunked merge. ``zero_sign="majority"``
(flavor ``paper``) sums the elected signs over all chunks first; the L1 rescale of DARE sums
over all chunks first. ``scope: global`` runs the same selection over the whole model first
(:meth:`Engine.global_selection`), and for ``"majority"`` one pass summing the elected signs
over the whole model (the paper's rule, global as in its code).

Device and host. Per-task scalars stay on the device: DARE's ``dare_abs_sums`` and the
"majority" ``elect_sign_total`` are summed over chunks as device tensors and handed to the
recipe (``l1_scales``, ``merge_scalars``) without a read-back. The host reads only what steers
the streaming selection (its histograms, :mod:`mtmerge.merging.streaming_topk`) and the merged
bytes it writes. NaN/Inf: ``merge_fused`` checks its inputs (``rule(check_finite=True)``)
unless an earlier pass over the same chunk already rejected them in every entry: the trim's
selection when it ranks every task (``delta_threshold``, or a streaming selection with every
task active), or the consensus pass (its ``merge_fused`` checks).

Testing hook: ``MTMERGE_MERGE_SLOWDOWN=SECONDS`` sleeps after each merged tensor (used by the
tests that kill a merge midway); it has no other effect.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mtmerge._library  # noqa: F401  (registers the ops)
from mtmerge._constants import INT64_MAX
from mtmerge.merging.checkpoint import ST_DTYPES, Checkpoint
from mtmerge.merging.config import MergeConfig
from mtmerge.merging.distributed import Dist
from mtmerge.merging.plan import COMPUTE_DTYPES, CONSENSUS_BLOCK, MergePlan, TensorPlan
from mtmerge.merging.progress import Progress
from mtmerge.merging.streaming_topk import Selection, Ties
from mtmerge.merging.writer import ShardWriter
from mtmerge.ops.recipe import MergeRecipe, normalized, resolve_knobs

Chunk = tuple[torch.Tensor, list[torch.Tensor]]  # (base, models) of one chunk, 1-D, compute dtype
_ops = torch.ops.mtmerge


def dare_seed(seed: int, name: str) -> int:
    """The DARE seed of tensor ``name``; its chunks use it with their start as index offset.

    Parameters
    ----------
    seed : int
        The config's ``seed``.
    name : str
        The tensor's name.

    Returns
    -------
    int
        In ``[0, 2**63)``: a blake2b hash of both, independent of tensor order and ranks.
    """
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def task_names(message: str, paths: list[Path]) -> str:
    """``message`` with the ops' ``finetuned[t]`` renamed to the config's ``models[t]``."""
    for t in range(len(paths) - 1, -1, -1):
        message = message.replace(f"finetuned[{t}]", f"models[{t}]")
    return message


@dataclass
class _TensorState:
    """Per-tensor decisions shared by its passes (the op arguments that do not change per chunk)."""

    tp: TensorPlan
    recipe: MergeRecipe
    sel: Selection | None = None  # a streaming selection (chunked tensor, or scope global)
    ties: Ties | None = None
    task_scalars: torch.Tensor | None = None  # float32 [T, 2] on the device
    rule: list[int] = field(default_factory=list)
    fixed_trim: torch.Tensor | None = None  # task_trim when it is the same for every chunk
    validated: bool = False  # a pass before the merge rejected NaN/Inf in every entry


class _Pool:
    """Reusable flat buffers (first-touch page faults cost more than the math on big tensors)."""

    def __init__(self, device: torch.device) -> None:
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


class Engine:
    """Runs the passes of one rank's share of a :class:`~mtmerge.merging.plan.MergePlan`.

    Each tensor's merge is described by one :class:`~mtmerge.ops.recipe.MergeRecipe`, whose
    methods build every op argument; per-task scalars stay on the device (the L1 rescale and
    the "majority" sign total are summed over chunks there).

    Parameters
    ----------
    plan : MergePlan
        The validated plan (tensors, chunks, layout).
    dist : Dist
        The process group; tensors are assigned to ranks by ``plan.assign_ranks``.
    writer : ShardWriter or None
        Where merged bytes go (None: passes that write nothing).
    progress : Progress
        The progress line.
    device : torch.device
        Where the ops run.
    """

    def __init__(self, plan: MergePlan, dist: Dist, writer: ShardWriter | None, progress: Progress,
                 device: torch.device) -> None:
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
        self.pool = _Pool(device)
        self.slowdown = float(os.environ.get("MTMERGE_MERGE_SLOWDOWN", "0") or 0)  # tests only
        self.global_sel: Selection | None = None
        self.global_ties: Ties | None = None
        self.global_sign_total: torch.Tensor | None = None  # int64 0-d on the device
        self._cache_key: Any = None
        self._cache: Any = None
        self._cons: Any = None
        self._mtl_args: dict[tuple[float, ...], dict[str, Any]] = {}  # consensus: tau_MTL's op arguments

    # -- recipe, inputs, consensus -------------------------------------------------------------

    def recipe(self, name: str) -> MergeRecipe:
        """The merge of tensor ``name`` (per-tensor filters of the config applied)."""
        cfg = self.cfg
        w = cfg.weights(name)
        normalize = cfg.normalize(name)
        if cfg.elect:
            knobs = resolve_knobs(cfg.flavor, merge="mean" if normalize else "sum")
        else:
            knobs = None
            if normalize:
                w = normalized(w)
        return MergeRecipe(weights=tuple(w), lam=cfg.lam(name), knobs=knobs, sparsify=cfg.sparsify,
                           densities=tuple(cfg.densities(name)), rescale=cfg.rescale(name),
                           seed=dare_seed(cfg.seed, name), task_offset=0)

    def chunk_bytes_in(self, tp: TensorPlan, start: int, stop: int) -> int:
        """Stored bytes one read of elements ``[start, stop)`` of ``tp`` costs."""
        if not tp.merged:
            return (stop - start) * ST_DTYPES[tp.out_code][1]
        return sum((stop - start) * c.tensors[tp.name].itemsize for c in self.ckpts)

    def load(self, tp: TensorPlan, start: int, stop: int) -> Chunk:
        """The chunk of the base and of every model, 1-D in the compute dtype (cached until
        :meth:`drop_cache`)."""
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
        """Forget the cached chunk and its consensus mask."""
        self._cache_key, self._cache, self._cons = None, None, None

    def consensus(self, recipe: MergeRecipe, base: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor | None:
        """The packed consensus mask of this chunk (None without consensus).

        Built sub-block by sub-block (no n-sized float temporary); equal to
        :func:`mtmerge.consensus_merge`'s. Its task-arithmetic pass rejects NaN/Inf inputs.
        """
        if not self.cfg.consensus:
            return None
        if self._cons is not None and self._cons[0] == self._cache_key and self._cache[0] is base:
            return self._cons[1]
        device, n = base.device, base.numel()
        args = self._mtl_args.get(recipe.weights)
        if args is None:  # tau_MTL = sum_t w_t tau_t: op arguments built once per weight vector
            mtl = MergeRecipe(weights=recipe.weights, sparsify="none")
            args = self._mtl_args[recipe.weights] = {
                "task_scalars": mtl.task_scalars(device), "task_trim": mtl.task_trim(*mtl.keep_all(device)),
                "rule": mtl.rule(with_base=False, check_finite=True), "merge_scalars": mtl.merge_scalars(device)}
        lams = [float(self.cfg.tall_lambda)] * self.T
        out = torch.empty((n + 7) // 8, dtype=torch.uint8, device=device)
        for s in range(0, n, CONSENSUS_BLOCK):
            e = min(n, s + CONSENSUS_BLOCK)
            b, sub = base[s:e], [x[s:e] for x in xs]
            mtl = torch.empty(e - s, dtype=torch.float32, device=device)
            _ops.merge_fused(base=b, finetuned=sub, consensus=None, out=mtl, **args)
            masks = _ops.tall_masks(base=b, finetuned=sub, merged=mtl, lams=lams)
            out[s // 8:(e + 7) // 8] = _ops.consensus_mask(masks=masks, k=self.cfg.k)
        if self._cache is not None and self._cache[0] is base:
            self._cons = (self._cache_key, out)
        return out

    # -- trims ---------------------------------------------------------------------------------

    def trim(self, st: _TensorState, ci: int, base: torch.Tensor, xs: list[torch.Tensor],
             cons: torch.Tensor | None) -> torch.Tensor:
        """The ``task_trim`` (int64 ``[T, 4]``, on the device) of chunk ``ci`` of ``st``'s tensor."""
        if st.fixed_trim is not None:
            return st.fixed_trim
        recipe, tp, device = st.recipe, st.tp, base.device
        if self.cfg.sparsify != "magnitude":  # DARE or nothing: keep every entry before DARE
            st.fixed_trim = recipe.task_trim(*recipe.keep_all(device))
            return st.fixed_trim
        if st.sel is None:  # one chunk, tensor scope: the fused selection op
            st.fixed_trim = recipe.task_trim(*recipe.select(base, xs, cons))
            return st.fixed_trim
        sel, gid = st.sel, tp.first_chunk + ci
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
        thr, kept = sel.chunk_trim(taken)
        thresholds = torch.tensor(thr, dtype=torch.float32, device=device)
        kept_t = torch.tensor(kept, dtype=torch.int64, device=device)
        if any(0 < k < INT64_MAX for k in kept):
            cutoffs = _ops.tie_cutoffs(base=base, finetuned=xs, thresholds=thresholds, ties_kept=kept_t,
                                       consensus=cons)
            return recipe.task_trim(thresholds, cutoffs)
        task_trim = recipe.task_trim(thresholds, torch.where(kept_t == 0, torch.full_like(kept_t, -1), kept_t))
        if not alloc:  # no tie split between chunks: the same trim for every chunk
            st.fixed_trim = task_trim
        return task_trim

    def _selection_passes(self, tensors: list[TensorPlan], sel: Selection, which: str, label: str) -> None:
        self.progress.start_pass(label)
        for tp in tensors:
            self._feed_selection(sel, tp, self.recipe(tp.name), which)
            self.progress.tensor_done()

    def _feed_selection(self, sel: Selection, tp: TensorPlan, recipe: MergeRecipe, which: str) -> None:
        """One histogram pass of ``sel`` ("hi" or "lo") over the chunks of tensor ``tp``."""
        for ci, (start, stop) in enumerate(tp.chunks):
            base, xs = self.load(tp, start, stop)
            cons = self.consensus(recipe, base, xs)
            if which == "hi":
                sel.add_hi(base, xs, cons, f"tensor {tp.name!r}")
            else:
                sel.add_lo(tp.first_chunk + ci, base, xs, cons)
            self.drop_cache()
            self.progress.add(self.chunk_bytes_in(tp, start, stop))

    # -- scope global --------------------------------------------------------------------------

    def global_selection(self) -> None:
        """``scope: global``: every task's exact top-k over the whole model (all ranks), and
        for ``"majority"`` the elected signs summed over the whole model."""
        dist = self.dist
        merged = [tp for tp in self.plan.tensors if tp.merged]
        mine = [tp for tp in self.mine if tp.merged]
        n = sum(tp.numel for tp in merged)
        scope = self.recipe("")
        sel = Selection(scope.ks(n), n, scope.selection())
        if sel.active:
            dist.phase(self.wrap, self._selection_passes, mine, sel, "hi", "select 1/2")
            dist.all_reduce(sel.hi)
            sel.pick_bins()
            dist.phase(self.wrap, self._selection_passes, mine, sel, "lo", "select 2/2")
            dist.all_reduce(sel.lo)
            sel.finish()
        alloc = sel.to_allocate()
        if alloc and dist.world > 1:
            table = torch.zeros(self.plan.num_chunks, self.T, dtype=torch.int64)
            dist.phase(self.wrap, self._count_pass, mine, sel, alloc, table)
            dist.all_reduce(table)
            ties = Ties.from_table(alloc, table)
        else:
            ties = Ties(alloc)
        self.global_sel, self.global_ties = sel, ties
        if scope.needs_sign_total:
            total = torch.zeros((), dtype=torch.int64, device=self.device)
            dist.phase(self.wrap, self._sign_pass, mine, total)
            self.global_sign_total = dist.all_reduce(total)

    def _count_pass(self, tensors: list[TensorPlan], sel: Selection, alloc: dict[int, int],
                    table: torch.Tensor) -> None:
        self.progress.start_pass("count ties")
        for tp in tensors:
            recipe = self.recipe(tp.name)
            for ci, (start, stop) in enumerate(tp.chunks):
                gid = tp.first_chunk + ci
                tasks = [t for t in alloc if sel.inbin.get(gid, [1] * self.T)[t] > 0]
                if not tasks:
                    continue
                base, xs = self.load(tp, start, stop)
                cons = self.consensus(recipe, base, xs)
                for t, c in sel.count_ties(base, xs, cons, tasks).items():
                    table[gid, t] = c
                self.drop_cache()

    def _sign_pass(self, tensors: list[TensorPlan], total: torch.Tensor) -> None:
        self.progress.start_pass("elect signs")
        for tp in tensors:
            total += self._sign_total(self._state(tp))
            self.progress.tensor_done()

    # -- one tensor ----------------------------------------------------------------------------

    def wrap(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a pass, naming the model (``models[t]``) in op errors."""
        try:
            return fn(*args)
        except ValueError as exc:
            raise ValueError(task_names(str(exc), self.cfg.paths)) from None

    def _state(self, tp: TensorPlan) -> _TensorState:
        recipe = self.recipe(tp.name)
        st = _TensorState(tp, recipe)
        # NaN/Inf: the consensus pass rejects them in every chunk; so does the trim's selection
        # when it ranks every task's entries. Then the merge pass need not scan again.
        st.validated = self.cfg.consensus
        if self.cfg.sparsify == "magnitude":
            if self.global_sel is not None:
                st.sel, st.ties = self.global_sel, self.global_ties
            elif tp.chunked:
                st.sel = Selection(recipe.ks(tp.numel), tp.numel, recipe.selection())
                if st.sel.active:
                    self._local_selection(st)
                st.ties = Ties(st.sel.to_allocate())
            st.validated = st.validated or st.sel is None or st.sel.checks_every_task
        scales = None
        if recipe.needs_abs_sums:  # DARE's L1 rescale: sums over the whole tensor, on the device
            task_trim = recipe.task_trim(*recipe.keep_all(self.device))
            sums = torch.zeros(self.T, 2, dtype=torch.float64, device=self.device)
            for start, stop in tp.chunks:
                base, xs = self.load(tp, start, stop)
                sums += _ops.dare_abs_sums(base=base, finetuned=xs, task_trim=task_trim, index_offset=start)
                if tp.chunked:
                    self.drop_cache()
                    self.progress.add(self.chunk_bytes_in(tp, start, stop))
            scales = recipe.l1_scales(sums)
        st.task_scalars = recipe.task_scalars(self.device, scales)
        st.rule = recipe.rule(check_finite=not st.validated)
        return st

    def _local_selection(self, st: _TensorState) -> None:
        tp, sel = st.tp, st.sel
        for which in ("hi", "lo"):
            self._feed_selection(sel, tp, st.recipe, which)
            if which == "hi":
                sel.pick_bins()
        sel.finish()

    def _sign_total(self, st: _TensorState) -> torch.Tensor:
        """``sum sign(elected sum)`` over the tensor (the ``"majority"`` zero-sign pre-pass):
        int64 0-d on the device."""
        tp = st.tp
        total = torch.zeros((), dtype=torch.int64, device=self.device)
        for ci, (start, stop) in enumerate(tp.chunks):
            base, xs = self.load(tp, start, stop)
            cons = self.consensus(st.recipe, base, xs)
            total += _ops.elect_sign_total(base=base, finetuned=xs, task_scalars=st.task_scalars,
                                           task_trim=self.trim(st, ci, base, xs, cons), consensus=cons,
                                           rule=st.rule, index_offset=start)
            if tp.chunked or self.global_sel is not None:
                self.drop_cache()
                self.progress.add(self.chunk_bytes_in(tp, start, stop))
        return total

    def merge_tensor(self, tp: TensorPlan) -> None:
        """Merge (or copy, for a tensor the merge does not touch) ``tp`` into the output.

        Raises
        ------
        ValueError
            Naming the tensor and the model, e.g. for NaN/Inf in a task vector.
        """
        try:
            if tp.merged:
                self._merge(tp)
            else:
                self._copy(tp)
        except ValueError as exc:
            message = task_names(str(exc), self.cfg.paths)
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
        recipe = st.recipe
        sign_total = None
        if recipe.needs_sign_total:
            sign_total = self.global_sign_total if self.global_sign_total is not None else self._sign_total(st)
        merge_scalars = recipe.merge_scalars(self.device, sign_total)
        out_dtype = tp.out_dtype
        direct = out_dtype in COMPUTE_DTYPES
        item = ST_DTYPES[tp.out_code][1]
        for ci, (start, stop) in enumerate(tp.chunks):
            base, xs = self.load(tp, start, stop)
            cons = self.consensus(recipe, base, xs)
            task_trim = self.trim(st, ci, base, xs, cons)
            out = self.pool.get("out", out_dtype if direct else torch.float32, stop - start)
            _ops.merge_fused(base=base, finetuned=xs, task_scalars=st.task_scalars, task_trim=task_trim,
                             consensus=cons, rule=st.rule, merge_scalars=merge_scalars, out=out, index_offset=start)
            if not direct:
                out = out.to(out_dtype)
            if out.device.type != "cpu":
                out = out.cpu()  # the bytes go to the shard file
            self.writer.write(tp.name, out.view(torch.uint8).numpy(), start * item)
            del out
            self.drop_cache()
            self.progress.add(self.chunk_bytes_in(tp, start, stop))

    def merge_pass(self) -> None:
        """The last pass: merge (or copy) every tensor of this rank into the output."""
        self.progress.start_pass("merge")
        for tp in self.mine:
            self.merge_tensor(tp)
