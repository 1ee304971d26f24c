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
