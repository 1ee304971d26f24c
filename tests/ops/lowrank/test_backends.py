"""Which backend each low-rank op runs, asserted once for the family: C++ on CPU, Triton on CUDA,
autograd for the three forward ops; and every test file of this folder names the backend it tests
(``pytestmark`` with the ``cpp_kernels`` / ``triton_kernels`` fixture of tests/conftest.py)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from mtmerge import _library
from tests.ops.lowrank.helpers import CUDA, DIFFERENTIABLE, lowrank_op_names

pytestmark = pytest.mark.usefixtures("cpp_kernels")
PURE_PYTHON = {"test_reference.py"}  # the reference against independent loops: no kernel runs
OPS = ["lama_pool", "lama_pool_backward", "linformer_attention", "linformer_attention_backward", "multi_lora",
       "multi_lora_backward"]


def test_the_family_is_registered():
    assert _library.families()["lowrank"] == lowrank_op_names() == OPS
    assert set(DIFFERENTIABLE) | {f"{name}_backward" for name in DIFFERENTIABLE} == set(OPS)


def test_the_family_is_registered_before_the_extension_loads():
    """``mtmerge/ops/__init__.py`` registers the schemas first, then imports ``_C`` (whose CPU
    kernels attach to them)."""
    text = (Path(_library.__file__).parent / "ops" / "__init__.py").read_text()
    assert text.index('register_family("lowrank", LOWRANK_OPS)') < text.index("load_extension()")


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
    table = _library.backends()["lowrank"]
    assert set(table) == set(OPS)
    for name, row in table.items():
        assert row["cpu"] == "C++ (mtmerge._C)", (name, row)
        assert row["cuda"].startswith("Triton"), (name, row)
        assert row["autograd"] == ("yes" if name in DIFFERENTIABLE else "no"), (name, row)


def test_every_op_names_its_triton_launcher():
    for name in OPS:
        assert _library.spec(name).gpu == f"triton:mtmerge.kernels.lowrank:{name}", name


def test_launchers_exist_for_every_op():
    pytest.importorskip("triton")
    launchers = importlib.import_module("mtmerge.kernels.lowrank")
    missing = [name for name in OPS if not callable(getattr(launchers, name, None))]
    assert not missing, f"mtmerge.kernels.lowrank lacks launchers for {missing}"


def test_the_public_api_is_exported():
    import mtmerge

    for name in ("LamaOutput", "lama_pool", "linformer_attention", "multi_lora"):
        assert name in mtmerge.__all__ and hasattr(mtmerge, name), name


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_tensors_dispatch_to_triton(monkeypatch):
    """A CUDA call of the op reaches the Triton launcher (not the reference)."""
    launchers = importlib.import_module("mtmerge.kernels.lowrank")
    calls = []
    original = launchers.multi_lora
    monkeypatch.setattr(launchers, "multi_lora", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(4, 8, device="cuda")
    torch.ops.mtmerge.multi_lora(x=x, A=torch.randn(2, 3, 8, device="cuda"), B=torch.randn(2, 5, 3, device="cuda"),
                                 adapter_ids=torch.tensor([0, 1, -1, 1], device="cuda"),
                                 scale=torch.ones(2, device="cuda"), base=None)
    assert calls, "torch.ops.mtmerge.multi_lora on CUDA did not call mtmerge.kernels.lowrank.multi_lora"
