"""Which backend each MoE op runs, asserted once for the family: C++ on CPU, Triton on CUDA,
autograd for the ops that train; and every test file of this folder names the backend it tests
(``pytestmark`` with the ``cpp_kernels`` / ``triton_kernels`` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtmerge import _library
from tests.ops import family_checks as checks
from tests.ops.moe.helpers import CUDA, moe_op_names

pytestmark = pytest.mark.usefixtures("cpp_kernels")
PURE_PYTHON = {"test_reference.py"}  # the reference against independent loops: no kernel runs
DIFFERENTIABLE = {"moe_topk_gate", "moe_task_gate", "moe_experts", "moe_load_balancing_loss", "moe_router_z_loss"}


def test_the_family_is_registered():
    assert _library.families()["moe"] == moe_op_names()
    assert set(moe_op_names()) == DIFFERENTIABLE | {"moe_align", "moe_experts_backward"}


def test_every_test_file_names_its_backend():
    checks.check_every_test_file_names_its_backend(Path(__file__).parent, PURE_PYTHON)


def test_cpu_runs_cpp_and_cuda_runs_triton():
    checks.check_cpu_runs_cpp_and_cuda_runs_triton("moe", moe_op_names(), DIFFERENTIABLE)


def test_every_op_names_its_triton_launcher():
    checks.check_every_op_names_its_triton_launcher("moe", moe_op_names())


def test_launchers_exist_for_every_op():
    checks.check_launchers_exist_for_every_op("moe", moe_op_names())


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_tensors_dispatch_to_triton(monkeypatch):
    """A CUDA call of the op reaches the Triton launcher (not the reference)."""
    logits = torch.randn(4, 3, device="cuda")
    checks.check_cuda_call_reaches_triton(monkeypatch, "moe", "moe_router_z_loss",
                                          lambda: torch.ops.mtmerge.moe_router_z_loss(router_logits=logits))
