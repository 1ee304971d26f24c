"""The MoE reference (``mtmerge/reference/moe.py``) against docs/moe.md's text, written independently
as per-token loops (tests/ops/moe/helpers.py), and the invariants docs/moe.md promises: ties to the
lower expert index, the bias moves only the ids, empty shapes, unrouted slots, the stable order of
``moe_align`` and its drop counts, every activation on strided weights, and the hand-written
experts backward against ``torch.autograd`` on the forward reference. No kernel runs here."""

from __future__ import annotations

import pytest
import torch

from mtmerge.reference import moe as ref
from tests.ops.moe.helpers import (
    ACTIVATIONS,
    assert_experts_close,
    assert_same,
    gen,
    make_experts,
    make_ids,
    make_logits,
    make_weights,
    make_x,
    oracle_align,
    oracle_experts,
    oracle_task_logits,
    oracle_topk,
)

# ---- moe_topk_gate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_topk_gate_matches_the_oracle(dtype, scoring, renormalize, with_bias):
    logits = make_logits(23, 9, dtype, seed=1)
    bias = (torch.rand(9, generator=gen(2)) * 0.3).to(dtype) if with_bias else None
    weights, ids = ref.moe_topk_gate(logits, 3, scoring, renormalize, bias)
    want_w, want_ids = oracle_topk(logits.float(), 3, scoring, renormalize, None if bias is None else bias.float())
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert_same(ids, want_ids.to(torch.int32))
    torch.testing.assert_close(weights.double(), want_w, rtol=1e-6, atol=1e-7)


def test_topk_gate_float64_stays_float64():
    logits = make_logits(5, 6, torch.float64, seed=3)
    weights, ids = ref.moe_topk_gate(logits, 2, "softmax", True, None)
    want_w, want_ids = oracle_topk(logits, 2, "softmax", True)
    assert weights.dtype == torch.float64
    assert_same(ids, want_ids.to(torch.int32))
    torch.testing.assert_close(weights, want_w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_ties_go_to_the_lower_expert_index(scoring):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0],
                           [0.0, -1.0, 5.0, -1.0, 5.0]])
    _, ids = ref.moe_topk_gate(logits, 3, scoring, False, None)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [2, 4, 0]]
    # a bias that creates ties among the choices: still the lower index first
    _, ids = ref.moe_topk_gate(torch.zeros(1, 4), 2, scoring, False, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert ids.tolist() == [[1, 3]]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_bias_changes_only_the_ids(scoring):
    logits = make_logits(11, 7, seed=4)
    bias = torch.zeros(7)
    bias[5] = 10.0  # expert 5 always chosen, first
    weights, ids = ref.moe_topk_gate(logits, 2, scoring, False, bias)
    s = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    assert (ids[:, 0] == 5).all()
    assert_same(weights, s.gather(-1, ids.long()))  # the unbiased scores
    # without the bias the choice is the plain top-k of the scores
    _, plain = ref.moe_topk_gate(logits, 2, scoring, False, None)
    assert_same(plain.long(), torch.topk(s, 2).indices)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_renormalize_and_raw_scores(scoring):
    logits = make_logits(9, 8, seed=5)
    w_norm, ids = ref.moe_topk_gate(logits, 3, scoring, True, None)
    w_raw, ids_raw = ref.moe_topk_gate(logits, 3, scoring, False, None)
    assert_same(ids, ids_raw)
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(9), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w_norm, w_raw / w_raw.sum(-1, keepdim=True), rtol=0, atol=0)
    if scoring == "sigmoid":
        assert_same(w_raw, torch.sigmoid(logits).gather(-1, ids.long()))


@pytest.mark.parametrize("tokens, k", [(0, 2), (4, 0), (0, 0)])
def test_topk_gate_empty(tokens, k):
    weights, ids = ref.moe_topk_gate(make_logits(tokens, 5, seed=6), k, "softmax", True, None)
    assert weights.shape == (tokens, k) and weights.dtype == torch.float32
    assert ids.shape == (tokens, k) and ids.dtype == torch.int32


def test_topk_gate_k_equals_e_is_a_full_sort():
    logits = make_logits(6, 5, seed=7)
    _, ids = ref.moe_topk_gate(logits, 5, "softmax", True, None)
    assert_same(ids.long(), torch.argsort(logits, -1, descending=True))


# ---- moe_task_gate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_task_gate_matches_the_oracle(masked, scoring):
    tokens, hidden, experts, tasks = 13, 6, 7, 3
    x = make_x(tokens, hidden, seed=10)
    router = torch.randn((tasks, experts, hidden), generator=gen(11))
    task_ids = torch.randint(0, tasks, (tokens,), generator=gen(12), dtype=torch.int32)
    mask = None
    if masked:
        mask = torch.ones((tasks, experts), dtype=torch.bool)
        mask[0, :3] = False
        mask[2, 4:] = False
    weights, ids, logits = ref.moe_task_gate(x, router, task_ids, 2, mask, scoring, True)
    want_logits = oracle_task_logits(x, router, task_ids, mask)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), want_logits, rtol=1e-5, atol=1e-5)
    want_w, want_ids = oracle_topk(logits, 2, scoring, True)  # the gate of the (checked) logits
    assert_same(ids, want_ids.to(torch.int32))
    torch.testing.assert_close(weights.double(), want_w, rtol=1e-6, atol=1e-7)
    if masked:
        chosen_allowed = mask[task_ids.long()[:, None], ids.long()]
        assert chosen_allowed.all(), "a masked expert was chosen"
        assert torch.isinf(logits[~mask[task_ids.long()]]).all()


def test_task_gate_single_task_is_the_plain_gate():
    x = make_x(9, 5, seed=13)
    router = torch.randn((1, 6, 5), generator=gen(14))
    weights, ids, logits = ref.moe_task_gate(x, router, torch.zeros(9, dtype=torch.int64), 3, None, "softmax", False)
    plain_w, plain_ids = ref.moe_topk_gate(logits, 3, "softmax", False, None)
    assert_same(weights, plain_w)
    assert_same(ids, plain_ids)


# ---- moe_align ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [None, 0, 1, 2, 5, 1000])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_align_matches_the_oracle(capacity, id_dtype):
    ids = make_ids(37, 6, 3, seed=20, unrouted=0.2, dtype=id_dtype, distinct=False)
    got = ref.moe_align(ids, 6, -1 if capacity is None else capacity)
    want = oracle_align(ids, 6, capacity)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)


def test_align_is_stable_and_counts_drops():
    ids = torch.tensor([[2, 0], [2, 2], [-1, 0], [2, 1]])
    sorted_slots, offsets, dropped = ref.moe_align(ids, 4, 2)
    # expert 0: slots 1, 5; expert 1: slot 7; expert 2: slots 0, 2 (3 and 6 dropped); then 3, 4, 6
    assert sorted_slots.tolist() == [1, 5, 7, 0, 2, 3, 4, 6]
    assert offsets.tolist() == [0, 2, 3, 5, 5]
    assert int(dropped) == 2 and dropped.dim() == 0
    sorted_slots, offsets, dropped = ref.moe_align(ids, 4, -1)
    assert sorted_slots.tolist() == [1, 5, 7, 0, 2, 3, 6, 4]
    assert offsets.tolist() == [0, 2, 3, 7, 7] and int(dropped) == 0


@pytest.mark.parametrize("ids", [torch.empty((0, 2), dtype=torch.int64), torch.full((3, 2), -1),
                                 torch.empty((4, 0), dtype=torch.int32)])
def test_align_without_routed_slots(ids):
    sorted_slots, offsets, dropped = ref.moe_align(ids, 5, 3)
    assert_same(sorted_slots, torch.arange(ids.numel()))
    assert_same(offsets, torch.zeros(6, dtype=torch.int64))
    assert int(dropped) == 0


def test_align_treats_out_of_range_ids_as_unrouted():
    ids = torch.tensor([[0, 7], [-3, 1]])
    got = ref.moe_align(ids, 2, -1)
    want = ref.moe_align(torch.tensor([[0, -1], [-1, 1]]), 2, -1)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)


# ---- moe_experts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_experts_match_a_per_token_loop(activation, bias, transposed):
    tokens, hidden, ffn, experts, k = 11, 8, 6, 5, 3
    x = make_x(tokens, hidden, seed=30)
    w = make_experts(experts, hidden, ffn, seed=31, bias=bias, transposed=transposed,
                     scale=4.0 if activation == "gpt_oss" else 1.0)  # reach gpt-oss's clamps
    if transposed:
        assert not w["gate_up"].is_contiguous() and not w["down"].is_contiguous()
    weights = make_weights(tokens, k, seed=32)
    ids = make_ids(tokens, experts, k, seed=33, unrouted=0.2)
    got = ref.moe_experts(x, w["gate_up"], w["down"], weights, ids, activation, w["gate_up_bias"], w["down_bias"])
    want = oracle_experts(x, w["gate_up"], w["down"], weights, ids, activation, w["gate_up_bias"], w["down_bias"])
    assert got.dtype == x.dtype
    assert_experts_close(got, want, torch.float32)


def test_gpt_oss_clamps_are_reached():
    """The gpt_oss case above exercises both clamps (else it would not test them)."""
    x = make_x(11, 8, seed=30)
    w = make_experts(5, 8, 6, seed=31, scale=4.0)
    h = torch.einsum("eoh,th->teo", w["gate_up"], x)
    assert (h[..., 0::2] > 7).any() and (h[..., 1::2].abs() > 7).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_low_precision(dtype):
    tokens, hidden, ffn, experts, k = 9, 16, 8, 4, 2
    x = make_x(tokens, hidden, dtype, seed=34)
    w = make_experts(experts, hidden, ffn, dtype, seed=35, bias=True)
    weights = make_weights(tokens, k, torch.bfloat16, seed=36)
    ids = make_ids(tokens, experts, k, seed=37, dtype=torch.int32)
    got = ref.moe_experts(x, w["gate_up"], w["down"], weights, ids, "silu", w["gate_up_bias"], w["down_bias"])
    want = oracle_experts(x, w["gate_up"], w["down"], weights, ids, "silu", w["gate_up_bias"], w["down_bias"])
    assert got.dtype == dtype
    assert_experts_close(got, want, dtype)


def test_experts_repeated_ids():
    """A token may hit one expert twice; the slots add up (a token with only -1 gets zeros)."""
    x = make_x(4, 8, seed=38)
    w = make_experts(3, 8, 4, seed=39)
    ids = torch.tensor([[1, 1, 0], [2, -1, 2], [0, 1, 2], [-1, -1, -1]])
    weights = make_weights(4, 3, seed=40)
    got = ref.moe_experts(x, w["gate_up"], w["down"], weights, ids, "silu", None, None)
    assert_experts_close(got, oracle_experts(x, w["gate_up"], w["down"], weights, ids, "silu"), torch.float32)
    assert_same(got[3], torch.zeros(8))
    singles = [ref.moe_experts(x, w["gate_up"], w["down"], weights[:, j:j + 1], ids[:, j:j + 1], "silu", None, None)
               for j in range(3)]
    assert_experts_close(got, singles[0] + singles[1] + singles[2], torch.float32)


@pytest.mark.parametrize("tokens, k, unrouted", [(0, 2, 0.0), (5, 0, 0.0), (5, 2, 1.0)])
def test_experts_without_routed_slots_give_zeros(tokens, k, unrouted):
    x = make_x(tokens, 8, seed=41)
    w = make_experts(3, 8, 4, seed=42, bias=True)
    ids = make_ids(tokens, 3, k, seed=43, unrouted=unrouted)
    y = ref.moe_experts(x, w["gate_up"], w["down"], make_weights(tokens, k), ids, "gelu", w["gate_up_bias"],
                        w["down_bias"])
    assert_same(y, torch.zeros(tokens, 8))


def test_experts_round_a_to_x_dtype():
    """``a`` is rounded to x's dtype: the bf16 result equals the oracle that rounds, more closely
    than the one that does not (the rounding is visible)."""
    x = make_x(16, 32, torch.bfloat16, seed=44)
    w = make_experts(2, 32, 16, torch.bfloat16, seed=45)
    weights, ids = make_weights(16, 1, seed=46), make_ids(16, 2, 1, seed=47)
    got = ref.moe_experts(x, w["gate_up"], w["down"], weights, ids, "silu", None, None).double()
    rounded = oracle_experts(x, w["gate_up"], w["down"], weights, ids, "silu").to(torch.bfloat16).double()
    exact = oracle_experts(x, w["gate_up"], w["down"], weights, ids, "silu",
                           round_to=torch.float64).to(torch.bfloat16).double()
    assert (got - rounded).abs().sum() < (got - exact).abs().sum()


# ---- moe_experts_backward: the hand-written formulas against autograd ----------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_experts_backward_matches_autograd(activation, bias):
    tokens, hidden, ffn, experts, k = 7, 6, 4, 4, 2
    d = torch.float64
    x = make_x(tokens, hidden, d, seed=50).requires_grad_()
    w = make_experts(experts + 1, hidden, ffn, d, seed=51, bias=bias, transposed=True,
                     scale=4.0 if activation == "gpt_oss" else 1.0)  # expert 4 gets no slot
    gate_up, down = w["gate_up"].requires_grad_(), w["down"].requires_grad_()
    b1 = None if w["gate_up_bias"] is None else w["gate_up_bias"].requires_grad_()
    b2 = None if w["down_bias"] is None else w["down_bias"].requires_grad_()
    weights = make_weights(tokens, k, d, seed=52).requires_grad_()
    ids = make_ids(tokens, experts, k, seed=53, unrouted=0.2, dtype=torch.int32)
    grad_out = make_x(tokens, hidden, d, seed=54)
    y = ref.moe_experts(x, gate_up, down, weights, ids, activation, b1, b2)
    inputs = [x, gate_up, down, weights] + [b for b in (b1, b2) if b is not None]
    want = torch.autograd.grad(y, inputs, grad_out)
    got = ref.moe_experts_backward(grad_out, x.detach(), gate_up.detach(), down.detach(), weights.detach(), ids,
                                   activation, None if b1 is None else b1.detach(),
                                   None if b2 is None else b2.detach())
    assert len(got) == 6
    for g, want_g in zip(got[:4], want[:4], strict=True):
        assert g.dtype == want_g.dtype and g.is_contiguous()
        torch.testing.assert_close(g, want_g, rtol=1e-10, atol=1e-12)
    assert_same(got[2][experts], torch.zeros(hidden, ffn, dtype=d))  # the expert without slots
    if bias:
        torch.testing.assert_close(got[4], want[4], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[5], want[5], rtol=1e-10, atol=1e-12)
    else:
        assert got[4].shape == (0,) and got[5].shape == (0,)


def test_experts_backward_dtypes_follow_the_inputs():
    x = make_x(5, 8, torch.bfloat16, seed=55)
    w = make_experts(3, 8, 4, torch.bfloat16, seed=56, bias=True)
    weights = make_weights(5, 2, torch.float32, seed=57)
    ids = make_ids(5, 3, 2, seed=58)
    grads = ref.moe_experts_backward(torch.ones_like(x), x, w["gate_up"], w["down"], weights, ids, "silu",
                                     w["gate_up_bias"], w["down_bias"])
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 + [torch.float32] + [torch.bfloat16] * 2
    assert [tuple(g.shape) for g in grads] == [(5, 8), (3, 8, 8), (3, 8, 4), (5, 2), (3, 8), (3, 8)]


# ---- losses (formulas; transformers parity is in test_losses.py) ------------------------------------------


def test_load_balancing_loss_formula():
    logits = make_logits(10, 4, seed=60)
    ids = torch.tensor([[0, 1]] * 6 + [[2, -1]] * 4)
    p = torch.softmax(logits.double(), -1)
    counts = torch.tensor([6.0, 6.0, 4.0, 0.0], dtype=torch.float64)
    want = 4 * sum(counts[e] / 10 * p[:, e].mean() for e in range(4))
    got = ref.moe_load_balancing_loss(logits, ids, 4)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    assert_same(ref.moe_load_balancing_loss(logits[:0], ids[:0], 4), torch.tensor(0.0))


def test_router_z_loss_formula():
    logits = make_logits(10, 4, seed=61) * 3
    want = sum(torch.log(torch.exp(row.double()).sum()) ** 2 for row in logits) / 10
    got = ref.moe_router_z_loss(logits)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    assert_same(ref.moe_router_z_loss(logits[:0]), torch.tensor(0.0))
