"""Which backend each low-rank op runs, asserted once for the family: C++ on CPU, Triton on CUDA,
autograd for the three forward ops; and every test file of this folder names the backend it tests
(``pytestmark`` with the ``cpp_kernels`` / ``triton_kernels`` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtmerge import _library
from tests.ops import family_checks as checks
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
    checks.check_every_test_file_names_its_backend(Path(__file__).parent, PURE_PYTHON)


def test_cpu_runs_cpp_and_cuda_runs_triton():
    checks.check_cpu_runs_cpp_and_cuda_runs_triton("lowrank", OPS, DIFFERENTIABLE)


def test_every_op_names_its_triton_launcher():
    checks.check_every_op_names_its_triton_launcher("lowrank", OPS)


def test_launchers_exist_for_every_op():
    checks.check_launchers_exist_for_every_op("lowrank", OPS)


def test_the_public_api_is_exported():
    import mtmerge

    for name in ("LamaOutput", "lama_pool", "linformer_attention", "multi_lora"):
        assert name in mtmerge.__all__ and hasattr(mtmerge, name), name


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_tensors_dispatch_to_triton(monkeypatch):
    """A CUDA call of the op reaches the Triton launcher (not the reference)."""
    x = torch.randn(4, 8, device="cuda")
    checks.check_cuda_call_reaches_triton(
        monkeypatch, "lowrank", "multi_lora",
        lambda: torch.ops.mtmerge.multi_lora(x=x, A=torch.randn(2, 3, 8, device="cuda"),
                                             B=torch.randn(2, 5, 3, device="cuda"),
                                             adapter_ids=torch.tensor([0, 1, -1, 1], device="cuda"),
                                             scale=torch.ones(2, device="cuda"), base=None))
