"""Shared helpers of the low-rank-family tests: small inputs, and independent oracles of
docs/lowrank.md's semantics written as Python loops in float64 (they share no code with
``mtmerge.reference.lowrank``, so a test that compares the two can fail).

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
# docs/lowrank.md: fp32 1e-5 (GEMM-like reductions 1e-4), bf16 2e-2; fp16 in between
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
}
GEMM_TOLERANCES = {**TOLERANCES, torch.float32: {"atol": 1e-4, "rtol": 1e-4}}
DIFFERENTIABLE = ("lama_pool", "linformer_attention", "multi_lora")


def lowrank_op_names() -> list[str]:
    """The low-rank family's ops (every op defined in mtmerge/ops/_lowrank_ops.py)."""
    from mtmerge.ops import _lowrank_ops

    return [spec.name for spec in _lowrank_ops.LOWRANK_OPS]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, dtype=torch.float32, seed: int = 0, scale: float = 1.0) -> Tensor:
    return (torch.randn(shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


# ---- inputs (built on CPU) ----------------------------------------------------------------------


def make_lama(batch: int = 2, tokens: int = 7, hidden: int = 6, heads: int = 3, dtype=torch.float32,
              seed: int = 0, *, masked: bool = False, context: bool = False) -> dict:
    """Keyword arguments of ``lama_pool``; ``masked`` pads the tail of row 0 and the whole last row
    (when ``batch > 1``)."""
    mask = None
    if masked:
        mask = torch.ones((batch, tokens), dtype=torch.bool)
        mask[0, tokens - max(tokens // 3, 1):] = False
        if batch > 1:
            mask[-1] = False
    return dict(h=randn(batch, tokens, hidden, dtype=dtype, seed=seed),
                P=randn(hidden, heads, dtype=dtype, seed=seed + 1, scale=1.5),
                Q=randn(hidden, heads, dtype=dtype, seed=seed + 2, scale=1.5),
                mask=mask,
                context=randn(batch, hidden, dtype=dtype, seed=seed + 3) if context else None)


def make_linformer(batch: int = 2, heads: int = 2, queries: int = 5, keys: int = 6, head_dim: int = 4,
                   rank: int = 3, width: int | None = None, dtype=torch.float32, seed: int = 0, *,
                   masked: bool = False) -> dict:
    """Keyword arguments of ``linformer_attention`` (``scale = 1/sqrt(d)``); ``masked`` pads the
    last two keys of row 0 and every key of the last row (when ``batch > 1``)."""
    width = keys + 2 if width is None else width
    mask = None
    if masked:
        mask = torch.zeros((batch, keys), dtype=torch.bool)
        mask[0, max(keys - 2, 0):] = True
        if batch > 1:
            mask[-1] = True
    return dict(q=randn(batch, heads, queries, head_dim, dtype=dtype, seed=seed),
                k=randn(batch, heads, keys, head_dim, dtype=dtype, seed=seed + 1),
                v=randn(batch, heads, keys, head_dim, dtype=dtype, seed=seed + 2),
                E=randn(rank, width, dtype=dtype, seed=seed + 3, scale=1 / math.sqrt(keys)),
                F=randn(rank, width, dtype=dtype, seed=seed + 4, scale=1 / math.sqrt(keys)),
                key_padding_mask=mask, scale=1 / math.sqrt(head_dim))


def make_lora(tokens: int = 9, in_features: int = 7, out_features: int = 5, rank: int = 3, adapters: int = 3,
              dtype=torch.float32, seed: int = 0, *, base: bool = True, unrouted: float = 0.2,
              id_dtype=torch.int64) -> dict:
    """Keyword arguments of ``multi_lora``: ids uniform over ``[0, L)`` with a fraction
    ``unrouted`` set to -1, per-adapter scales in ``[0.5, 2)``."""
    g = gen(seed)
    ids = torch.randint(0, adapters, (tokens,), generator=g) if adapters else torch.full((tokens,), -1)
    ids = torch.where(torch.rand(tokens, generator=g) < unrouted, torch.full_like(ids, -1), ids)
    return dict(x=randn(tokens, in_features, dtype=dtype, seed=seed + 1),
                A=randn(adapters, rank, in_features, dtype=dtype, seed=seed + 2, scale=1 / math.sqrt(in_features)),
                B=randn(adapters, out_features, rank, dtype=dtype, seed=seed + 3, scale=1 / math.sqrt(rank)),
                adapter_ids=ids.to(id_dtype),
                scale=(torch.rand(adapters, generator=g) * 1.5 + 0.5).float(),
                base=randn(tokens, out_features, dtype=dtype, seed=seed + 4) if base else None)


def grads_on(kwargs: dict, names) -> dict:
    """``kwargs`` with the tensors named in ``names`` (when present) as fresh leaves requiring grad."""
    return {k: v.detach().clone().requires_grad_() if k in names and isinstance(v, Tensor) else v
            for k, v in kwargs.items()}


# ---- oracles: docs/lowrank.md's text as loops, in float64 ----------------------------------------------


def _dot(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


def oracle_lama(h: Tensor, P: Tensor, Q: Tensor, mask: Tensor | None, context: Tensor | None):
    """float64 ``(attn [B, m, T], pooled [B, m, D])`` by loops over rows, tokens and heads."""
    batch, tokens, hidden = h.shape
    heads = P.shape[1]
    hd, pd, qd = h.double().tolist(), P.double().t().tolist(), Q.double().t().tolist()  # P^T, Q^T: [m][D]
    attn = torch.zeros((batch, heads, tokens), dtype=torch.float64)
    pooled = torch.zeros((batch, heads, hidden), dtype=torch.float64)
    for b in range(batch):
        real = [True] * tokens if mask is None else [bool(v) for v in mask[b]]
        n_real = sum(real)
        if context is not None:
            c = context[b].double().tolist()
        else:
            c = [math.fsum(hd[b][t][d] for t in range(tokens) if real[t]) / n_real if n_real else 0.0
                 for d in range(hidden)]
        u = [_dot(pd[i], c) for i in range(heads)]
        f = []
        for t in range(tokens):
            z = [math.tanh(u[i] * _dot(qd[i], hd[b][t])) for i in range(heads)]
            norm = max(math.sqrt(math.fsum(v * v for v in z)), 1e-12)
            f.append([v / norm for v in z])
        for i in range(heads):
            if not n_real:
                continue
            top = max(f[t][i] for t in range(tokens) if real[t])
            e = [math.exp(f[t][i] - top) if real[t] else 0.0 for t in range(tokens)]
            total = math.fsum(e)
            for t in range(tokens):
                attn[b, i, t] = e[t] / total
            for d in range(hidden):
                pooled[b, i, d] = math.fsum(attn[b, i, t].item() * hd[b][t][d] for t in range(tokens))
    return attn, pooled


def oracle_linformer(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, key_padding_mask: Tensor | None,
                     scale: float) -> Tensor:
    """float64 ``[B, Hh, Nq, d]``: per row and head, project the unpadded keys/values, then a
    softmax per query over the ``r`` projected keys."""
    batch, heads, queries, head_dim = q.shape
    keys, rank = k.shape[2], E.shape[0]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        kept = [n for n in range(keys) if key_padding_mask is None or not bool(key_padding_mask[b, n])]
        for hh in range(heads):
            kb, vb = k[b, hh].double().tolist(), v[b, hh].double().tolist()
            kp = [[math.fsum(float(E[j, n]) * kb[n][d] for n in kept) for d in range(head_dim)] for j in range(rank)]
            vp = [[math.fsum(float(F[j, n]) * vb[n][d] for n in kept) for d in range(head_dim)] for j in range(rank)]
            for i in range(queries):
                qi = q[b, hh, i].double().tolist()
                s = [_dot(qi, kp[j]) * scale for j in range(rank)]
                top = max(s)
                e = [math.exp(x - top) for x in s]
                total = math.fsum(e)
                for d in range(head_dim):
                    out[b, hh, i, d] = math.fsum(e[j] / total * vp[j][d] for j in range(rank))
    return out


def oracle_lora(x: Tensor, A: Tensor, B: Tensor, adapter_ids: Tensor, scale: Tensor, base: Tensor | None) -> Tensor:
    """float64 ``[T, out]``: per token, its adapter's ``scale * B (A x)`` plus the base."""
    tokens, out_features = x.shape[0], B.shape[1]
    y = torch.zeros((tokens, out_features), dtype=torch.float64) if base is None else base.double().clone()
    for t in range(tokens):
        g = int(adapter_ids[t])
        if not 0 <= g < A.shape[0]:
            continue
        xt = x[t].double().tolist()
        shrunk = [_dot(row, xt) for row in A[g].double().tolist()]
        for o, row in enumerate(B[g].double().tolist()):
            y[t, o] += float(scale[g]) * _dot(row, shrunk)
    return y


# ---- comparisons ---------------------------------------------------------------------------------


def assert_same(got: Tensor, want: Tensor) -> None:
    """Same dtype, shape and bits."""
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), (got.dtype, want.dtype,
                                                                               tuple(got.shape), tuple(want.shape))
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, equal_nan=True)


def assert_close(got: Tensor, want: Tensor, dtype: torch.dtype, *, gemm: bool = False) -> None:
    """Within docs/lowrank.md's tolerance for inputs of ``dtype`` (compared in float64)."""
    assert tuple(got.shape) == tuple(want.shape), (tuple(got.shape), tuple(want.shape))
    tol = (GEMM_TOLERANCES if gemm else TOLERANCES)[dtype]
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **tol)


# ---- argument sets for every op (opcheck, backend tests) -------------------------------------------


def op_cases(device="cpu") -> dict[str, list[dict]]:
    """op name -> small keyword-argument dicts (CPU-built, moved to ``device``); the float64 cases
    require grad on the differentiable ops so that opcheck checks their autograd registration."""
    D = torch.float64
    lama = make_lama(seed=800, masked=True)
    lama_bf = make_lama(2, 5, 4, 2, torch.bfloat16, seed=801, context=True)
    lama64 = grads_on(make_lama(2, 5, 4, 3, D, seed=802, masked=True, context=True), ("h", "P", "Q", "context"))
    lama64_mean = grads_on(make_lama(2, 4, 3, 2, D, seed=803, masked=True), ("h", "P", "Q"))
    lin = make_linformer(seed=810, masked=True)
    lin_h = make_linformer(1, 2, 3, 4, 8, 2, 9, torch.float16, seed=811)
    lin64 = grads_on(make_linformer(2, 1, 3, 4, 3, 2, 6, D, seed=812, masked=True), ("q", "k", "v", "E", "F"))
    lora = make_lora(seed=820)
    lora_bf = make_lora(6, 8, 3, 1, 2, torch.bfloat16, seed=821, base=False, id_dtype=torch.int32)
    lora64 = grads_on(make_lora(5, 4, 3, 2, 2, D, seed=822), ("x", "A", "B", "base"))

    def lama_grads(kw, seed):
        b, t, d = kw["h"].shape
        m = kw["P"].shape[1]
        cd = D if kw["h"].dtype == D else torch.float32
        return dict(grad_attn=randn(b, m, t, dtype=cd, seed=seed), grad_pooled=randn(b, m, d, dtype=kw["h"].dtype,
                                                                                      seed=seed + 1))

    def detached(kw):
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in kw.items()}

    cases = {
        "lama_pool": [lama, lama_bf, lama64, lama64_mean,
                      make_lama(1, 0, 3, 2, seed=804)],
        "lama_pool_backward": [
            {**lama_grads(lama, 805), **lama},
            {**lama_grads(lama_bf, 806), **lama_bf},
            {**lama_grads(lama64, 807), **detached(lama64)},
        ],
        "linformer_attention": [lin, lin_h, lin64],
        "linformer_attention_backward": [
            {"grad_out": randn(*lin["q"].shape, seed=813), **lin},
            {"grad_out": randn(*lin_h["q"].shape, dtype=torch.float16, seed=814), **lin_h},
        ],
        "multi_lora": [lora, lora_bf, lora64, make_lora(0, 4, 3, 2, 2, seed=823)],
        "multi_lora_backward": [
            {"grad_out": randn(9, 5, seed=824), **{k: v for k, v in lora.items() if k != "base"}},
            {"grad_out": randn(6, 3, dtype=torch.bfloat16, seed=825),
             **{k: v for k, v in lora_bf.items() if k != "base"}},
        ],
    }
    return {name: [to_device(kwargs, device) for kwargs in variants] for name, variants in cases.items()}


def assert_launcher_matches_reference(op: str) -> None:
    """The shared argument sets of the op tests (:func:`op_cases`) through ``op``'s Triton launcher
    (compiled on a GPU, interpreted on CPU), against the reference: same dtypes, values within
    :func:`assert_close`'s GEMM tolerance."""
    from mtmerge.kernels import lowrank as launchers

    from mtmerge.reference import lowrank as ref

    for kwargs in op_cases()[op]:
        kwargs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        dtype = next(v.dtype for k, v in kwargs.items() if k in ("h", "q", "x"))
        got = getattr(launchers, op)(**to_device(kwargs, TRITON_DEVICE))
        want = getattr(ref, op)(**kwargs)
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype
            assert_close(g, w, dtype, gemm=True)
