"""Which backend each MoE op runs, asserted once for the family: C++ on CPU, Triton on CUDA,
autograd for the ops that train; and every test file of this folder names the backend it tests
(``pytestmark`` with the ``cpp_kernels`` / ``triton_kernels`` fixture of tests/conftest.py)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from mtmerge import _library
from tests.ops.moe.helpers import CUDA, moe_op_names

pytestmark = pytest.mark.usefixtures("cpp_kernels")
PURE_PYTHON = {"test_reference.py"}  # the reference against independent loops: no kernel runs
DIFFERENTIABLE = {"moe_topk_gate", "moe_task_gate", "moe_experts", "moe_load_balancing_loss", "moe_router_z_loss"}


def test_the_family_is_registered():
    assert _library.families()["moe"] == moe_op_names()
    assert set(moe_op_names()) == DIFFERENTIABLE | {"moe_align", "moe_experts_backward"}


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
        if path.name.startswith("test_cpp_"):
            assert "cpp_kernels" in match.group(1), path.name


def test_cpu_runs_cpp_and_cuda_runs_triton():
    table = _library.backends()["moe"]
    assert set(table) == set(moe_op_names())
    for name, row in table.items():
        assert row["cpu"] == "C++ (mtmerge._C)", (name, row)
        assert row["cuda"].startswith("Triton"), (name, row)
        assert row["autograd"] == ("yes" if name in DIFFERENTIABLE else "no"), (name, row)


def test_every_op_names_its_triton_launcher():
    for name in moe_op_names():
        assert _library.spec(name).gpu == f"triton:mtmerge.kernels.moe:{name}", name


def test_launchers_exist_for_every_op():
    pytest.importorskip("triton")
    launchers = importlib.import_module("mtmerge.kernels.moe")
    missing = [name for name in moe_op_names() if not callable(getattr(launchers, name, None))]
    assert not missing, f"mtmerge.kernels.moe lacks launchers for {missing}"


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_tensors_dispatch_to_triton(monkeypatch):
    """A CUDA call of the op reaches the Triton launcher (not the reference)."""
    launchers = importlib.import_module("mtmerge.kernels.moe")
    calls = []
    original = launchers.moe_router_z_loss
    monkeypatch.setattr(launchers, "moe_router_z_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.ops.mtmerge.moe_router_z_loss(router_logits=torch.randn(4, 3, device="cuda"))
    assert calls, "torch.ops.mtmerge.moe_router_z_loss on CUDA did not call mtmerge.kernels.moe.moe_router_z_loss"
