"""Which backend each merge op runs, asserted once for the family: C++ on CPU, Triton on CUDA,
autograd for ``task_arithmetic``; and every test file of this folder names the backend it tests
(``pytestmark`` with the ``cpp_kernels`` / ``triton_kernels`` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.ops import family_checks as checks
from tests.ops.merge.helpers import CUDA, merge_op_names

pytestmark = pytest.mark.usefixtures("cpp_kernels")
PURE_PYTHON = {"test_recipe.py"}  # argument packing only: no kernel runs


def test_every_test_file_names_its_backend():
    checks.check_every_test_file_names_its_backend(Path(__file__).parent, PURE_PYTHON)


def test_cpu_runs_cpp_and_cuda_runs_triton():
    table = checks.check_cpu_runs_cpp_and_cuda_runs_triton("merge", merge_op_names())
    assert table["task_arithmetic"]["autograd"] == "yes"


def test_every_op_names_its_triton_launcher():
    checks.check_every_op_names_its_triton_launcher("merge", merge_op_names())


def test_launchers_exist_for_every_op():
    checks.check_launchers_exist_for_every_op("merge", merge_op_names())


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_tensors_dispatch_to_triton(monkeypatch):
    """A CUDA call of the op reaches the Triton launcher (not the reference)."""
    masks = torch.randint(0, 256, (3, 5), dtype=torch.uint8, device="cuda")
    checks.check_cuda_call_reaches_triton(monkeypatch, "merge", "consensus_mask",
                                          lambda: torch.ops.mtmerge.consensus_mask(masks=masks, k=2))
