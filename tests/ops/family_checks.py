"""Checks that every op family's tests share (``tests/ops/<family>/``: merge, moe, lowrank).

Each family's test files keep one test function per check (so a failure names the family) and
call the function here with the family's names, ops and cases:

* backends: every test file names its backend fixture, CPU runs the C++ kernels and CUDA the
  Triton launchers of ``mtmerge.kernels.<family>``, a CUDA call reaches its launcher;
* opcheck: ``torch.library.opcheck`` over an op's cases, the fake's output metadata against the
  kernel's, ops against their reference case by case;
* validation: a rejected call never reaches an op; a kernel called directly (in a subprocess)
  with ids the API would reject never kills the process;
* autograd: ``gradcheck`` with the families' step, the ops dispatched by a backward.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def to_device(kwargs: dict, device) -> dict:
    """Tensors of ``kwargs`` on ``device`` (leaves that require grad stay leaves)."""
    def move(v):
        if not isinstance(v, Tensor):
            return v
        return v.detach().to(device).requires_grad_() if v.requires_grad else v.to(device)

    return {name: move(v) for name, v in kwargs.items()}


# ---- backends -------------------------------------------------------------------------------------


def check_every_test_file_names_its_backend(folder: Path, pure_python: Iterable[str]) -> None:
    """Every ``test_*.py`` of ``folder`` but ``pure_python`` declares ``pytestmark`` with the
    ``cpp_kernels`` or ``triton_kernels`` fixture (``test_triton_*``: triton, ``test_cpp_*``: cpp)."""
    for path in sorted(folder.glob("test_*.py")):
        if path.name in pure_python:
            continue
        text = path.read_text()
        match = re.search(r"^pytestmark = pytest\.mark\.usefixtures\((.*)\)$", text, re.M)
        assert match, f"{path.name} must declare pytestmark = pytest.mark.usefixtures(<backend fixture>)"
        assert "cpp_kernels" in match.group(1) or "triton_kernels" in match.group(1), path.name
        if path.name.startswith("test_triton_"):
            assert "triton_kernels" in match.group(1), path.name
        if path.name.startswith("test_cpp_"):
            assert "cpp_kernels" in match.group(1), path.name


def check_cpu_runs_cpp_and_cuda_runs_triton(family: str, ops: Iterable[str],
                                            differentiable: Iterable[str] | None = None) -> dict:
    """``_library.backends()[family]`` lists exactly ``ops``, each C++ on CPU and Triton on CUDA;
    with ``differentiable``, autograd is "yes" for those ops and "no" for the others. Returns the
    family's table."""
    from mtmerge import _library

    table = _library.backends()[family]
    assert set(table) == set(ops)
    grads = None if differentiable is None else set(differentiable)
    for name, row in table.items():
        assert row["cpu"] == "C++ (mtmerge._C)", (name, row)
        assert row["cuda"].startswith("Triton"), (name, row)
        if grads is not None:
            assert row["autograd"] == ("yes" if name in grads else "no"), (name, row)
    return table


def check_every_op_names_its_triton_launcher(family: str, ops: Iterable[str]) -> None:
    from mtmerge import _library

    for name in ops:
        assert _library.spec(name).gpu == f"triton:mtmerge.kernels.{family}:{name}", name


def check_launchers_exist_for_every_op(family: str, ops: Iterable[str]) -> None:
    pytest.importorskip("triton")
    launchers = importlib.import_module(f"mtmerge.kernels.{family}")
    missing = [name for name in ops if not callable(getattr(launchers, name, None))]
    assert not missing, f"mtmerge.kernels.{family} lacks launchers for {missing}"


def check_cuda_call_reaches_triton(monkeypatch, family: str, op: str, call: Callable[[], object]) -> None:
    """``call()`` (a CUDA call of ``torch.ops.mtmerge.<op>``) reaches the Triton launcher
    ``mtmerge.kernels.<family>.<op>`` (not the reference)."""
    launchers = importlib.import_module(f"mtmerge.kernels.{family}")
    calls = []
    original = getattr(launchers, op)
    monkeypatch.setattr(launchers, op, lambda *a, **k: calls.append(1) or original(*a, **k))
    call()
    assert calls, f"torch.ops.mtmerge.{op} on CUDA did not call mtmerge.kernels.{family}.{op}"


# ---- opcheck ----------------------------------------------------------------------------------------


def check_opcheck(name: str, cases: Iterable[dict]) -> None:
    """``torch.library.opcheck`` of ``torch.ops.mtmerge.<name>`` on every keyword-argument set."""
    op = getattr(torch.ops.mtmerge, name).default
    for kwargs in cases:
        torch.library.opcheck(op, (), kwargs)


def check_fake_matches_the_real_output(name: str, cases: Iterable[dict]) -> None:
    """The fake's output metadata (shape, dtype) is what the kernel returns, case by case."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(torch.ops.mtmerge, name).default
    for kwargs in cases:
        with torch.no_grad():
            real = op(**kwargs)
        with FakeTensorMode() as mode:
            fake_kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            fake = op(**fake_kwargs)
        for r, f in zip(_as_tuple(real), _as_tuple(fake), strict=True):
            assert (tuple(r.shape), r.dtype) == (tuple(f.shape), f.dtype), name


def op_and_reference_outputs(name: str, reference_module, cases: Iterable[dict]
                             ) -> Iterator[tuple[dict, tuple, tuple]]:
    """``(kwargs, op outputs, reference outputs)`` for every case (outputs as tuples, no grad):
    ``torch.ops.mtmerge.<name>`` beside ``reference_module.<name>`` on the same arguments."""
    op = getattr(torch.ops.mtmerge, name).default
    reference = getattr(reference_module, name)
    for kwargs in cases:
        with torch.no_grad():
            got, want = op(**kwargs), reference(**kwargs)
        yield kwargs, _as_tuple(got), _as_tuple(want)


# ---- validation --------------------------------------------------------------------------------------

BadCall = tuple[Callable[[], object], type[Exception], str]  # (call, error, pattern of its message)


def check_rejected(call: Callable[[], object], error: type[Exception], pattern: str) -> None:
    """``call()`` raises ``error`` with a message matching ``pattern`` (naming the argument)."""
    with pytest.raises(error, match=pattern):
        call()


def check_validation_runs_before_any_kernel(monkeypatch, bad_calls: Sequence[BadCall]) -> None:
    """A rejected call never reaches the op (so no kernel sees an out-of-range id)."""
    calls = []
    real_ops = torch.ops.mtmerge

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real_ops, name)

    monkeypatch.setattr(torch.ops, "mtmerge", Spy())
    for call, error, _ in bad_calls:
        with pytest.raises(error):
            call()
    assert not calls, f"ops ran before validation failed: {calls}"


_DIRECT_PRELUDE = """\
import faulthandler, sys
faulthandler.enable()
import torch
import mtmerge
op = sys.argv[1]
"""


def check_kernel_survives_out_of_range_ids(script: str, op: str, marker: str) -> None:
    """Runs ``script`` (after a prelude: faulthandler on, ``torch`` and ``mtmerge`` imported,
    ``op = sys.argv[1]``) in a fresh interpreter: the process ends normally, printing ``marker``
    (the ids were treated as -1) or with a Python exception, never a signal. The script's own
    assertions "no C++ kernel" and "an out-of-range id" fail the check."""
    source = _DIRECT_PRELUDE + textwrap.dedent(script)
    proc = subprocess.run([sys.executable, "-c", source, op], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}:\n{proc.stderr[-3000:]}"
    if proc.returncode == 0:
        assert marker in proc.stdout
    else:
        assert "Traceback" in proc.stderr and "Fatal Python error" not in proc.stderr, proc.stderr[-3000:]
        assert "no C++ kernel" not in proc.stderr and "an out-of-range id" not in proc.stderr, proc.stderr[-3000:]


# ---- autograd ------------------------------------------------------------------------------------------


def leaf(t: Tensor, device) -> Tensor:
    """``t`` on ``device`` as a fresh leaf requiring grad."""
    return t.detach().to(device).requires_grad_()


def assert_gradcheck(fn: Callable[..., object], inputs: Sequence[Tensor], atol: float = 1e-7) -> None:
    """``torch.autograd.gradcheck`` with the families' finite-difference step (1e-6, float64)."""
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=atol)


class RecordOps(TorchDispatchMode):
    """Names of the ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@contextmanager
def dispatches(op: str) -> Iterator[RecordOps]:
    """The block dispatches ``torch.ops.mtmerge.<op>.default`` (e.g. a backward runs the kernel)."""
    with RecordOps() as record:
        yield record
    assert f"mtmerge.{op}.default" in record.names, record.names
