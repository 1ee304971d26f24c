"""Shared test set-up.

Triton kernels are tested on the CPU with the Triton interpreter when no GPU is present, and
compiled on the GPU when one is (``make gpu-check``); TRITON_INTERPRET must be set before triton
is first imported, hence at the top of this file, and only when there is no GPU.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# `tests.peers`, `tests.ops.merge.helpers`: importable however pytest was started
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tolerances per dtype for ops that compute in floating point with a documented tolerance
# (peers, formulas); kernels that promise a fixed sequence of float32 operations are compared
# bit for bit.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1.3e-6},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
}


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests that change the thread count must not leak it into later tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# Backend fixtures. Every op test file names the backend it tests with ``pytestmark``:
# ``cpp_kernels`` (CPU tensors dispatch to the compiled C++ kernels of ``mtmerge._C``) or
# ``triton_kernels`` (the Triton launchers run compiled on a GPU, or interpreted on CPU); the
# fixture fails the test when that backend is not the one that would run, so a broken build
# never compares the reference with itself. They live here, not in a family's conftest: on the
# GPU machine (pytest 9.1, --import-mode=importlib) a conftest under tests/ops/merge was not
# visible to every test file of that folder.
@pytest.fixture
def cpp_kernels(request):
    """The C++ kernels of the test file's family (``tests/ops/<family>/``; every family
    otherwise) are what CPU tensors dispatch to."""
    from mtmerge import _library
    from tests.ops.merge.helpers import assert_cpp_backend

    parts = Path(str(request.path)).parts
    family = parts[parts.index("ops") + 1] if "ops" in parts[:-1] else None
    table = _library.families()
    assert_cpp_backend(table[family] if family in table else _library.op_names())


@pytest.fixture
def triton_kernels():
    pytest.importorskip("triton")
    from tests.ops.merge.helpers import assert_triton_backend

    assert_triton_backend()
