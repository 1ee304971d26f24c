"""The Triton launchers ``mtmerge.kernels.lowrank.multi_lora`` and ``multi_lora_backward`` against
the reference (docs/lowrank.md tolerances: fp32 1e-4 for these GEMMs, bf16 2e-2): odd sizes, ranks 1 to
16, int32/int64 ids with -1 and out-of-range ids, with and without base, strided inputs, the sorted
and the small-batch (DIRECT) paths, empty shapes, and run-to-run determinism."""

from __future__ import annotations

import pytest
import torch

from mtmerge.reference import lowrank as ref
from tests.ops.lowrank.helpers import (
    TRITON_DEVICE,
    assert_close,
    assert_launcher_matches_reference,
    make_lora,
    oracle_lora,
    randn,
)

pytestmark = pytest.mark.usefixtures("triton_kernels")


def kernels():
    from mtmerge.kernels import lowrank

    return lowrank


@pytest.fixture(params=["sorted", "direct"])
def path(request, monkeypatch):
    """Force the grouped (sorted) path or the small-batch path that skips the sort."""
    from mtmerge.kernels.lowrank import lora

    monkeypatch.setattr(lora, "SMALL_BATCH_TOKENS", 0 if request.param == "sorted" else 10**9)
    return request.param


def on_device(case: dict) -> dict:
    return {name: v.to(TRITON_DEVICE) if isinstance(v, torch.Tensor) else v for name, v in case.items()}


def make_case(T, IN, OUT, R, L, dtype, *, base=True, id_dtype=torch.int64, seed=0):
    """make_lora's inputs plus an id >= L (treated as -1) when T > 3."""
    case = make_lora(T, IN, OUT, R, L, dtype, seed=seed, base=base, id_dtype=id_dtype)
    if T > 3:
        case["adapter_ids"][3] = L + 2
    return case


def check_forward(case):
    got = kernels().multi_lora(**on_device(case)).cpu()
    want = ref.multi_lora(**case)
    assert got.dtype == want.dtype
    assert_close(got, want, case["x"].dtype, gemm=True)
    return got


def check_backward(case, seed=5):
    x = case["x"]
    grad_out = randn(x.shape[0], case["B"].shape[1], dtype=x.dtype, seed=seed)
    args = {k: v for k, v in case.items() if k != "base"}
    got = kernels().multi_lora_backward(grad_out.to(TRITON_DEVICE), **on_device(args))
    want = ref.multi_lora_backward(grad_out, **args)
    for name, g, w in zip(("grad_x", "grad_A", "grad_B"), got, want, strict=True):
        assert g.dtype == w.dtype and g.is_contiguous(), name
        try:
            assert_close(g, w, x.dtype, gemm=True)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    return [g.cpu() for g in got]


# (T, in, out, r, L, dtype, base, ids dtype)
CASES = [
    (23, 37, 29, 5, 3, torch.float32, True, torch.int64),
    (40, 16, 33, 16, 2, torch.float32, False, torch.int32),
    (30, 17, 24, 7, 3, torch.bfloat16, True, torch.int64),
    (19, 20, 9, 1, 1, torch.float16, True, torch.int32),
    (12, 9, 7, 3, 2, torch.float64, True, torch.int64),
]


def case_id(c):
    T, IN, OUT, R, L, dtype, base, ids = c
    return f"T{T}-in{IN}-out{OUT}-r{R}-L{L}-{str(dtype)[6:]}{'-base' if base else ''}-{str(ids)[6:]}"


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_forward(c, path):
    T, IN, OUT, R, L, dtype, base, ids = c
    check_forward(make_case(T, IN, OUT, R, L, dtype, base=base, id_dtype=ids))


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_backward(c):
    T, IN, OUT, R, L, dtype, base, ids = c
    check_backward(make_case(T, IN, OUT, R, L, dtype, base=base, id_dtype=ids, seed=3))


def test_matches_float64_oracle():
    case = make_case(21, 13, 11, 4, 3, torch.float32, seed=9)
    got = kernels().multi_lora(**on_device(case)).cpu()
    torch.testing.assert_close(got.double(), oracle_lora(**case), atol=1e-4, rtol=1e-4)


def test_strided_inputs(path):
    """Transposed views of x, A, B and base (no copies)."""
    case = make_case(14, 12, 10, 4, 2, torch.float32, seed=11)
    case["x"] = case["x"].t().contiguous().t()
    case["A"] = case["A"].transpose(1, 2).contiguous().transpose(1, 2)
    case["B"] = case["B"].transpose(0, 2).contiguous().transpose(0, 2)
    case["base"] = case["base"].t().contiguous().t()
    assert not case["x"].is_contiguous() and not case["B"].is_contiguous()
    check_forward(case)
    check_backward(case)


def test_unrouted_tokens_get_base_only(path):
    """-1 and out-of-range ids: y = base (bit for bit), zero grad_x."""
    case = make_case(10, 9, 7, 3, 2, torch.bfloat16, seed=13)
    case["adapter_ids"] = torch.tensor([-1, 0, 5, 1, -1, 2, 0, -1, 1, 9])
    y = check_forward(case)
    unrouted = torch.tensor([True, False, True, False, True, True, False, True, False, True])
    assert torch.equal(y[unrouted], case["base"][unrouted])
    grad_x = check_backward(case)[0]
    assert not grad_x[unrouted].any()


def test_all_unrouted(path):
    case = make_case(6, 8, 5, 2, 3, torch.float32, base=False, seed=15)
    case["adapter_ids"] = torch.full((6,), -1)
    assert not check_forward(case).any()
    assert not any(g.any() for g in check_backward(case))


def test_crowded_adapter_and_unused_adapters():
    """Every token on one adapter (several tiles of it); the other adapters get zero gradients."""
    case = make_case(37, 11, 9, 3, 4, torch.float32, seed=17)
    case["adapter_ids"] = torch.full((37,), 2)
    check_forward(case)
    _, grad_A, grad_B = check_backward(case)
    assert not grad_A[[0, 1, 3]].any() and not grad_B[[0, 1, 3]].any()


@pytest.mark.parametrize("T", [0, 1, 2])
def test_few_tokens(T):
    """Few tiles: several programs share one tile's output blocks (SPLITS > 1)."""
    case = make_case(T, 37, 40, 2, 2, torch.float32, seed=19)
    assert check_forward(case).shape == (T, 40)
    check_backward(case)


def test_deterministic():
    case = on_device(make_case(33, 18, 14, 6, 3, torch.float32, seed=21))
    first = kernels().multi_lora(**case)
    assert torch.equal(first, kernels().multi_lora(**case))
    args = {k: v for k, v in case.items() if k != "base"}
    grad_out = randn(33, 14, seed=22).to(TRITON_DEVICE)
    g1 = kernels().multi_lora_backward(grad_out, **args)
    g2 = kernels().multi_lora_backward(grad_out, **args)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.parametrize("op", ['multi_lora', 'multi_lora_backward'])
def test_op_cases(op):
    """The shared argument sets of the op tests (helpers.op_cases) through the launcher."""
    assert_launcher_matches_reference(op)
