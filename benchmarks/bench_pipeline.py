"""Benchmark: the end-to-end checkpoint merge (``mtmerge merge``) vs ``mergekit-yaml``.

What is merged: a locally generated Llama-architecture Hugging Face checkpoint (random weights,
bf16): a base model and 4 fine-tunes, each a directory with ``config.json`` (LlamaForCausalLM
fields) and sharded safetensors plus ``model.safetensors.index.json``, tensor names exactly as
transformers' Llama (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``model.layers.{i}.mlp.{gate,up,down}_proj.weight``, the two RMSNorms, ``model.norm.weight``,
``lm_head.weight``). Base weights ~ N(0, 0.02^2) (norms = 1); fine-tune t = base + 0.002 * (0.6 c
+ 0.8 e_t), with c shared by all fine-tunes and e_t its own (so the sign election has real
work). Generation streams tensor by tensor: each safetensors header is written up front from
the known shapes and every tensor's bytes are appended as soon as it is drawn, so memory stays
at a few tensors whatever the model size. The models are cached under ``--work-dir`` (one
folder per ``--size``, reused while the spec in ``spec.json`` matches).

    python benchmarks/bench_pipeline.py                       # ~0.48B params, ties per tensor + global, mergekit
    python benchmarks/bench_pipeline.py --size tiny           # ~10M params: a smoke run (seconds)
    python benchmarks/bench_pipeline.py --no-mergekit --size small
    python benchmarks/bench_pipeline.py --mergekit-yaml /path/to/venv/bin/mergekit-yaml
    python benchmarks/bench_pipeline.py --gpu --size small    # GPU mode: the engine's passes on CUDA

What is measured: each merge runs once per ``--repeats`` in a fresh subprocess, timed from
spawn to exit (wall clock: interpreter start-up, imports, reading, merging and writing the
output all count), with the peak resident set size taken as the larger of (a) the child's
``ru_maxrss`` from ``os.wait4`` (the kernel's high-water mark of the largest process in the
tree) and (b) the largest sum of RSS over the child's process tree seen by polling with
psutil every 20 ms (catches worker processes). RSS includes the mmapped safetensors pages a
process has touched, for both tools alike. Also recorded: CPU seconds (user + system from the
same ``wait4``; less sensitive than wall time to other jobs on a shared machine) and the 1-min
load average before each run (a value above the core count means the timings were contended).
The runs:

* ``mtmerge ties (tensor)``: ``python -m mtmerge merge cfg_ties_tensor.yaml -o OUT`` with
  ``parameters: {scope: tensor, flavor: mergekit}`` (per-tensor trim threshold, mergekit's
  semantics, so its output is comparable with mergekit's).
* ``mtmerge ties (global)``: the same with ``scope: global`` (one trim threshold per model over
  all its tensors; mergekit has no such mode).
* ``mergekit ties``: ``mergekit-yaml cfg_mergekit.yaml OUT --lazy-unpickle --no-copy-tokenizer``
  (CPU; ``--no-cuda`` is its default) on the same YAML minus mtmerge's extra keys (``scope``,
  ``flavor``). mergekit is found via ``--mergekit-yaml``, else ``/work/mk-venv/bin/mergekit-yaml``
  if it exists, else ``mergekit-yaml`` on PATH; without it those rows are skipped (said so).
  Install it in its own venv (its requirements include transformers and datasets), with the
  CPU torch first: ``python3 -m venv /work/mk-venv && /work/mk-venv/bin/pip install torch==2.13.0
  && /work/mk-venv/bin/pip install mergekit==0.1.5 -c <(echo torch==2.13.0)``.

The YAML (mergekit's format): ``merge_method: ties``, ``base_model``, ``models`` with
``parameters: {weight, density}`` (weights ``--weights``, default 1.0 0.8 0.6 0.4; density
``--density``, default 0.2), ``parameters: {normalize: true, lambda: 1.0}``, ``dtype: bfloat16``.
The input files are in the page cache for every run (they were just generated or read), so
the times are of a warm cache for both tools.

Report: a markdown table (seconds, CPU seconds, peak RSS GiB, mergekit seconds / ours = "x faster",
our peak / mergekit's), the issue's targets (>= 10x faster than mergekit, <= 0.5x its peak RSS) marked
``ok`` / ``MISS``, and how far the outputs agree: every tensor of both outputs is loaded (one at
a time) and compared: fraction of differing entries, max abs difference, and the fraction
differing by more than one bf16 ulp of the value. Exact agreement is not expected: mergekit
computes the task vectors, trims and the disjoint mean in bf16, and breaks ties in the trim
threshold by ``argsort`` order. So, to tell which side is off, a few tensors (two layer-0
projections, a middle ``down_proj``, two norms) of each per-tensor output are also checked
against a float64 evaluation of mergekit's own ties formula on the same bf16 inputs (exact
task vectors, trim of ``max(1, int(density * n))`` entries with ties kept in index order),
rounded to bf16: the fraction of entries off that reference, and by more than one ulp.
Results also go to ``WORK_DIR/SIZE/results.json``, logs to ``WORK_DIR/SIZE/logs``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
import yaml
from safetensors import safe_open

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK_DIR = Path("/tmp/mtmerge-bench-pipeline")
DEFAULT_MERGEKIT = Path("/work/mk-venv/bin/mergekit-yaml")
GENERATOR_VERSION = 1
TASKS = 4
GIB = 1024**3

# ---- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaSpec:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def config_json(self) -> dict[str, Any]:
        """A transformers LlamaConfig as ``save_pretrained`` writes it (the fields mergekit reads)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_bias": False,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.46.0",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every parameter, in the order transformers' Llama registers (and saves) them."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}"
            out += [
                (f"{p}.self_attn.q_proj.weight", (self.num_attention_heads * self.head_dim, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, self.num_attention_heads * self.head_dim)),
                (f"{p}.mlp.gate_proj.weight", (i, h)),
                (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i)),
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab_size, h))]
        return out

    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())


SIZES: dict[str, LlamaSpec] = {
    # ~9.9M: smoke tests
    "tiny": LlamaSpec(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=10000),
    # ~71M
    "small": LlamaSpec(hidden_size=512, intermediate_size=1376, num_hidden_layers=12, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=32000),
    # ~477M: the "about 0.5B"
    "0.5b": LlamaSpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=32, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=32000),
}

# ---- streaming safetensors writer ------------------------------------------------------------

_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


class StreamingSafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header (known shapes) first, then each
    tensor's bytes as it arrives, in the declared order. Never holds more than one tensor."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> None:
        self.path = path
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._pending: list[tuple[str, tuple[int, ...]]] = list(entries)
        for name, shape in entries:
            nbytes = math.prod(shape) * self.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data start is 8-byte aligned, as safetensors writes it
        self._file: BinaryIO = open(path, "wb")  # closed in close()
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, shape = self._pending.pop(0)
        if name != expected_name or tuple(tensor.shape) != shape or tensor.dtype != self.dtype:
            raise ValueError(f"{self.path}: expected {expected_name} {shape}, got {name} {tuple(tensor.shape)}")
        self._file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        if self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} tensors never written")
        self._file.close()


def _shard(tensors: list[tuple[str, tuple[int, ...]]], shards: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of roughly equal size (HF's sharding keeps the registration order)."""
    total = sum(math.prod(s) for _, s in tensors)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    done = 0
    for name, shape in tensors:
        if groups[-1] and done >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, shape))
        done += math.prod(shape)
    return groups


def model_names() -> list[str]:
    return ["base", *(f"ft{t}" for t in range(TASKS))]


def generate_models(spec: LlamaSpec, root: Path, shards: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """Base + TASKS fine-tunes under ``root/<name>``, all written in one streaming pass."""
    tensors = spec.tensors()
    groups = _shard(tensors, shards)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total_size = sum(math.prod(s) for _, s in tensors) * itemsize
    names = model_names()
    for name in names:
        d = root / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(spec.config_json(), indent=2) + "\n")
        (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    weight_map: dict[str, str] = {}
    index = 0
    for g, group in enumerate(groups):
        fname = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        with ExitStack() as stack:
            writers = []
            for name in names:
                w = StreamingSafetensorsWriter(root / name / fname, group, dtype)
                stack.callback(w._file.close)
                writers.append(w)
            for tname, shape in group:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
                index += 1
                if tname.endswith("norm.weight"):
                    base = torch.ones(shape)
                else:
                    base = torch.randn(shape, generator=gen).mul_(0.02)
                writers[0].write(tname, base.to(dtype))
                common = torch.randn(shape, generator=gen).mul_(0.6 * 0.002)
                for w in writers[1:]:
                    ft = torch.randn(shape, generator=gen).mul_(0.8 * 0.002).add_(common).add_(base)
                    w.write(tname, ft.to(dtype))
                    del ft
                del base, common
                weight_map[tname] = fname
            for w in writers:
                w.close()
    index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    for name in names:
        (root / name / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


def ensure_models(spec: LlamaSpec, size_dir: Path, shards: int, seed: int, regenerate: bool) -> Path:
    """The cached models for ``spec`` (generated when missing or made with another spec)."""
    models = size_dir / "models"
    want = {"generator": GENERATOR_VERSION, "spec": asdict(spec), "shards": shards, "seed": seed, "tasks": TASKS}
    stamp = models / "spec.json"
    if not regenerate and stamp.exists() and json.loads(stamp.read_text()) == want:
        if all((models / n / "model.safetensors.index.json").exists() for n in model_names()):
            print(f"models: reusing {models}")
            return models
    print(f"models: generating base + {TASKS} fine-tunes ({spec.num_params() / 1e6:.1f}M params each, bf16, "
          f"{shards} shards) under {models} ...", flush=True)
    start = time.perf_counter()
    if stamp.exists():
        stamp.unlink()
    models.mkdir(parents=True, exist_ok=True)
    generate_models(spec, models, shards, seed)
    stamp.write_text(json.dumps(want, indent=2) + "\n")
    print(f"models: generated in {time.perf_counter() - start:.1f} s", flush=True)
    return models


# ---- checkpoint reading ----------------------------------------------------------------------


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file of an HF checkpoint folder (index or single file)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    out: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # safe_open is not a mapping
                out[name] = path
    return out


def iter_tensor_pairs(a_dir: Path, b_dir: Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    a_files, b_files = checkpoint_files(a_dir), checkpoint_files(b_dir)
    for name in a_files:
        if name not in b_files:
            continue
        with safe_open(str(a_files[name]), framework="pt") as fa, safe_open(str(b_files[name]), framework="pt") as fb:
            yield name, fa.get_tensor(name), fb.get_tensor(name)


@dataclass
class Agreement:
    a: str
    b: str
    tensors: int = 0
    entries: int = 0
    differing: int = 0
    beyond_one_ulp: int = 0
    max_abs_diff: float = 0.0
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    dtype_mismatch: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def differing_fraction(self) -> float:
        return self.differing / self.entries if self.entries else 0.0

    @property
    def beyond_ulp_fraction(self) -> float:
        return self.beyond_one_ulp / self.entries if self.entries else 0.0


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits), as float32."""
    _, exponent = torch.frexp(x.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8)


def compare_outputs(a_label: str, a_dir: Path, b_label: str, b_dir: Path) -> Agreement:
    agreement = Agreement(a_label, b_label)
    try:
        a_names, b_names = set(checkpoint_files(a_dir)), set(checkpoint_files(b_dir))
        agreement.only_in_a = sorted(a_names - b_names)
        agreement.only_in_b = sorted(b_names - a_names)
        for name, ta, tb in iter_tensor_pairs(a_dir, b_dir):
            if ta.dtype != tb.dtype:
                agreement.dtype_mismatch.append(f"{name}: {ta.dtype} vs {tb.dtype}")
            if ta.shape != tb.shape:
                agreement.error = f"{name}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}"
                return agreement
            fa, fb = ta.float(), tb.float()
            diff = (fa - fb).abs_()
            agreement.tensors += 1
            agreement.entries += diff.numel()
            agreement.differing += int(torch.count_nonzero(diff))
            agreement.beyond_one_ulp += int(torch.count_nonzero(diff > bf16_ulp(fb)))
            agreement.max_abs_diff = max(agreement.max_abs_diff, float(diff.max()) if diff.numel() else 0.0)
    except Exception as exc:  # report, do not lose the timings
        agreement.error = repr(exc)
    return agreement


def load_tensor(model_dir: Path, name: str) -> torch.Tensor:
    with safe_open(str(checkpoint_files(model_dir)[name]), framework="pt") as f:
        return f.get_tensor(name)


def reference_ties(base: torch.Tensor, fts: Sequence[torch.Tensor], weights: Sequence[float],
                   density: float) -> torch.Tensor:
    """mergekit's ties formula (magnitude trim of k = max(1, int(density * n)) per task, weighted
    sign election by sum, disjoint weighted mean, lambda 1) in float64, ties at the trim
    threshold kept in index order. Returns the float64 result (not rounded)."""
    b = base.double().reshape(-1)
    w = torch.tensor(list(weights), dtype=torch.float64)[:, None]
    deltas = torch.stack([ft.double().reshape(-1) - b for ft in fts])
    k = max(1, int(density * b.numel()))
    mask = torch.zeros_like(deltas)
    for t in range(len(fts)):
        mask[t, torch.argsort(deltas[t].abs(), descending=True, stable=True)[:k]] = 1
    deltas = deltas * mask * w
    majority = (deltas.sum(0) >= 0).double() * 2 - 1
    agree = deltas.sign() == majority
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (b + (deltas * agree).sum(0) / divisor).reshape(base.shape)


@dataclass
class ReferenceCheck:
    label: str
    tensors: list[str] = field(default_factory=list)
    entries: int = 0
    differing: int = 0
    beyond_one_ulp: int = 0
    max_abs_err: float = 0.0
    error: str | None = None


def reference_tensor_names(spec: LlamaSpec) -> list[str]:
    mid, last = spec.num_hidden_layers // 2, spec.num_hidden_layers - 1
    return ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
            f"model.layers.{mid}.mlp.down_proj.weight", f"model.layers.{last}.post_attention_layernorm.weight",
            "model.norm.weight"]


def check_against_reference(outputs: Sequence[tuple[str, Path]], models: Path, names: Sequence[str],
                            weights: Sequence[float], density: float) -> list[ReferenceCheck]:
    """Each output's tensors ``names`` vs :func:`reference_ties` rounded to bf16."""
    checks = [ReferenceCheck(label) for label, _ in outputs]
    for name in names:
        base = load_tensor(models / "base", name)
        fts = [load_tensor(models / f"ft{t}", name) for t in range(TASKS)]
        ref = reference_ties(base, fts, weights, density)
        ref_rounded = ref.to(base.dtype).double()
        ulp = bf16_ulp(ref.float()).double()
        for check, (_, out_dir) in zip(checks, outputs, strict=True):
            try:
                got = load_tensor(out_dir, name).double()
                err = (got - ref_rounded).abs()
                check.tensors.append(name)
                check.entries += err.numel()
                check.differing += int(torch.count_nonzero(err))
                check.beyond_one_ulp += int(torch.count_nonzero(err > ulp))
                check.max_abs_err = max(check.max_abs_err, float((got - ref).abs().max()))
            except Exception as exc:  # report, do not lose the rest
                check.error = repr(exc)
    return checks


# ---- measured subprocess runs ----------------------------------------------------------------


@dataclass
class RunResult:
    label: str
    cmd: list[str]
    out_dir: str
    seconds: list[float] = field(default_factory=list)
    peak_rss_bytes: list[int] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    load_average: list[float] = field(default_factory=list)
    returncode: int | None = None
    log: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.returncode == 0 and bool(self.seconds)

    @property
    def time(self) -> float:
        return statistics.median(self.seconds)

    @property
    def peak(self) -> int:
        return max(self.peak_rss_bytes)


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


def run_measured(cmd: list[str], env: dict[str, str], log_path: Path,
                 timeout: float) -> tuple[float, int, int, float]:
    """Run ``cmd`` in a fresh process (own session); return (wall seconds, peak RSS bytes, exit code,
    CPU seconds = user + system of the process and its waited-for children)."""
    try:
        import psutil  # noqa: F401

        poll = True
    except ImportError:
        poll = False
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                start_new_session=True)
        polled = 0
        done = threading.Event()

        def poller() -> None:
            nonlocal polled
            while not done.is_set():
                polled = max(polled, _tree_rss(proc.pid))
                done.wait(0.02)

        def killer() -> None:
            if not done.wait(timeout):
                try:
                    os.killpg(proc.pid, 9)  # the group of the process this function started
                except ProcessLookupError:
                    pass

        threads = [threading.Thread(target=killer, daemon=True)]
        if poll:
            threads.append(threading.Thread(target=poller, daemon=True))
        for t in threads:
            t.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        for t in threads:
            t.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    peak = max(usage.ru_maxrss * 1024, polled)  # ru_maxrss is in KiB on Linux
    return seconds, peak, proc.returncode, usage.ru_utime + usage.ru_stime


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- configs ---------------------------------------------------------------------------------


def merge_config(models: Path, weights: Sequence[float], density: float, scope: str | None,
                 flavor: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"normalize": True, "lambda": 1.0}
    if scope is not None:
        params["scope"] = scope
    if flavor is not None:
        params["flavor"] = flavor
    return {
        "merge_method": "ties",
        "base_model": str(models / "base"),
        "models": [{"model": str(models / f"ft{t}"), "parameters": {"weight": float(w), "density": float(density)}}
                   for t, w in enumerate(weights)],
        "parameters": params,
        "dtype": "bfloat16",
    }


def find_mergekit(explicit: str | None) -> str | None:
    if explicit:
        return explicit if Path(explicit).exists() or shutil.which(explicit) else None
    if DEFAULT_MERGEKIT.exists():
        return str(DEFAULT_MERGEKIT)
    return shutil.which("mergekit-yaml")


# ---- main ------------------------------------------------------------------------------------


def _fmt_ratio(x: float | None, suffix: str = "x") -> str:
    return "-" if x is None else f"{x:.2f}{suffix}"


# ---- GPU mode: the engine's per-tensor passes on CUDA ----------------------------------------------


def gpu_main(args: argparse.Namespace) -> int:
    """The passes the pipeline's engine runs per tensor, on CUDA tensors of the model's distinct
    shapes (bf16, 4 fine-tunes), timed with do_bench: the per-tensor TIES merge (scope "tensor",
    mtmerge's mergekit flavor), the streaming top-k's histogram pass and the merge pass given the
    thresholds (scope "global"), beside the floor; summed over the model's tensors as an estimate
    of the merge's GPU time without I/O (no checkpoint is written or read)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.gpu_mode import bench_ms, floor_ms, markdown_table, require_gpu, write_json
    from mtmerge.ops.recipe import FLAVORS, MergeRecipe

    device_name = require_gpu(args.device)
    spec = SIZES[args.size]
    counts: dict[tuple[int, ...], int] = {}
    for _, shape in spec.tensors():
        counts[shape] = counts.get(shape, 0) + 1
    weights = tuple(args.weights)
    recipe = MergeRecipe(weights=weights, knobs=FLAVORS[args.flavor] if args.flavor in FLAVORS else FLAVORS["mergekit"],
                         densities=(args.density,) * len(weights))
    ops = torch.ops.mtmerge
    print(f"GPU mode on {device_name}: size {args.size} ({spec.num_params():,} params, {len(counts)} distinct shapes), "
          f"bf16, {len(weights)} fine-tunes, density {args.density}; do_bench medians in ms")
    rows, totals = [], {"floor": 0.0, "tensor scope": 0.0, "histogram pass": 0.0, "merge pass": 0.0}
    for shape, count in sorted(counts.items(), key=lambda item: -math.prod(item[0])):
        gen = torch.Generator().manual_seed(math.prod(shape))
        base = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        fts = [(base.float() + torch.randn(shape, generator=gen) * 0.002).to(torch.bfloat16) for _ in weights]
        base, fts = base.to(args.device), [f.to(args.device) for f in fts]
        out = torch.empty_like(base)
        n = base.numel()
        thr, cut = ops.delta_threshold(base=base, finetuned=fts, ks=recipe.ks(n), selection=recipe.selection(),
                                       allow_nonfinite=False, consensus=None)
        fused = dict(base=base, finetuned=fts, task_scalars=recipe.task_scalars(base.device),
                     task_trim=recipe.task_trim(thr, cut), consensus=None, rule=recipe.rule(check_finite=False),
                     merge_scalars=recipe.merge_scalars(base.device), out=out)
        ms = {
            "floor": floor_ms([base, *fts], out),
            "tensor scope": bench_ms(lambda base=base, fts=fts, out=out: mtmerge_ties(base, fts, weights, args, out)),
            "histogram pass": bench_ms(lambda base=base, fts=fts: ops.magnitude_histogram(
                base=base, finetuned=fts, shift=16, bits=15, prefixes=[0] * len(fts), prefix_shift=31,
                consensus=None)),
            "merge pass": bench_ms(lambda fused=fused: ops.merge_fused(**fused)),
        }
        for key in totals:
            totals[key] += count * ms[key]
        rows.append({"shape": list(shape), "count": count, "ms": ms})
    table = [[str(tuple(r["shape"])), r["count"], *(r["ms"][k] for k in totals)] for r in rows]
    table.append(["model total", sum(r["count"] for r in rows), *totals.values()])
    print(markdown_table(["shape", "tensors", "floor ms", "tensor-scope ties ms", "histogram pass ms",
                          "merge pass ms"], table))
    print(f"\nmodel: tensor-scope merge / floor = {totals['tensor scope'] / totals['floor']:.1f}; "
          f"global scope (one histogram pass + the merge pass) / floor = "
          f"{(totals['histogram pass'] + totals['merge pass']) / totals['floor']:.1f}")
    write_json(args.json, {"bench": "pipeline", "device": device_name, "size": args.size, "rows": rows,
                           "totals_ms": totals})
    return 0


def mtmerge_ties(base, fts, weights, args, out):
    import mtmerge

    return mtmerge.ties_merge(base, fts, args.density, list(weights), flavor=args.flavor, out=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b", help="model preset (default: 0.5b)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="models, configs, outputs, logs")
    parser.add_argument("--shards", type=int, default=2, help="safetensors shards per input model (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated weights")
    parser.add_argument("--regenerate", action="store_true", help="regenerate the models even if cached")
    parser.add_argument("--generate-only", action="store_true", help="only generate (or check) the models")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--weights", type=float, nargs=TASKS, default=[1.0, 0.8, 0.6, 0.4])
    parser.add_argument("--flavor", default="mergekit", help="mtmerge's ties flavor (default: mergekit)")
    parser.add_argument("--scopes", nargs="+", choices=["tensor", "global"], default=["tensor", "global"])
    parser.add_argument("--no-mtmerge", action="store_true", help="skip the mtmerge runs")
    parser.add_argument("--no-mergekit", action="store_true", help="skip the mergekit run")
    parser.add_argument("--mergekit-yaml", default=None,
                        help=f"mergekit-yaml executable (default: {DEFAULT_MERGEKIT} if present, else PATH)")
    parser.add_argument("--mergekit-args", nargs=argparse.REMAINDER, default=None,
                        help="replace the default mergekit options (--lazy-unpickle --no-copy-tokenizer); last")
    parser.add_argument("--repeats", type=int, default=1, help="runs per merge (median time, max peak)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is killed")
    parser.add_argument("--no-compare", action="store_true", help="skip the output comparison")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merged checkpoints")
    parser.add_argument("--gpu", action="store_true",
                        help="GPU mode: the engine's per-tensor passes on CUDA (do_bench), no checkpoints")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="GPU mode's device (cpu: a smoke run of the script, not GPU figures)")
    parser.add_argument("--json", default=None, help="write the GPU mode's figures to this file")
    args = parser.parse_args(argv)
    if args.gpu:
        return gpu_main(args)

    spec = SIZES[args.size]
    size_dir = args.work_dir / args.size
    print(f"size {args.size}: hidden {spec.hidden_size}, intermediate {spec.intermediate_size}, "
          f"{spec.num_hidden_layers} layers, {spec.num_attention_heads} heads ({spec.num_key_value_heads} kv), "
          f"vocab {spec.vocab_size} -> {spec.num_params():,} params ({spec.num_params() * 2 / GIB:.2f} GiB bf16)")
    models = ensure_models(spec, size_dir, args.shards, args.seed, args.regenerate)
    if args.generate_only:
        return 0

    cfg_dir, out_root, log_dir = size_dir / "configs", size_dir / "out", size_dir / "logs"
    for d in (cfg_dir, out_root, log_dir):
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}

    planned: list[tuple[str, list[str], Path]] = []
    if not args.no_mtmerge:
        for scope in args.scopes:
            cfg = cfg_dir / f"cfg_ties_{scope}.yaml"
            cfg.write_text(yaml.safe_dump(merge_config(models, args.weights, args.density, scope, args.flavor),
                                          sort_keys=False))
            out = out_root / f"mtmerge-{scope}"
            planned.append((f"mtmerge ties ({scope})", [sys.executable, "-m", "mtmerge", "merge", str(cfg),
                                                         "-o", str(out)], out))
    mergekit_note = ""
    if not args.no_mergekit:
        mk = find_mergekit(args.mergekit_yaml)
        if mk is None:
            mergekit_note = ("mergekit: SKIPPED: no mergekit-yaml found (pass --mergekit-yaml, or install it in "
                             f"{DEFAULT_MERGEKIT.parent.parent}; see the module docstring)")
            print(mergekit_note)
        else:
            cfg = cfg_dir / "cfg_mergekit.yaml"
            cfg.write_text(yaml.safe_dump(merge_config(models, args.weights, args.density, None, None),
                                          sort_keys=False))
            out = out_root / "mergekit"
            extra = args.mergekit_args if args.mergekit_args is not None else ["--lazy-unpickle", "--no-copy-tokenizer"]
            planned.append(("mergekit ties", [mk, str(cfg), str(out), *extra], out))

    results: list[RunResult] = []
    for label, cmd, out in planned:
        result = RunResult(label, cmd, str(out))
        results.append(result)
        log = log_dir / (out.name + ".log")
        result.log = str(log)
        print(f"run: {label}: {' '.join(cmd)}", flush=True)
        for _ in range(max(1, args.repeats)):
            if out.exists():
                shutil.rmtree(out)
            load = os.getloadavg()[0]
            seconds, peak, code, cpu = run_measured(cmd, env, log, args.timeout)
            result.returncode = code
            if code != 0:
                result.error = f"exit code {code}; log {log}:\n{_tail(log)}"
                print(f"  FAILED in {seconds:.1f} s ({result.error})", flush=True)
                break
            result.seconds.append(seconds)
            result.peak_rss_bytes.append(peak)
            result.cpu_seconds.append(cpu)
            result.load_average.append(load)
            print(f"  {seconds:.1f} s (CPU {cpu:.1f} s), peak RSS {peak / GIB:.2f} GiB; 1-min load average "
                  f"before: {load:.2f}", flush=True)

    by_label = {r.label: r for r in results}
    mk_run = by_label.get("mergekit ties")
    mk_ok = mk_run is not None and mk_run.ok

    print()
    print(f"## {args.size}: {spec.num_params() / 1e6:.0f}M params (bf16), base + {TASKS} fine-tunes, ties density "
          f"{args.density}, weights {args.weights}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print()
    print("| run | seconds | CPU s | peak RSS GiB | mergekit s / ours (faster) | ours RSS / mergekit RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    checks: list[str] = []
    for r in results:
        if not r.ok:
            print(f"| {r.label} | FAILED | - | - | - | - |")
            continue
        speed = mk_run.time / r.time if mk_ok and r is not mk_run else None
        rss = r.peak / mk_run.peak if mk_ok and r is not mk_run else None
        print(f"| {r.label} | {r.time:.1f} | {statistics.median(r.cpu_seconds):.1f} | {r.peak / GIB:.2f} | "
              f"{_fmt_ratio(speed)} | {_fmt_ratio(rss)} |")
        if speed is not None and rss is not None:
            checks.append(f"{r.label}: {speed:.1f}x faster (target >= 10: {'ok' if speed >= 10 else 'MISS'}), "
                          f"{rss:.2f}x mergekit's peak RSS (target <= 0.5: {'ok' if rss <= 0.5 else 'MISS'})")
    print()
    if mergekit_note:
        print(mergekit_note)
    elif mk_run is not None and not mk_ok:
        print("mergekit run failed: no ratios")
    for line in checks:
        print(line)
    for r in results:
        if r.error:
            print(f"{r.label}: {r.error}")

    agreements: list[Agreement] = []
    if not args.no_compare:
        ok_runs = [r for r in results if r.ok]
        pairs: list[tuple[RunResult, RunResult]] = []
        if mk_ok:
            pairs += [(r, mk_run) for r in ok_runs if r is not mk_run]
        tensor_run, global_run = by_label.get("mtmerge ties (tensor)"), by_label.get("mtmerge ties (global)")
        if tensor_run and global_run and tensor_run.ok and global_run.ok:
            pairs.append((global_run, tensor_run))
        if pairs:
            print()
            print("Output agreement (every tensor; differences in bf16 outputs, ulp = bf16 spacing at the value):")
            print()
            print("| outputs | tensors | entries differ | > 1 ulp | max abs diff | notes |")
            print("| --- | ---: | ---: | ---: | ---: | --- |")
        for a, b in pairs:
            ag = compare_outputs(a.label, Path(a.out_dir), b.label, Path(b.out_dir))
            agreements.append(ag)
            notes = []
            if "global" in a.label and "global" not in b.label:
                notes.append("different trim scope: not expected to match")
            if ag.only_in_a or ag.only_in_b:
                notes.append(f"names only in one: {ag.only_in_a[:3]} / {ag.only_in_b[:3]}")
            if ag.dtype_mismatch:
                notes.append(f"dtype differs: {ag.dtype_mismatch[0]}")
            if ag.error:
                notes.append(f"ERROR {ag.error}")
            print(f"| {a.label} vs {b.label} | {ag.tensors} | {ag.differing_fraction:.3%} | "
                  f"{ag.beyond_ulp_fraction:.3%} | {ag.max_abs_diff:.3g} | {'; '.join(notes)} |")

    ref_checks: list[ReferenceCheck] = []
    ref_runs = [r for r in results if r.ok and "global" not in r.label]
    if not args.no_compare and ref_runs:
        names = reference_tensor_names(spec)
        ref_checks = check_against_reference([(r.label, Path(r.out_dir)) for r in ref_runs], models, names,
                                             args.weights, args.density)
        print()
        print(f"Accuracy vs a float64 reference of mergekit's ties formula (rounded to bf16) on {len(names)} "
              f"tensors: {', '.join(names)}:")
        print()
        print("| output | entries | differ from reference | > 1 ulp | max abs err (vs unrounded) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for c in ref_checks:
            frac = c.differing / c.entries if c.entries else 0.0
            ulp_frac = c.beyond_one_ulp / c.entries if c.entries else 0.0
            print(f"| {c.label} | {c.entries} | {frac:.3%} | {ulp_frac:.3%} | {c.max_abs_err:.3g} |"
                  + (f" ERROR {c.error}" if c.error else ""))

    report = {
        "size": args.size, "spec": asdict(spec), "params": spec.num_params(), "density": args.density,
        "weights": args.weights, "flavor": args.flavor, "torch_threads": torch.get_num_threads(),
        "runs": [{**asdict(r), "median_seconds": r.time if r.ok else None,
                  "max_peak_rss_bytes": r.peak if r.ok else None} for r in results],
        "checks": checks, "mergekit_note": mergekit_note,
        "agreement": [{**asdict(a), "differing_fraction": a.differing_fraction,
                       "beyond_ulp_fraction": a.beyond_ulp_fraction} for a in agreements],
        "reference": [asdict(c) for c in ref_checks],
    }
    (size_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {size_dir / 'results.json'}; logs: {log_dir}")
    if not args.keep_outputs:
        for r in results:
            shutil.rmtree(r.out_dir, ignore_errors=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
