"""``torch.library.opcheck`` on every op of the merge family (schema, fake/meta, autograd
registration, aliasing of ``out``), on CPU (the C++ kernels) and on CUDA (Triton) when a GPU is present."""

from __future__ import annotations

import pytest

from tests.ops import family_checks as checks
from tests.ops.merge.helpers import DEVICES, merge_op_names
from tests.ops.merge.op_cases import op_cases

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def test_every_op_of_the_family_has_cases():
    assert set(op_cases()) == set(merge_op_names())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(op_cases()))
def test_opcheck(name, device):
    checks.check_opcheck(name, op_cases(device)[name])
