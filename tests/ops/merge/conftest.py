"""Fixtures of the merge-family tests (helpers: ``tests/ops/merge/helpers.py``).

Every test file here names the backend it tests with ``pytestmark``: ``cpp_kernels`` (CPU
tensors dispatch to the compiled C++ kernels of ``mtmerge._C``) or ``triton_kernels`` (the
Triton launchers run compiled on a GPU, or interpreted on CPU); the fixture fails the test when
that backend is not the one that would run, so a broken build never compares the reference
with itself.
"""

from __future__ import annotations

import pytest

from tests.ops.merge.helpers import assert_cpp_backend, assert_triton_backend, merge_op_names


@pytest.fixture
def cpp_kernels():
    assert_cpp_backend(merge_op_names())


@pytest.fixture
def triton_kernels():
    pytest.importorskip("triton")
    assert_triton_backend()
