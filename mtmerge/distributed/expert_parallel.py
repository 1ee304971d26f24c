"""Expert parallelism: a MoE layer whose experts are sharded across the ranks of a process group.

Every rank holds the (replicated) router and a contiguous block of ``E / world`` experts: rank
``r`` owns experts ``r * E_local .. (r + 1) * E_local - 1``. A forward pass on each rank:

1. gates its own tokens (``router``, :func:`mtmerge.moe_topk_gate`), exactly as
   :class:`mtmerge.nn.MoEFeedForward` does;
2. sorts its routed slots ``(t, j)`` by owning rank (stable, so slot order is kept within a
   rank) and sends each slot's token row, routing weight and local expert id to the owner with
   ``torch.distributed.all_to_all_single`` (split sizes exchanged first, one small collective);
3. the owner runs :func:`mtmerge.moe_experts` on the slots it received (one slot per row, ids
   local to its shard) and sends the weighted per-slot outputs back with a second
   ``all_to_all_single``;
4. the source rank puts the slots back in place and sums each token's ``k`` outputs in ``j``
   order.

Every exchange is differentiable (:class:`_AllToAll`: the backward is the reverse exchange), so
the backward pass flows to the inputs, the router and the expert shards on their owners. Works
with any backend that implements ``all_to_all_single``: gloo on CPU, nccl on GPU.

Numerics: in float32 the result equals the single-process layer up to the GEMMs' summation
order (bit-identical in the tests here); in bfloat16/float16 each slot's weighted output is
rounded to the input dtype before the ``k`` are summed (the single-process op sums them in
float32), a difference of about one rounding step. The split sizes are copied to the host
(one sync per forward): ``all_to_all_single`` needs them as Python ints.

Gradients of the router are local: each rank's router gradient comes from its own tokens only.
Sum them over the group before the optimizer step (:meth:`ExpertParallelMoE.all_reduce_router_grads`,
or a data-parallel wrapper that covers only the replicated parameters); the expert shards'
gradients are already complete on their owners and must *not* be averaged across ranks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from mtmerge.nn._init import add_expert_parameters, generator_for, positive_int
from mtmerge.nn.moe import ACTIVATIONS, SCORINGS, MoEFeedForward, MoEOutput
from mtmerge.ops.moe import load_balancing_loss, moe_experts, moe_topk_gate, router_z_loss

__all__ = ["ExpertParallelMoE", "all_to_all"]


def _exchange(x: Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with autograd: the backward runs the reverse exchange."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, output_splits: list[int], input_splits: list[int], group: Any) -> Tensor:
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        return _exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        output_splits, input_splits = ctx.splits
        return _exchange(grad, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: Any = None) -> Tensor:
    """Differentiable ``torch.distributed.all_to_all_single`` along dimension 0.

    Parameters
    ----------
    x : Tensor
        ``[sum(input_splits), ...]``: rows ``input_splits[0]`` go to rank 0 of ``group``, the next
        ``input_splits[1]`` to rank 1, and so on.
    output_splits : list of int
        How many rows arrive from each rank (what each rank's ``input_splits`` says for this one).
    input_splits : list of int
        How many rows go to each rank.
    group : ProcessGroup, optional
        Default: the world.

    Returns
    -------
    Tensor
        ``[sum(output_splits), ...]``, the rows from rank 0 first. Its gradient is sent back to
        the ranks the rows came from.
    """
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


class ExpertParallelMoE(nn.Module):
    """A token-choice MoE layer (:class:`mtmerge.nn.MoEFeedForward`'s math) with its experts
    sharded over a process group.

    Every rank of ``group`` must construct the layer and call ``forward`` collectively (each
    with its own tokens, possibly a different number of them). The router is replicated; rank
    ``r`` holds experts ``[r * E_local, (r + 1) * E_local)`` with ``E_local = num_experts / world``.

    Parameters
    ----------
    hidden : int
        Model width ``H``.
    ffn : int
        Each expert's intermediate width ``F``.
    num_experts : int
        ``E``, a multiple of the group's size.
    top_k : int
        Experts per token, ``1 <= top_k <= E``.
    group : ProcessGroup, optional
        The expert-parallel group (default: the world); ``torch.distributed`` must be initialized.
    activation, scoring, renormalize, bias
        As in :class:`mtmerge.nn.MoEFeedForward`.
    seed : int or None
        Seed of the initialization. Every rank draws the full layer's router and experts from it
        (as :class:`~mtmerge.nn.MoEFeedForward` with that seed would) and keeps its shard, so
        the layer equals ``MoEFeedForward(..., seed=seed)``. None: torch's global RNG, and the
        router is broadcast from the group's first rank so that it is the same everywhere.
        Either way each full tensor is drawn on the CPU, one at a time, then sliced.
    device, dtype
        Where and in which dtype the parameters live (nccl needs CUDA tensors).

    Attributes
    ----------
    router : nn.Parameter
        ``[E, H]``, replicated.
    gate_up : nn.Parameter
        ``[E_local, 2F, H]``: this rank's experts.
    down : nn.Parameter
        ``[E_local, H, F]``.
    gate_up_bias, down_bias : nn.Parameter or None
        ``[E_local, 2F]`` and ``[E_local, H]`` when ``bias=True``.
    rank, world_size : int
        This process's rank in ``group`` and the group's size.
    expert_offset : int
        The global id of this rank's first expert.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, *, group: Any = None,
                 activation: str = "silu", scoring: str = "softmax", renormalize: bool = True, bias: bool = False,
                 seed: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs torch.distributed initialized (init_process_group)")
        for name, value in (("hidden", hidden), ("ffn", ffn), ("num_experts", num_experts), ("top_k", top_k)):
            positive_int(value, name)
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts={num_experts}, got {top_k}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if num_experts % self.world_size:
            raise ValueError(f"num_experts={num_experts} must be a multiple of the group size {self.world_size}")
        self.hidden, self.ffn, self.num_experts, self.top_k = hidden, ffn, num_experts, top_k
        self.local_experts = num_experts // self.world_size
        self.expert_offset = self.rank * self.local_experts
        self.activation, self.scoring, self.renormalize = activation, scoring, bool(renormalize)
        self.router = nn.Parameter(torch.empty(num_experts, hidden, device=device, dtype=dtype))
        add_expert_parameters(self, self.local_experts, hidden, ffn, bias, device, dtype)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialize as :class:`~mtmerge.nn.MoEFeedForward` does and keep this rank's shard.

        The full layer's tensors are drawn one at a time on the CPU in float32, in
        ``MoEFeedForward``'s order and bounds (router and ``gate_up`` U(+-1/sqrt(H)), ``down``
        U(+-1/sqrt(F)), then the biases), and this rank keeps its rows: with ``seed`` the layer
        equals ``MoEFeedForward(..., seed=seed)``'s shards on every rank. Without, torch's
        global RNG draws them and the router is broadcast from the group's first rank.
        """
        generator = generator_for(seed, None)
        shard = slice(self.expert_offset, self.expert_offset + self.local_experts)
        in_bound, ffn_bound = 1.0 / math.sqrt(self.hidden), 1.0 / math.sqrt(self.ffn)
        full_shapes = {"router": (self.num_experts, self.hidden),
                       "gate_up": (self.num_experts, 2 * self.ffn, self.hidden),
                       "down": (self.num_experts, self.hidden, self.ffn),
                       "gate_up_bias": (self.num_experts, 2 * self.ffn),
                       "down_bias": (self.num_experts, self.hidden)}
        bounds = {"router": in_bound, "gate_up": in_bound, "down": ffn_bound, "gate_up_bias": in_bound,
                  "down_bias": ffn_bound}
        for name, shape in full_shapes.items():
            param = getattr(self, name)
            if param is None or param.is_meta:
                continue
            values = torch.empty(shape, dtype=torch.float32).uniform_(-bounds[name], bounds[name],
                                                                      generator=generator)
            param.copy_(values if name == "router" else values[shard])
        if seed is None:
            src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
            dist.broadcast(self.router.data, src=src, group=self.group)

    @torch.no_grad()
    def load_dense_parameters(self, layer: MoEFeedForward) -> None:
        """Copy the router and this rank's experts from a full (single-process) layer of the same sizes."""
        sizes = (layer.hidden, layer.ffn, layer.num_experts)
        if sizes != (self.hidden, self.ffn, self.num_experts):
            raise ValueError(f"layer has (hidden, ffn, num_experts) = {sizes}, expected "
                             f"{(self.hidden, self.ffn, self.num_experts)}")
        if (layer.gate_up_bias is None) != (self.gate_up_bias is None):
            raise ValueError("layer's bias setting differs from this layer's")
        shard = slice(self.expert_offset, self.expert_offset + self.local_experts)
        self.router.copy_(layer.router)
        self.gate_up.copy_(layer.gate_up[shard])
        self.down.copy_(layer.down[shard])
        if self.gate_up_bias is not None:
            self.gate_up_bias.copy_(layer.gate_up_bias[shard])
            self.down_bias.copy_(layer.down_bias[shard])

    @classmethod
    def from_dense(cls, layer: MoEFeedForward, group: Any = None) -> ExpertParallelMoE:
        """The expert-parallel version of ``layer``: its router and, on each rank, its shard of experts.

        Parameters
        ----------
        layer : MoEFeedForward
            The same layer on every rank (e.g. built with the same ``seed``, or loaded from one
            checkpoint); its router must be identical across ranks.
        group : ProcessGroup, optional
            Default: the world.

        Returns
        -------
        ExpertParallelMoE
            On ``layer``'s device and dtype.
        """
        if not isinstance(layer, MoEFeedForward):
            raise TypeError(f"layer must be a mtmerge.nn.MoEFeedForward, got {type(layer).__name__}")
        out = cls(layer.hidden, layer.ffn, layer.num_experts, layer.top_k, group=group, activation=layer.activation,
                  scoring=layer.scoring, renormalize=layer.renormalize, bias=layer.gate_up_bias is not None,
                  seed=0, device=layer.gate_up.device, dtype=layer.gate_up.dtype)
        out.load_dense_parameters(layer)
        return out

    def all_reduce_router_grads(self) -> None:
        """Sum the router's gradient over the group (each rank's covers only its own tokens)."""
        if self.router.grad is not None:
            dist.all_reduce(self.router.grad, group=self.group)

    def forward(self, x: Tensor) -> MoEOutput:
        """Route this rank's tokens to the experts' owners and combine what comes back.

        Collective: every rank of the group must call it (with any number of tokens, 0 included).

        Parameters
        ----------
        x : Tensor
            ``[..., H]`` in the parameters' dtype.

        Returns
        -------
        MoEOutput
            ``output [..., H]``, ``router_logits [T, E]`` of this rank's ``T`` tokens, and the
            load-balancing and z losses of this rank's routing (as the single-process layer gives
            on these tokens).
        """
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.hidden:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [..., hidden={self.hidden}], got {shape}")
        flat = x.reshape(-1, self.hidden)
        tokens, k = flat.shape[0], self.top_k
        logits = F.linear(flat, self.router)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        weights, ids = moe_topk_gate(logits, k, scoring=self.scoring, renormalize=self.renormalize)

        # slots s = t * k + j, grouped by owning rank (stable: slot order kept within a rank)
        slot_ids = ids.reshape(-1).long()
        owner = torch.div(slot_ids, self.local_experts, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=self.world_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        input_splits, output_splits = send_counts.tolist(), recv_counts.tolist()

        send_x = flat.index_select(0, torch.div(order, k, rounding_mode="floor"))
        send_w = weights.reshape(-1).index_select(0, order)
        send_ids = (slot_ids - owner * self.local_experts).index_select(0, order)
        recv_x = all_to_all(send_x, output_splits, input_splits, self.group)
        recv_w = all_to_all(send_w, output_splits, input_splits, self.group)
        recv_ids = _exchange(send_ids, output_splits, input_splits, self.group)

        # one slot per row on the owner: the op returns weight * expert output for each
        partial = moe_experts(recv_x, self.gate_up, self.down, recv_w.unsqueeze(1), recv_ids.unsqueeze(1),
                              activation=self.activation, gate_up_bias=self.gate_up_bias, down_bias=self.down_bias)
        back = all_to_all(partial, input_splits, output_splits, self.group)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        slots = back.index_select(0, inverse).reshape(tokens, k, self.hidden)
        out = slots[:, 0]
        for j in range(1, k):  # fixed j order, as the single-process op combines
            out = out + slots[:, j]
        lb = load_balancing_loss(logits, ids, self.num_experts, k)
        return MoEOutput(out.reshape(x.shape), logits, lb, router_z_loss(logits))

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, ffn={self.ffn}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"rank={self.rank}/{self.world_size}, local_experts={self.local_experts}, "
                f"activation={self.activation!r}, scoring={self.scoring!r}, renormalize={self.renormalize}, "
                f"bias={self.gate_up_bias is not None}")
