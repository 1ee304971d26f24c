"""merge_checkpoints end to end on tiny models: every merge_method against the mtmerge ops called
directly on the loaded tensors, chunking, scope global against a whole-model op call, dtypes,
output layout, validation before writing, atomic output, the CLI, and bounded memory."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors import safe_open

import mtmerge
from mtmerge import cli
from mtmerge.merging import dare_seed, merge_checkpoints
from mtmerge.ops.recipe import MergeRecipe
from tests.merging.conftest import INT_TENSOR, PYTHON, SHAPES, config, make_family, python_env, save_checkpoint

METHODS = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "consensus_ties", "consensus_task_arithmetic"]


def load_dir(path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def direct(method: str, name: str, b, fts, w, d, lam, *, flavor="mergekit", normalize=None, seed=0, rescale=None):
    """The merge of one tensor by calling the ops directly (the pipeline's documented mapping)."""
    from mtmerge.merging.config import METHODS as TABLE

    if normalize is None:
        normalize = TABLE[method][3]
    merge = "mean" if normalize else "sum"
    if rescale is None:
        rescale = "l1" if TABLE[method][4] else "none"
    if method in ("task_arithmetic", "dare_linear", "consensus_task_arithmetic") and normalize:
        w = [v / sum(w) for v in w]
    if method == "task_arithmetic":
        return mtmerge.task_arithmetic(b, fts, w, lam)
    if method == "ties":
        return mtmerge.ties_merge(b, fts, d, w, lam, flavor=flavor, merge=merge)
    if method == "dare_ties":
        return mtmerge.ties_merge(b, fts, d, w, lam, flavor=flavor, merge=merge, sparsify="dare",
                                  seed=dare_seed(seed, name), rescale=rescale)
    if method == "dare_linear":
        return MergeRecipe(weights=tuple(w), lam=lam, sparsify="dare", densities=tuple(d), seed=dare_seed(seed, name),
                           rescale=rescale).merge(b, fts, torch.empty_like(b))
    if method == "consensus_ties":
        return mtmerge.consensus_merge(b, fts, w, lam, method="ties", density=d, flavor=flavor, merge=merge)
    return mtmerge.consensus_merge(b, fts, w, lam, method="task_arithmetic")


@pytest.mark.parametrize("method", METHODS)
def test_each_method_equals_the_ops_called_directly(tmp_path, method):
    base_dir, dirs, base, models = make_family(tmp_path)
    cfg = config(method, base_dir, dirs, weights=[1.0, 0.7, 0.4], densities=[0.3, 0.5, 0.7], seed=11)
    cfg["parameters"]["lambda"] = 0.9
    summary = merge_checkpoints(cfg, tmp_path / "out")
    out = load_dir(tmp_path / "out")
    assert summary.tensors == len(out) == len(SHAPES) + 1
    for name in SHAPES:
        fts = [m[name] for m in models]
        ref = direct(method, name, base[name], fts, [1.0, 0.7, 0.4], [0.3, 0.5, 0.7], 0.9, seed=11)
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], ref), (method, name)
    assert torch.equal(out[INT_TENSOR], base[INT_TENSOR])  # integer buffers are copied from the base


def test_per_tensor_filters(tmp_path):
    base_dir, dirs, base, models = make_family(tmp_path, num_models=2)
    cfg = config("ties", base_dir, dirs)
    cfg["models"][0]["parameters"]["density"] = [{"filter": "mlp", "value": 0.1}, {"filter": "*", "value": 0.5}]
    cfg["models"][1]["parameters"] = {"weight": [{"filter": "self_attn", "value": 2.0}, {"value": 0.5}]}
    cfg["parameters"] = {"density": 0.7, "lambda": [{"filter": "norm", "value": 0.5}, {"value": 1.0}]}
    merge_checkpoints(cfg, tmp_path / "out")
    out = load_dir(tmp_path / "out")
    for name in SHAPES:
        d = [0.1 if "mlp" in name else 0.5, 0.7]
        w = [1.0, 2.0 if "self_attn" in name else 0.5]
        lam = 0.5 if "norm" in name else 1.0
        assert torch.equal(out[name], direct("ties", name, base[name], [m[name] for m in models], w, d, lam)), name


def test_dare_linear_matches_public_dare_composition(tmp_path):
    """dare_linear is base + sum_t w_t dare(tau_t) (public ops, unfused: equal up to rounding)."""
    base_dir, dirs, base, models = make_family(tmp_path, dtype=torch.float32)
    cfg = config("dare_linear", base_dir, dirs, weights=[1.0, 0.5, 0.25], densities=[0.5, 0.5, 0.9], seed=3)
    merge_checkpoints(cfg, tmp_path / "out")
    out = load_dir(tmp_path / "out")
    for name in SHAPES:
        tvs = [m[name] - base[name] for m in models]
        sparse = mtmerge.dare(tvs, [0.5, 0.5, 0.9], seed=dare_seed(3, name), rescale="l1")
        ref = base[name] + sum(w * s for w, s in zip([1.0, 0.5, 0.25], sparse, strict=True))
        torch.testing.assert_close(out[name], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_chunked_tensors(tmp_path, method):
    """Chunking changes nothing, DARE included (chunks pass their start as the ops' index_offset)."""
    base_dir, dirs, _, _ = make_family(tmp_path, coarse=True)
    cfg = config(method, base_dir, dirs, seed=5)
    whole = merge_checkpoints(cfg, tmp_path / "whole")
    chunked = merge_checkpoints(cfg, tmp_path / "chunked", chunk_bytes=512)
    assert whole.bytes_out == chunked.bytes_out
    a, b = load_dir(tmp_path / "whole"), load_dir(tmp_path / "chunked")
    assert any(t.numel() > 256 for t in a.values())  # some tensor really is split (512 bytes of bf16)
    for name in a:
        assert torch.equal(a[name], b[name]), (method, name)
    again = merge_checkpoints(cfg, tmp_path / "again", chunk_bytes=512)
    assert again.bytes_out == chunked.bytes_out
    assert all(torch.equal(t, load_dir(tmp_path / "again")[n]) for n, t in b.items())  # deterministic


@pytest.mark.parametrize("flavor", ["mergekit", "peft", "paper"])
@pytest.mark.parametrize("method", ["ties", "consensus_ties"])
@pytest.mark.parametrize("chunk", [None, 512])
def test_scope_global_is_one_whole_model_merge(tmp_path, flavor, method, chunk):
    """Exact global top-k: equal to the op on the whole model flattened into one tensor
    (sorted names), heavy ties included; and different from the per-tensor scope."""
    base_dir, dirs, base, models = make_family(tmp_path, coarse=True, int_tensor=False)
    cfg = config(method, base_dir, dirs, densities=[0.1, 0.25, 0.5], scope="global", flavor=flavor)
    merge_checkpoints(cfg, tmp_path / "global", chunk_bytes=chunk)
    names = sorted(SHAPES)
    flat = lambda ts: torch.cat([ts[n].reshape(-1) for n in names])  # noqa: E731
    b, fts, w, d = flat(base), [flat(m) for m in models], [1.0, 1.5, 2.0], [0.1, 0.25, 0.5]
    if method == "ties":
        ref = mtmerge.ties_merge(b, fts, d, w, flavor=flavor)
    else:
        ref = mtmerge.consensus_merge(b, fts, w, method="ties", density=d, flavor=flavor)
    assert torch.equal(flat(load_dir(tmp_path / "global")), ref)
    cfg["parameters"]["scope"] = "tensor"
    merge_checkpoints(cfg, tmp_path / "tensor", chunk_bytes=chunk)
    assert not torch.equal(flat(load_dir(tmp_path / "tensor")), ref)


def test_scope_global_keeps_k_per_task(tmp_path):
    base_dir, dirs, base, _models = make_family(tmp_path, num_models=1, coarse=True, int_tensor=False,
                                               dtype=torch.float32)
    cfg = config("ties", base_dir, dirs, densities=[0.3], scope="global", flavor="peft")
    merge_checkpoints(cfg, tmp_path / "out", chunk_bytes=256)
    out = load_dir(tmp_path / "out")
    n = sum(t.numel() for t in base.values())
    kept = sum(int((out[k] != base[k]).sum()) for k in base)
    assert kept == int(0.3 * n)  # one task: the trim alone decides (coarse deltas are never 0)


def test_dtype_and_out_dtype(tmp_path):
    base_dir, dirs, base, models = make_family(tmp_path, dtype=torch.float16)
    cfg = {**config("ties", base_dir, dirs), "dtype": "float32", "out_dtype": "bfloat16"}
    merge_checkpoints(cfg, tmp_path / "out")
    out = load_dir(tmp_path / "out")
    name = "model.layers.0.mlp.up_proj.weight"
    ref = mtmerge.ties_merge(base[name].float(), [m[name].float() for m in models], [0.2, 0.4, 0.6],
                             [1.0, 1.5, 2.0], flavor="mergekit", out=torch.empty(base[name].shape,
                                                                                  dtype=torch.bfloat16))
    assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], ref)
    assert out[INT_TENSOR].dtype == torch.int64
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_output_layout_shards_index_and_aux_files(tmp_path):
    base_dir, dirs, base, models = make_family(tmp_path, base_shards=3)
    cfg = config("task_arithmetic", base_dir, dirs)
    summary = merge_checkpoints(cfg, tmp_path / "out", max_shard_size="1KB")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) == summary.shards > 2
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(base)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "mtmerge_config.yml"} <= set(files)
    assert (tmp_path / "out" / "config.json").read_text() == (base_dir / "config.json").read_text()
    merged = load_dir(tmp_path / "out")
    for name in SHAPES:
        assert torch.equal(merged[name], mtmerge.task_arithmetic(base[name], [m[name] for m in models],
                                                                 [1.0, 1.5, 2.0]))
    single = merge_checkpoints(cfg, tmp_path / "single")
    assert single.shards == 1
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()
    assert (tmp_path / "single" / "model.safetensors").is_file()


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".mtmerge-"))


def test_mismatched_checkpoints_are_refused_before_writing(tmp_path):
    base_dir, dirs, _base, models = make_family(tmp_path)
    bad = dict(models[1])
    bad.pop("model.norm.weight")
    bad["model.extra.weight"] = torch.zeros(3)
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 8, dtype=torch.bfloat16)
    save_checkpoint(tmp_path / "bad", bad)
    cfg = config("ties", base_dir, [dirs[0], tmp_path / "bad"])
    with pytest.raises(ValueError) as info:
        merge_checkpoints(cfg, tmp_path / "out")
    message = str(info.value)
    assert message.startswith("models[1] (")
    assert "missing tensor 'model.norm.weight'" in message
    assert "'model.layers.0.self_attn.q_proj.weight' has shape [16, 8], the base has [16, 16]" in message
    assert "unexpected tensor 'model.extra.weight'" in message
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_failure_mid_merge_leaves_nothing(tmp_path):
    base_dir, dirs, _base, models = make_family(tmp_path)
    poisoned = dict(models[2])
    poisoned["model.norm.weight"] = poisoned["model.norm.weight"].clone()
    poisoned["model.norm.weight"][3] = float("nan")  # the last tensor merged
    save_checkpoint(tmp_path / "nan", poisoned)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    cfg = config("ties", base_dir, [dirs[0], dirs[1], tmp_path / "nan"])
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight'.*models\[2\]"):
        merge_checkpoints(cfg, tmp_path / "out", overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="NaN"):
        merge_checkpoints(cfg, tmp_path / "new")
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path, capsys):
    base_dir, dirs, _base, _models = make_family(tmp_path)
    cfg = config("task_arithmetic", base_dir, dirs)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_checkpoints(cfg, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    merge_checkpoints(cfg, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="inside the output directory"):
        merge_checkpoints({**cfg, "base_model": str(base_dir)}, base_dir, overwrite=True)


def test_disk_space_is_checked_before_writing(tmp_path, monkeypatch):
    import shutil as shutil_module

    base_dir, dirs, _, _ = make_family(tmp_path)
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr("mtmerge.merging.plan.shutil.disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OSError, match="not enough disk space"):
        merge_checkpoints(config("ties", base_dir, dirs), tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_cli_merge_dry_run_and_summary(tmp_path, capsys):
    base_dir, dirs, _, _ = make_family(tmp_path)
    cfg_path = tmp_path / "merge.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(config("ties", base_dir, dirs, scope="global")))
    assert cli.main(["merge", str(cfg_path), "-o", str(tmp_path / "out"), "--dry-run", "--chunk-size", "1KiB"]) == 0
    text = capsys.readouterr().out
    for part in ("mtmerge merge plan", "method     ties (flavor mergekit, scope global): 3 model(s) + base",
                 "8 merged, 1 copied from base", "2 whole-model selection pass(es) + 1 merge pass",
                 "predicted peak RSS", "dry run: 9 tensors"):
        assert part in text
    assert not (tmp_path / "out").exists()
    assert cli.main(["merge", str(cfg_path), "-o", str(tmp_path / "out"), "--no-progress",
                     "--max-shard-size", "2KB"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("merged 9 tensors") and "peak RSS" in captured.out
    assert captured.err == ""
    assert cli.main(["merge", str(cfg_path), "-o", str(tmp_path / "out")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_progress_line(tmp_path, capsys):
    base_dir, dirs, _, _ = make_family(tmp_path)
    merge_checkpoints(config("ties", base_dir, dirs), tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "\r" in err and "tensors" in err and "/s" in err and "ETA" in err and err.endswith("\n")


_MEMORY_SCRIPT = """
import json, sys
from mtmerge.merging import build_plan, load_config, merge_checkpoints
cfg = load_config(sys.argv[1])
plan = build_plan(cfg, chunk_bytes=1 << 20)
s = merge_checkpoints(cfg, sys.argv[2], chunk_bytes=1 << 20)
print(json.dumps({"peak": s.peak_rss_bytes, "baseline": plan.baseline_rss, "chunk": plan.chunk_buffer_bytes(),
                  "bytes_in": s.bytes_in}))
"""


def test_peak_memory_is_bounded_whatever_the_model_size(tmp_path):
    import yaml

    results = []
    for layers in (2, 40):
        shapes = {f"layers.{i}.{n}": s for i in range(layers)
                  for n, s in (("up", (512, 256)), ("down", (256, 512)), ("norm", (256,)))}
        shapes["embed"] = (8192, 256)  # 4 MiB in bf16: in chunks of 1 MiB
        root = tmp_path / str(layers)
        base, dirs, _, _ = make_family(root, num_models=2, shapes=shapes, int_tensor=False)
        (root / "merge.yaml").write_text(yaml.safe_dump(config("ties", base, dirs)))
        proc = subprocess.run([PYTHON, "-c", _MEMORY_SCRIPT, str(root / "merge.yaml"), str(root / "out")],
                              capture_output=True, text=True, timeout=300, env=python_env())
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    small, big = results
    assert big["bytes_in"] > 3 * small["bytes_in"]
    for r in results:
        # (T + 2) chunk buffers over the interpreter's baseline, plus a small constant workspace
        assert r["peak"] <= r["baseline"] + 4 * r["chunk"] + 48 * 2**20, results
    assert abs(big["peak"] - small["peak"]) < 16 * 2**20, results


def test_environment_has_no_network_dependency(tmp_path, monkeypatch):
    """No network access is attempted: sockets are unusable during a merge."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    base_dir, dirs, _, _ = make_family(tmp_path)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    merge_checkpoints(config("dare_ties", base_dir, dirs), tmp_path / "out")
    assert os.path.isdir(tmp_path / "out")
