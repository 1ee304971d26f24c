"""Smoke runs of the benchmark scripts at tiny sizes: the CPU modes' peer set-up (tests/peers/),
and each GPU mode's code path (``--gpu --device cpu``: the same code on CPU tensors, timed with a
plain timer, so a GPU machine's few minutes are not lost to a typo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, timeout=600):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize(("script", "args", "keys"), [
    ("bench_select.py", ["--gpu-sizes", "4096"], {"read_floor", "threshold", "torch.kthvalue"}),
    ("bench_merge.py", ["--gpu-sizes", "4096"], {"floor", "ties_merge", "selection", "paper-code"}),
    ("bench_pipeline.py", ["--size", "tiny"], {"floor", "tensor scope", "histogram pass", "merge pass"}),
])
def test_gpu_mode_code_path(tmp_path, script, args, keys):
    out = tmp_path / "figures.json"
    stdout = run(script, "--gpu", "--device", "cpu", "--json", str(out), *args)
    assert "smoke run" in stdout and "| " in stdout
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert rows and keys <= set(rows[0]["ms"]), rows[0]["ms"].keys()
    assert all(v > 0 for row in rows for v in row["ms"].values())


def test_merge_benchmark_cpu_mode_with_peers():
    stdout = run("bench_merge.py", "--size", "65536", "--peers-size", "65536", "--threads", "1", "--dtypes", "float32",
                 "--repeats", "1", "--peer-repeats", "1", "--no-peak")
    assert "tests/peers" in stdout or "real package" in stdout
    assert "| float32 | 1 |" in stdout
    assert "ties_merge flavor" in stdout  # the peers' outputs were compared


@pytest.mark.parametrize("mode", ["cpu", "gpu-code-path"])
def test_moe_benchmark_quick(tmp_path, mode):
    """bench_moe.py at tiny sizes: every column of every row is a finite, positive number (CPU mode
    ``--quick``; the GPU mode's code on CPU tensors), the ISA is named, the targets are checked."""
    out = tmp_path / "moe.json"
    extra = ["--gpu", "--device", "cpu"] if mode == "gpu-code-path" else ["--threads", "1"]
    stdout = run("bench_moe.py", "--quick", "--tokens", "1", "7", "--json", str(out), *extra, timeout=300)
    assert "| threads | T | active | ours ms |" in stdout and "Targets" in stdout
    if mode == "cpu":
        assert "ISA: " in stdout
    else:
        assert "smoke run" in stdout
    figures = json.loads(out.read_text())
    assert figures["bench"] == "moe" and figures["ours_backend"]
    rows = figures["rows"]
    assert {(r["dtype"], r["tokens"]) for r in rows} == {(d, t) for d in ("float32", "bfloat16") for t in (1, 7)}
    columns = {"ours", "eager", "grouped_mm", "read_floor", "gemm_floor", "floor", "ours_fb", "eager_fb",
               "grouped_mm_fb"}
    ratios = {"ours/floor", "eager/floor", "grouped_mm/floor", "ours_fb/ours"}
    for row in rows:
        assert not row["errors"], row["errors"]
        assert columns <= set(row["ms"]) and ratios <= set(row["ratios"]), row
        values = [*row["ms"].values(), *row["ratios"].values()]
        assert all(0 < v < float("inf") for v in values), row
        assert row["active_experts"] >= 1 and row["max_rel_diff_vs_eager"] < 0.05, row


@pytest.mark.parametrize("mode", ["cpu", "gpu-code-path"])
def test_lowrank_benchmark_quick(tmp_path, mode):
    """bench_lowrank.py --quick: every section's rows, each timing and ratio a finite positive
    number, ours agreeing with its peer (peft, the torch composition, the reference), the ISA named
    (CPU mode), the targets checked."""
    out = tmp_path / "lowrank.json"
    extra = ["--gpu", "--device", "cpu"] if mode == "gpu-code-path" else ["--threads", "1"]
    stdout = run("bench_lowrank.py", "--quick", "--json", str(out), *extra, timeout=300)
    assert "### lora" in stdout and "### linformer" in stdout and "### lama" in stdout and "Targets" in stdout
    assert ("ISA: " in stdout) if mode == "cpu" else ("smoke run" in stdout)
    figures = json.loads(out.read_text())
    assert figures["bench"] == "lowrank" and set(figures["ours_backend"]) == {"multi_lora", "linformer_attention",
                                                                             "lama_pool"}
    from tests.peers import peft_lora

    has_peft = peft_lora.PEFT is not None  # without it the peft column is reported unavailable
    assert figures["peft"].startswith("peft ") == has_peft
    rows = figures["rows"]
    columns = {"lora": {"ours", "base", "floor"} | ({"peft"} if has_peft else set()),
               "linformer": {"ours", "ours+mask", "comp", "sdpa", "ours_fb", "ours+mask_fb", "comp_fb", "sdpa_fb"},
               "lama": {"ours", "ref", "ours_fb", "ref_fb", "eager_fb"}}
    assert [r["section"] for r in rows] == ["lora", "lora", "linformer", "linformer", "lama"]
    for row in rows:
        assert set(row["errors"]) <= (set() if has_peft else {"peft"}), row["errors"]
        assert columns[row["section"]] <= set(row["ms"]) and row["ratios"], row
        assert all(0 < v < float("inf") for v in [*row["ms"].values(), *row["ratios"].values()]), row
        assert row["max_rel_diff"] is None or row["max_rel_diff"] < 1e-4, row
        assert row["max_rel_diff"] is not None or (row["section"] == "lora" and not has_peft), row
