"""Shared helpers of the MoE-family tests: small inputs, and independent oracles of docs/moe.md's
semantics written as per-token Python loops (they share no code with ``mtmerge.reference.moe``,
so a test that compares the two can fail).

Shapes stay small: the Triton interpreter and gradcheck are slow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tests.ops.family_checks import to_device

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA = torch.cuda.is_available()
# devices the public API and opcheck are run on (the C++ kernels on CPU, Triton on CUDA)
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]
TRITON_DEVICE = "cuda" if CUDA else "cpu"
ACTIVATIONS = ["silu", "gelu", "gelu_tanh", "relu", "gpt_oss"]
# GEMM-like reductions (moe_experts and its backward), per docs/moe.md
EXPERT_TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
}


def moe_op_names() -> list[str]:
    """The MoE family's ops (every op defined in mtmerge/ops/_moe_ops.py)."""
    from mtmerge.ops import _moe_ops

    return [spec.name for spec in _moe_ops.MOE_OPS]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- inputs (built on CPU) ----------------------------------------------------------------------


def make_logits(tokens: int, experts: int, dtype=torch.float32, seed: int = 0, *, spread: float = 2.0) -> Tensor:
    """``[T, E]`` logits without near-ties: a random permutation of well separated values per row
    (gaps of ``spread / E``), plus noise much smaller than the gaps."""
    g = gen(seed)
    ranks = torch.stack([torch.randperm(experts, generator=g) for _ in range(tokens)]) if tokens else \
        torch.empty((0, experts), dtype=torch.int64)
    base = ranks.float() * (spread / max(experts, 1)) - spread / 2
    noise = torch.rand(base.shape, generator=g) * (spread / max(experts, 1)) * 0.05
    return (base + noise).to(dtype)


def make_ids(tokens: int, experts: int, k: int, seed: int = 0, *, unrouted: float = 0.0,
             dtype=torch.int64, distinct: bool = True) -> Tensor:
    """``[T, k]`` expert ids (distinct per row, as a gate gives them, unless ``distinct=False``),
    a fraction ``unrouted`` of them replaced by -1."""
    g = gen(seed)
    if distinct:
        rows = [torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]
        ids = torch.stack(rows) if tokens else torch.empty((0, k), dtype=torch.int64)
    else:
        ids = torch.randint(0, experts, (tokens, k), generator=g)
    if unrouted:
        ids = torch.where(torch.rand(ids.shape, generator=g) < unrouted, torch.full_like(ids, -1), ids)
    return ids.to(dtype)


def make_weights(tokens: int, k: int, dtype=torch.float32, seed: int = 0) -> Tensor:
    return (torch.rand((tokens, k), generator=gen(seed)) + 0.1).to(dtype)


def make_experts(experts: int, hidden: int, ffn: int, dtype=torch.float32, seed: int = 0, *, bias: bool = False,
                 transposed: bool = False, scale: float = 1.0) -> dict[str, Tensor | None]:
    """``gate_up [E, 2F, H]``, ``down [E, H, F]`` (and biases); ``transposed=True`` stores them as
    ``[E, H, 2F]`` / ``[E, F, H]`` and returns transposed (non-contiguous) views, as gpt-oss does."""
    g = gen(seed)
    gate_up = torch.randn((experts, 2 * ffn, hidden), generator=g) * (scale / math.sqrt(hidden))
    down = torch.randn((experts, hidden, ffn), generator=g) / math.sqrt(ffn)
    gate_up_bias = torch.randn((experts, 2 * ffn), generator=g) * 0.1 if bias else None
    down_bias = torch.randn((experts, hidden), generator=g) * 0.1 if bias else None
    gate_up, down = gate_up.to(dtype), down.to(dtype)
    if transposed:
        gate_up = gate_up.transpose(1, 2).contiguous().transpose(1, 2)
        down = down.transpose(1, 2).contiguous().transpose(1, 2)
    return dict(gate_up=gate_up, down=down,
                gate_up_bias=None if gate_up_bias is None else gate_up_bias.to(dtype),
                down_bias=None if down_bias is None else down_bias.to(dtype))


def make_x(tokens: int, hidden: int, dtype=torch.float32, seed: int = 0) -> Tensor:
    return torch.randn((tokens, hidden), generator=gen(seed)).to(dtype)


def record_moe_experts(monkeypatch, module) -> list[tuple]:
    """Every later call of ``module.moe_experts`` (an integration's or a layer's), recorded as
    ``(gate_up, down, ids, kwargs)`` (ids cloned), then run."""
    seen = []
    real = module.moe_experts

    def counting(x, gate_up, down, weights, ids, **kwargs):
        seen.append((gate_up, down, ids.clone(), kwargs))
        return real(x, gate_up, down, weights, ids, **kwargs)

    monkeypatch.setattr(module, "moe_experts", counting)
    return seen


# ---- oracles: docs/moe.md's text as per-token loops, in float64 ---------------------------------------


def oracle_topk(logits: Tensor, k: int, scoring: str, renormalize: bool, bias: Tensor | None = None):
    """``(weights float64 [T, k], ids int64 [T, k])``: scores in float64 from the float32 logits,
    ids the k largest ``s + bias`` by (value descending, index ascending)."""
    weights, ids = [], []
    for row in logits.double().tolist():
        if scoring == "softmax":
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            s = [e / sum(exps) for e in exps]
        else:
            s = [1.0 / (1.0 + math.exp(-v)) for v in row]
        choice = s if bias is None else [a + b for a, b in zip(s, bias.double().tolist(), strict=True)]
        order = sorted(range(len(row)), key=lambda e, c=choice: (-c[e], e))[:k]
        w = [s[e] for e in order]
        if renormalize and k:
            total = sum(w)
            w = [v / total for v in w]
        weights.append(w)
        ids.append(order)
    shape = (len(ids), k)
    return (torch.tensor(weights, dtype=torch.float64).reshape(shape),
            torch.tensor(ids, dtype=torch.int64).reshape(shape))


def oracle_task_logits(x: Tensor, router: Tensor, task_ids: Tensor, expert_mask: Tensor | None) -> Tensor:
    """float64 ``[T, E]``: per token, its task's router times the token; -inf where masked."""
    tokens, experts = x.shape[0], router.shape[1]
    out = torch.empty((tokens, experts), dtype=torch.float64)
    for t in range(tokens):
        n = int(task_ids[t])
        for e in range(experts):
            if expert_mask is not None and not bool(expert_mask[n, e]):
                out[t, e] = float("-inf")
            else:
                out[t, e] = float((router[n, e].double() * x[t].double()).sum())
    return out


def oracle_align(ids: Tensor, num_experts: int, capacity: int | None):
    """``(sorted_slots, expert_offsets, dropped)`` as int64 tensors, from Python lists."""
    flat = ids.reshape(-1).tolist()
    per_expert: list[list[int]] = [[] for _ in range(num_experts)]
    for s, e in enumerate(flat):
        if 0 <= e < num_experts:
            per_expert[e].append(s)
    kept = [slots if capacity is None else slots[:capacity] for slots in per_expert]
    kept_set = {s for slots in kept for s in slots}
    order = [s for slots in kept for s in slots] + [s for s in range(len(flat)) if s not in kept_set]
    offsets = [0]
    for slots in kept:
        offsets.append(offsets[-1] + len(slots))
    dropped = sum(len(a) - len(b) for a, b in zip(per_expert, kept, strict=True))
    return (torch.tensor(order, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64),
            torch.tensor(dropped, dtype=torch.int64))


def _act(z: float, activation: str) -> float:
    if activation == "silu":
        return z / (1.0 + math.exp(-z))
    if activation == "gelu":
        return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * z * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    if activation == "relu":
        return max(z, 0.0)
    raise ValueError(activation)


def oracle_glu(h: list[float], activation: str) -> list[float]:
    """``a [F]`` from ``h [2F]`` by docs/moe.md's text."""
    f = len(h) // 2
    if activation == "gpt_oss":
        out = []
        for i in range(f):
            gate, up = min(h[2 * i], 7.0), min(max(h[2 * i + 1], -7.0), 7.0)
            out.append((up + 1.0) * gate / (1.0 + math.exp(-1.702 * gate)))
        return out
    return [_act(h[i], activation) * h[f + i] for i in range(f)]


def oracle_experts(x: Tensor, gate_up: Tensor, down: Tensor, weights: Tensor, ids: Tensor, activation: str,
                   gate_up_bias: Tensor | None = None, down_bias: Tensor | None = None,
                   round_to: torch.dtype | None = None) -> Tensor:
    """float64 ``[T, H]``: a loop over tokens and slots; ``a`` is rounded to ``round_to``
    (x's dtype, as docs/moe.md says) when given."""
    round_to = x.dtype if round_to is None else round_to
    num_experts = gate_up.shape[0]
    xd, gu, dn, w = x.double(), gate_up.double(), down.double(), weights.double()
    y = torch.zeros(xd.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < num_experts:
                continue
            h = gu[e] @ xd[t]
            if gate_up_bias is not None:
                h = h + gate_up_bias[e].double()
            a = torch.tensor(oracle_glu(h.tolist(), activation), dtype=torch.float64)
            a = a.to(round_to).double()
            o = dn[e] @ a
            if down_bias is not None:
                o = o + down_bias[e].double()
            y[t] += w[t, j] * o
    return y


# ---- comparisons ---------------------------------------------------------------------------------


def assert_same(got: Tensor, want: Tensor) -> None:
    """Same dtype, shape and bits."""
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), (got.dtype, want.dtype,
                                                                               tuple(got.shape), tuple(want.shape))
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, equal_nan=True)


def assert_experts_close(got: Tensor, want: Tensor, dtype: torch.dtype) -> None:
    assert tuple(got.shape) == tuple(want.shape), (tuple(got.shape), tuple(want.shape))
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **EXPERT_TOLERANCES[dtype])


# ---- argument sets for every op (opcheck, backend tests) -------------------------------------------


def op_cases(device="cpu") -> dict[str, list[dict]]:
    """op name -> small keyword-argument dicts (CPU-built, moved to ``device``); the float64 cases
    require grad on the differentiable ops so that opcheck checks their autograd registration."""
    logits = make_logits(9, 6, seed=900)
    logits64 = make_logits(5, 6, torch.float64, seed=901).requires_grad_()
    x = make_x(7, 8, seed=902)
    router = torch.randn((3, 6, 8), generator=gen(903))
    task_ids = torch.tensor([0, 2, 1, 1, 0, 2, 2], dtype=torch.int32)
    mask = torch.ones((3, 6), dtype=torch.bool)
    mask[1, :2] = False
    ids = make_ids(7, 5, 2, seed=904, unrouted=0.2)
    weights = make_weights(7, 2, seed=905)
    w = make_experts(5, 8, 4, seed=906, bias=True)
    wt = make_experts(5, 8, 4, torch.bfloat16, seed=907, transposed=True)
    x64 = make_x(7, 8, torch.float64, seed=908)
    w64 = make_experts(5, 8, 4, torch.float64, seed=909, bias=True)
    weights64 = make_weights(7, 2, torch.float64, seed=910)

    def grad(t):
        return t.clone().requires_grad_()

    experts64 = dict(x=grad(x64), gate_up=grad(w64["gate_up"]), down=grad(w64["down"]), weights=grad(weights64),
                     ids=ids, activation="gpt_oss", gate_up_bias=grad(w64["gate_up_bias"]),
                     down_bias=grad(w64["down_bias"]))
    cases = {
        "moe_topk_gate": [
            dict(logits=logits, k=2, scoring="softmax", renormalize=True, bias=None),
            dict(logits=logits.bfloat16(), k=3, scoring="sigmoid", renormalize=False, bias=torch.rand(6)),
            dict(logits=logits[:0], k=0, scoring="softmax", renormalize=True, bias=None),
            dict(logits=logits64, k=2, scoring="sigmoid", renormalize=True, bias=None),
        ],
        "moe_task_gate": [
            dict(x=x, router=router, task_ids=task_ids, k=2, expert_mask=None, scoring="softmax", renormalize=True),
            dict(x=x.bfloat16(), router=router.bfloat16(), task_ids=task_ids.long(), k=3, expert_mask=mask,
                 scoring="sigmoid", renormalize=False),
            dict(x=grad(x64), router=grad(router.double()), task_ids=task_ids, k=2, expert_mask=None,
                 scoring="softmax", renormalize=True),
        ],
        "moe_align": [
            dict(ids=ids, num_experts=5, capacity=-1),
            dict(ids=ids.int(), num_experts=5, capacity=1),
            dict(ids=ids[:0], num_experts=5, capacity=0),
        ],
        "moe_experts": [
            dict(x=x, gate_up=w["gate_up"], down=w["down"], weights=weights, ids=ids, activation="silu",
                 gate_up_bias=w["gate_up_bias"], down_bias=w["down_bias"]),
            dict(x=x.bfloat16(), gate_up=wt["gate_up"], down=wt["down"], weights=weights.bfloat16(), ids=ids.int(),
                 activation="gelu_tanh", gate_up_bias=None, down_bias=None),
            experts64,
        ],
        "moe_experts_backward": [
            dict(grad_out=make_x(7, 8, seed=911), x=x, gate_up=w["gate_up"], down=w["down"], weights=weights,
                 ids=ids, activation="gelu", gate_up_bias=w["gate_up_bias"], down_bias=w["down_bias"]),
            dict(grad_out=make_x(7, 8, torch.bfloat16, seed=912), x=x.bfloat16(), gate_up=wt["gate_up"],
                 down=wt["down"], weights=weights, ids=ids.int(), activation="gpt_oss", gate_up_bias=None,
                 down_bias=None),
        ],
        "moe_load_balancing_loss": [
            dict(router_logits=logits, ids=make_ids(9, 6, 2, seed=913), num_experts=6),
            dict(router_logits=logits.bfloat16(), ids=make_ids(9, 6, 2, seed=914, unrouted=0.3, dtype=torch.int32),
                 num_experts=6),
            dict(router_logits=logits64, ids=make_ids(5, 6, 2, seed=915), num_experts=6),
        ],
        "moe_router_z_loss": [
            dict(router_logits=logits),
            dict(router_logits=logits.half()),
            dict(router_logits=logits64),
        ],
    }
    return {name: [to_device(kwargs, device) for kwargs in variants] for name, variants in cases.items()}
