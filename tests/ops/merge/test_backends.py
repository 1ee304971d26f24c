"""Which backend each merge op runs, asserted once for the family: C++ on CPU, Triton on CUDA,
autograd for ``task_arithmetic``; and every test file of this folder names the backend it tests
(``pytestmark`` with the ``cpp_kernels`` / ``triton_kernels`` fixture of tests/conftest.py)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from mtmerge import _library
from tests.ops.merge.helpers import CUDA, merge_op_names

pytestmark = pytest.mark.usefixtures("cpp_kernels")
PURE_PYTHON = {"test_recipe.py"}  # argument packing only: no kernel runs


def test_every_test_file_names_its_backend():
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        if path.name in PURE_PYTHON:
            continue
        text = path.read_text()
        match = re.search(r"^pytestmark = pytest\.mark\.usefixtures\((.*)\)$", text, re.M)
        assert match, f"{path.name} must declare pytestmark = pytest.mark.usefixtures(<backend fixture>)"
        assert "cpp_kernels" in match.group(1) or "triton_kernels" in match.group(1), path.name
        if path.name.startswith("test_triton_"):
            assert "triton_kernels" in match.group(1), path.name


def test_cpu_runs_cpp_and_cuda_runs_triton():
    table = _library.backends()["merge"]
    assert set(table) == set(merge_op_names())
    for name, row in table.items():
        assert row["cpu"] == "C++ (mtmerge._C)", (name, row)
        assert row["cuda"].startswith("Triton"), (name, row)
    assert table["task_arithmetic"]["autograd"] == "yes"


def test_launchers_exist_for_every_op():
    pytest.importorskip("triton")
    launchers = importlib.import_module("mtmerge.kernels.merge")
    missing = [name for name in merge_op_names() if not callable(getattr(launchers, name, None))]
    assert not missing, f"mtmerge.kernels.merge lacks launchers for {missing}"


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_tensors_dispatch_to_triton(monkeypatch):
    """A CUDA call of the op reaches the Triton launcher (not the reference)."""
    launchers = importlib.import_module("mtmerge.kernels.merge")
    calls = []
    original = launchers.consensus_mask
    monkeypatch.setattr(launchers, "consensus_mask", lambda *a, **k: calls.append(1) or original(*a, **k))
    masks = torch.randint(0, 256, (3, 5), dtype=torch.uint8, device="cuda")
    torch.ops.mtmerge.consensus_mask(masks=masks, k=2)
    assert calls, "torch.ops.mtmerge.consensus_mask on CUDA did not call mtmerge.kernels.merge.consensus_mask"
