"""``torch.library.opcheck`` on every op of the low-rank family (schema, fake/meta, autograd
registration), on CPU (the C++ kernels) and on CUDA (Triton) when a GPU is present; each op on
the same argument sets against its reference; the public wrappers as thin layers over the ops,
keeping docs/lowrank.md's invariants (padding changes nothing, fully masked rows give zeros, fp16 x100
stays finite) on the kernels too."""

from __future__ import annotations

import pytest
import torch

import mtmerge
from mtmerge.reference import lowrank as ref
from tests.ops import family_checks as checks
from tests.ops.lowrank.helpers import (
    DEVICES,
    assert_close,
    assert_same,
    lowrank_op_names,
    make_lama,
    make_linformer,
    make_lora,
    op_cases,
    randn,
)

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def test_every_op_of_the_family_has_cases():
    assert set(op_cases()) == set(lowrank_op_names())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(lowrank_op_names()))
def test_opcheck(name, device):
    checks.check_opcheck(name, op_cases(device)[name])


@pytest.mark.parametrize("name", sorted(lowrank_op_names()))
def test_fake_matches_the_cpu_output(name):
    """The fake's output metadata (shape, dtype) is what the kernel returns, case by case."""
    checks.check_fake_matches_the_real_output(name, op_cases()[name])


def _input_dtype(kwargs: dict) -> torch.dtype:
    return next(kwargs[n].dtype for n in ("h", "q", "x") if n in kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(lowrank_op_names()))
def test_op_matches_the_reference(name, device):
    """Within docs/lowrank.md's tolerance (GEMM-like reductions: 1e-4 in fp32), outputs and grads alike."""
    for kwargs, got, want in checks.op_and_reference_outputs(name, ref, op_cases(device)[name]):
        dtype = _input_dtype(kwargs)
        for g, w in zip(got, want, strict=True):
            assert (g.dtype, tuple(g.shape), g.device) == (w.dtype, tuple(w.shape), w.device), name
            assert_close(g, w, dtype, gemm=name != "lama_pool")


def test_fake_rejects_what_the_kernels_cannot_take():
    """The fakes check the contract's shapes and dtypes (mixed dtypes, N > E's width, a non-bool
    mask, a float64 LoRA scale) when traced on the meta device."""
    meta = torch.device("meta")
    lin = {k: v.to(meta) if isinstance(v, torch.Tensor) else v for k, v in make_linformer(width=6).items()}
    with pytest.raises(RuntimeError, match="exceed E's width"):
        torch.ops.mtmerge.linformer_attention(**{**lin, "E": lin["E"][:, :5], "F": lin["F"][:, :5]})
    with pytest.raises(RuntimeError, match="k must have q's dtype"):
        torch.ops.mtmerge.linformer_attention(**{**lin, "k": lin["k"].half()})
    lama = {k: v.to(meta) if isinstance(v, torch.Tensor) else v for k, v in make_lama(masked=True).items()}
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.mtmerge.lama_pool(**{**lama, "mask": lama["mask"].float()})
    lora = {k: v.to(meta) if isinstance(v, torch.Tensor) else v for k, v in make_lora().items()}
    with pytest.raises(RuntimeError, match="scale must be float32"):
        torch.ops.mtmerge.multi_lora(**{**lora, "scale": lora["scale"].double()})


# ---- the public API over the ops ------------------------------------------------------------------


def test_public_api_wraps_the_ops():
    """NamedTuple out, keyword defaults as documented, ``x [..., in]`` flattened and reshaped back."""
    lama = make_lama(masked=True, seed=900)
    out = mtmerge.lama_pool(lama["h"], lama["P"], lama["Q"], mask=lama["mask"])
    assert isinstance(out, mtmerge.LamaOutput)
    assert_same(out.attn, torch.ops.mtmerge.lama_pool(**lama)[0])
    lin = make_linformer(seed=901, masked=True)
    got = mtmerge.linformer_attention(lin["q"], lin["k"], lin["v"], lin["E"], lin["F"],
                                      key_padding_mask=lin["key_padding_mask"])  # scale defaults to 1/sqrt(d)
    assert_same(got, torch.ops.mtmerge.linformer_attention(**lin))
    lora = make_lora(12, 6, 4, 2, 3, seed=902)
    flat = mtmerge.multi_lora(lora["x"], lora["A"], lora["B"], lora["adapter_ids"], scale=lora["scale"],
                              base=lora["base"])
    assert_same(flat, torch.ops.mtmerge.multi_lora(**lora))
    batched = mtmerge.multi_lora(lora["x"].reshape(3, 4, 6), lora["A"], lora["B"], lora["adapter_ids"].reshape(3, 4),
                                 scale=lora["scale"], base=lora["base"].reshape(3, 4, 4))
    assert batched.shape == (3, 4, 4)
    assert_same(batched.reshape(12, 4), flat)
    one = mtmerge.multi_lora(lora["x"], lora["A"], lora["B"], lora["adapter_ids"], scale=0.5)
    assert_same(one, torch.ops.mtmerge.multi_lora(**{**lora, "scale": torch.full((3,), 0.5), "base": None}))


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_keep_the_padding_invariants(device):
    """Appended padding changes nothing and fully masked rows give zeros (never NaN), on the kernels."""
    lama = make_lama(2, 5, 4, 3, seed=910)
    h = lama["h"].to(device)
    P, Q = lama["P"].to(device), lama["Q"].to(device)
    base = mtmerge.lama_pool(h, P, Q)
    padded_h = torch.cat([h, randn(2, 3, 4, seed=911, scale=30.0).to(device)], dim=1)
    mask = torch.arange(8, device=device)[None, :].expand(2, 8) < 5
    padded = mtmerge.lama_pool(padded_h, P, Q, mask=mask)
    assert_close(padded.attn[..., :5], base.attn, torch.float32)
    assert_same(padded.attn[..., 5:], torch.zeros_like(padded.attn[..., 5:]))
    assert_close(padded.pooled, base.pooled, torch.float32)
    empty = mtmerge.lama_pool(padded_h, P, Q, mask=torch.zeros_like(mask))
    assert_same(empty.attn, torch.zeros_like(empty.attn))
    assert_same(empty.pooled, torch.zeros_like(empty.pooled))

    lin = {k: v.to(device) if isinstance(v, torch.Tensor) else v
           for k, v in make_linformer(2, 2, 4, 5, 8, 3, 8, seed=912, masked=True).items()}
    out = mtmerge.linformer_attention(lin["q"], lin["k"], lin["v"], lin["E"], lin["F"],
                                      key_padding_mask=lin["key_padding_mask"])
    assert not torch.isnan(out).any()
    assert_same(out[-1], torch.zeros_like(out[-1]))
    k = torch.cat([lin["k"], randn(2, 2, 3, 8, seed=913, scale=1e3).to(device)], dim=2)
    v = torch.cat([lin["v"], randn(2, 2, 3, 8, seed=914, scale=1e3).to(device)], dim=2)
    mask = torch.cat([lin["key_padding_mask"], torch.ones(2, 3, dtype=torch.bool, device=device)], dim=1)
    longer = mtmerge.linformer_attention(lin["q"], k, v, lin["E"], lin["F"], key_padding_mask=mask)
    assert_close(longer, out, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_keep_fp16_scaled_by_100_finite(device):
    lama = make_lama(2, 6, 5, 3, torch.float16, seed=920, masked=True)
    attn, pooled = mtmerge.lama_pool(lama["h"].to(device) * 100, lama["P"].to(device) * 100,
                                     lama["Q"].to(device) * 100, mask=lama["mask"].to(device))
    assert torch.isfinite(attn).all() and torch.isfinite(pooled).all()
    lin = make_linformer(2, 2, 5, 8, 16, 4, 8, torch.float16, seed=921, masked=True)
    out = mtmerge.linformer_attention(*(lin[n].to(device) * 100 for n in ("q", "k", "v")), lin["E"].to(device),
                                      lin["F"].to(device), key_padding_mask=lin["key_padding_mask"].to(device))
    assert torch.isfinite(out).all()
