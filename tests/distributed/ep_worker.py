"""The per-rank body of tests/distributed/test_expert_parallel.py (a module of its own so that
``torch.multiprocessing.spawn`` can import it in the children under any pytest import mode).

Every rank builds the same single-process :class:`mtmerge.nn.MoEFeedForward` (same seed), its
expert-parallel version, and the same per-rank inputs; it runs its own tokens through the
expert-parallel layer and all ranks' tokens through the single-process one, then compares the
outputs, the auxiliary losses and the gradients (its inputs, the summed router gradient, its
expert shard against the matching slices). Failures raise (``spawn`` re-raises them in the
parent); a JSON summary per rank goes to ``out_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

#: (name, layer kwargs, tokens per rank) of each case run in the same process group
CASES: tuple[tuple[str, dict[str, Any], tuple[int, ...]], ...] = (
    ("silu", {"activation": "silu"}, (13, 7)),
    ("gelu_bias_sigmoid_k3", {"activation": "gelu", "bias": True, "scoring": "sigmoid", "renormalize": False,
                              "top_k": 3}, (9, 11)),
    ("rank1_empty", {"activation": "silu"}, (10, 0)),
)
SIZES = {"hidden": 12, "ffn": 10, "num_experts": 4, "top_k": 2}
AUX = (0.1, 0.01)  # coefficients of the load-balancing and z losses in the test's loss
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _inputs(tokens: tuple[int, ...], hidden: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(t, hidden, generator=gen) for t in tokens]
    gs = [torch.randn(t, hidden, generator=gen) for t in tokens]
    return xs, gs


def _loss(out: Any, g: torch.Tensor) -> torch.Tensor:
    return (out.output * g).sum() + AUX[0] * out.load_balancing_loss + AUX[1] * out.router_z_loss


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.detach()
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{name}: {m}")
    return float((actual - expected).abs().max()) if actual.numel() else 0.0


def run_case(name: str, kwargs: dict[str, Any], tokens: tuple[int, ...], seed: int) -> dict[str, Any]:
    """One comparison on this rank; returns the largest differences and the exchange's row counts."""
    from mtmerge.distributed import ExpertParallelMoE
    from mtmerge.nn import MoEFeedForward

    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = {**SIZES, **{k: v for k, v in kwargs.items() if k in SIZES}}
    extra = {k: v for k, v in kwargs.items() if k not in SIZES}
    dense = MoEFeedForward(sizes["hidden"], sizes["ffn"], sizes["num_experts"], sizes["top_k"], seed=seed, **extra)
    ep = ExpertParallelMoE.from_dense(dense)
    assert ep.local_experts == sizes["num_experts"] // world and ep.expert_offset == rank * ep.local_experts
    xs, gs = _inputs(tokens, sizes["hidden"], seed + 1)

    # expert parallel: this rank's tokens only
    x_ep = xs[rank].clone().requires_grad_(True)
    out_ep = ep(x_ep)
    _loss(out_ep, gs[rank]).backward()
    ep.all_reduce_router_grads()

    # single process: every rank's tokens through the full layer, the same summed loss
    x_ref = [x.clone().requires_grad_(True) for x in xs]
    outs = [dense(x) for x in x_ref]
    sum(_loss(o, g) for o, g in zip(outs, gs, strict=True)).backward()

    shard = slice(ep.expert_offset, ep.expert_offset + ep.local_experts)
    diffs = {
        "output": _close("output", out_ep.output, outs[rank].output.detach()),
        "router_logits": _close("router_logits", out_ep.router_logits, outs[rank].router_logits.detach()),
        "load_balancing_loss": _close("load_balancing_loss", out_ep.load_balancing_loss,
                                      outs[rank].load_balancing_loss.detach()),
        "router_z_loss": _close("router_z_loss", out_ep.router_z_loss, outs[rank].router_z_loss.detach()),
        "grad_x": _close("grad_x", x_ep.grad, x_ref[rank].grad),
        "grad_router": _close("grad_router", ep.router.grad, dense.router.grad),
        "grad_gate_up": _close("grad_gate_up", ep.gate_up.grad, dense.gate_up.grad[shard]),
        "grad_down": _close("grad_down", ep.down.grad, dense.down.grad[shard]),
    }
    if dense.gate_up_bias is not None:
        diffs["grad_gate_up_bias"] = _close("grad_gate_up_bias", ep.gate_up_bias.grad, dense.gate_up_bias.grad[shard])
        diffs["grad_down_bias"] = _close("grad_down_bias", ep.down_bias.grad, dense.down_bias.grad[shard])
    # rows this rank's tokens sent to every rank (from the routing the single-process layer chose)
    ids = torch.topk(outs[rank].router_logits.detach(), sizes["top_k"], dim=1).indices
    sent = torch.bincount((ids // ep.local_experts).flatten(), minlength=world).tolist()
    return {"diffs": diffs, "sent": sent}


def check_seeded_init(seed: int) -> None:
    """``ExpertParallelMoE(..., seed=s)`` holds ``MoEFeedForward(..., seed=s)``'s router and shard."""
    from mtmerge.distributed import ExpertParallelMoE
    from mtmerge.nn import MoEFeedForward

    dense = MoEFeedForward(**SIZES, bias=True, seed=seed)
    ep = ExpertParallelMoE(**SIZES, bias=True, seed=seed)
    shard = slice(ep.expert_offset, ep.expert_offset + ep.local_experts)
    for name in ("gate_up", "down", "gate_up_bias", "down_bias"):
        assert torch.equal(getattr(ep, name), getattr(dense, name)[shard]), name
    assert torch.equal(ep.router, dense.router)
    unseeded = ExpertParallelMoE(**SIZES)  # router broadcast from rank 0: identical on every rank
    gathered = [torch.empty_like(unseeded.router) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, unseeded.router.detach())
    assert all(torch.equal(g, gathered[0]) for g in gathered)


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """The body each spawned process runs."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # the unseeded init must not depend on the ranks' global RNGs agreeing
        results = {name: run_case(name, kwargs, tokens, seed=10 + i)
                   for i, (name, kwargs, tokens) in enumerate(CASES)}
        check_seeded_init(seed=5)
        dist.barrier()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
