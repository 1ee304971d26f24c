"""The `mtmerge` command and the reference fallback when `_C` is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mtmerge
from mtmerge import cli


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_info_lists_every_op_and_its_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "extension mtmerge._C: gcc" in out or "extension mtmerge._C: clang" in out
    assert "merge:" in out
    for name in mtmerge._library.op_names():
        assert name in out
    assert "C++ (mtmerge._C)" in out


def test_info_json_via_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "mtmerge", "info", "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["mtmerge"] == mtmerge.__version__
    assert info["extension"]["openmp"] is True
    assert set(info["ops"]) == set(mtmerge._library.families())
    assert set(info["ops"]["merge"]) == set(mtmerge._library.families()["merge"])
    assert all(where["cpu"] == "C++ (mtmerge._C)" for ops in info["ops"].values() for where in ops.values())
    assert info["ops"]["merge"]["task_arithmetic"]["autograd"] == "yes"


def test_missing_extension_falls_back_to_reference_with_one_warning():
    code = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch, mtmerge
    x = torch.randn(1000)
    for _ in range(3):
        mask = mtmerge.topk_mask(x, 100)
fallback = [w for w in caught if "mtmerge._C is not available" in str(w.message)]
assert len(fallback) == 1, [str(w.message) for w in caught]
assert int(mask.sum()) == 100
assert not mtmerge._library.cpu_kernel_registered("magnitude_threshold")
print(mtmerge._library.backends()["merge"]["magnitude_threshold"]["cpu"])
"""
    proc = run_python(code, MTMERGE_NO_EXTENSION="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reference (PyTorch)"
