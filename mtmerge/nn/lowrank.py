"""Trainable low-rank attention layers on the low-rank ops.

* :class:`LAMAPooling`: LAMA's low-rank multi-head attention pooling ("Low Rank Factorization for
  Compact Multi-Head Self-Attention"): ``m`` heads pool ``[B, T, D]`` token states into
  ``[B, m, D]`` with :func:`mtmerge.ops.lowrank.lama_pool`.
* :class:`LinformerSelfAttention`: Linformer self-attention with its projections (queries, keys,
  values, output) and the sequence projections ``E``, ``F`` ``[r, seq_len]``, on
  :func:`mtmerge.ops.lowrank.linformer_attention`.

:class:`MultiLoRALinear` (multi-task LoRA, PEFT adapters from disk) is in :mod:`mtmerge.nn.multi_lora`.

Semantics are DESIGN.md's ("Low-rank attention semantics"); forward and backward run on the ops'
kernels (C++ on CPU, Triton on CUDA, the PyTorch reference elsewhere).

Initialization is deterministic given ``seed`` (or a ``torch.Generator`` passed to
``reset_parameters``): values are drawn on the CPU in float32 and copied into the parameters, so a
seed gives the same layer on every device and dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from mtmerge.nn._init import generator_for, positive_int, uniform_
from mtmerge.ops.lowrank import LamaOutput, lama_pool, linformer_attention

__all__ = ["LAMAPooling", "LamaOutput", "LinformerSelfAttention"]


def _reset_linear(linear: nn.Linear, generator: torch.Generator | None) -> None:
    """``nn.Linear``'s default bounds, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weight and bias."""
    bound = 1.0 / math.sqrt(linear.in_features) if linear.in_features else 0.0
    uniform_(linear.weight, bound, generator)
    uniform_(linear.bias, bound, generator)


# ---- LAMA pooling ---------------------------------------------------------------------------------


class LAMAPooling(nn.Module):
    """LAMA attention pooling: ``m`` heads, each a rank-1 bilinear affinity between a global
    context vector ``c`` and the tokens, pool ``h [B, T, D]`` into ``[B, m, D]``.

    With ``u = P^T c`` and ``g_t = Q^T h_t``, head ``i`` scores token ``t`` by
    ``f_t[i]`` with ``f_t = normalize(tanh(u * g_t))`` (L2 over the heads) and pools the tokens
    with a softmax of those scores over the real tokens. LAMA's sentence embedding is
    ``pooled.flatten(1)`` (``[B, m*D]``).

    Parameters
    ----------
    dim : int
        Token width ``D``.
    heads : int
        Number of heads ``m``.
    seed : int or None
        Seed of the initialization (None: torch's global RNG).
    device, dtype
        Where and in which dtype the parameters live.

    Attributes
    ----------
    P, Q : nn.Parameter
        ``[D, m]``: the context and token factors, U(-1/sqrt(D), 1/sqrt(D)) at initialization.
    """

    def __init__(self, dim: int, heads: int, *, seed: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dim = positive_int(dim, "dim")
        self.heads = positive_int(heads, "heads")
        self.seed = seed
        self.P = nn.Parameter(torch.empty(dim, heads, device=device, dtype=dtype))
        self.Q = nn.Parameter(torch.empty(dim, heads, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialize ``P`` and ``Q`` (``generator``, else the layer's ``seed``, else torch's RNG)."""
        generator = generator_for(self.seed, generator)
        bound = 1.0 / math.sqrt(self.dim)
        uniform_(self.P, bound, generator)
        uniform_(self.Q, bound, generator)

    def forward(self, h: Tensor, mask: Tensor | None = None, context: Tensor | None = None) -> LamaOutput:
        """Pool the tokens of ``h``.

        Parameters
        ----------
        h : Tensor
            ``[B, T, D]`` in the parameters' dtype.
        mask : Tensor or None
            ``[B, T]`` bool, True for a real token (None: all real).
        context : Tensor or None
            ``[B, D]`` global context (None: the mean of ``h`` over the real tokens).

        Returns
        -------
        LamaOutput
            ``attn [B, m, T]`` float32 (float64 for float64 ``h``), 0 at padding, a row without a
            real token all zeros; ``pooled [B, m, D]`` in ``h``'s dtype (``attn @ h``).
        """
        return lama_pool(h, self.P, self.Q, mask=mask, context=context)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"


# ---- Linformer self-attention ---------------------------------------------------------------------


class LinformerSelfAttention(nn.Module):
    """Linformer self-attention (Wang et al., 2020): keys and values projected along the sequence
    to ``k`` rows by ``E`` and ``F``, so attention costs ``O(N k)`` instead of ``O(N^2)``.

    ``out = W_o concat_h softmax(q_h (E k_h)^T / sqrt(d)) (F v_h)`` with
    ``q = W_q x``, ``k = W_k x``, ``v = W_v x`` split into ``heads`` heads of ``head_dim``;
    ``E`` and ``F`` are shared by the heads (Linformer's "headwise sharing"), and with
    ``share_kv=True`` ``F`` is ``E`` ("key-value sharing"). Padded positions
    (``key_padding_mask`` True) are zeroed before the projection, so they change no output.

    Parameters
    ----------
    dim : int
        Model width ``D``.
    heads : int
        Number of heads ``Hh``.
    seq_len : int
        The longest sequence ``Nmax`` (the width of ``E`` and ``F``); shorter inputs use the first
        ``N`` columns.
    k : int
        The projected length ``r``.
    head_dim : int or None
        Width of one head ``d`` (default ``dim // heads``, which must then divide evenly).
    share_kv : bool
        Use ``E`` for the values too (no ``F`` parameter).
    dropout : float
        Dropout on the attention probabilities in training mode. The fused kernel has none, so a
        training forward with ``dropout > 0`` runs the same math as torch ops (``E @ k``,
        ``F @ v``, ``F.scaled_dot_product_attention(dropout_p=dropout)``); evaluation and
        ``dropout = 0`` run the fused op.
    bias : bool
        Biases on the four linear projections.
    seed : int or None
        Seed of the initialization (None: torch's global RNG).
    device, dtype
        Where and in which dtype the parameters live.

    Attributes
    ----------
    to_q, to_k, to_v : nn.Linear
        ``D -> Hh*d``.
    to_out : nn.Linear
        ``Hh*d -> D``.
    E : nn.Parameter
        ``[k, seq_len]``, U(-1/sqrt(seq_len), 1/sqrt(seq_len)) at initialization (an
        ``nn.Linear(seq_len, k)`` weight).
    F : nn.Parameter or None
        ``[k, seq_len]``, likewise; None with ``share_kv`` (``E`` serves both).
    """

    def __init__(self, dim: int, heads: int, seq_len: int, k: int, *, head_dim: int | None = None,
                 share_kv: bool = False, dropout: float = 0.0, bias: bool = True, seed: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dim = positive_int(dim, "dim")
        self.heads = positive_int(heads, "heads")
        self.seq_len = positive_int(seq_len, "seq_len")
        self.rank = positive_int(k, "k")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim={dim} is not divisible by heads={heads}: pass head_dim")
            head_dim = dim // heads
        self.head_dim = positive_int(head_dim, "head_dim")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.share_kv = bool(share_kv)
        self.seed = seed
        factory = {"device": device, "dtype": dtype}
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias, **factory)
        self.to_k = nn.Linear(dim, inner, bias=bias, **factory)
        self.to_v = nn.Linear(dim, inner, bias=bias, **factory)
        self.to_out = nn.Linear(inner, dim, bias=bias, **factory)
        self.E = nn.Parameter(torch.empty(k, seq_len, **factory))
        if share_kv:
            self.register_parameter("F", None)
        else:
            self.F = nn.Parameter(torch.empty(k, seq_len, **factory))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialize every parameter (``generator``, else the layer's ``seed``, else torch's
        RNG): ``nn.Linear``'s default bounds for the projections, ``E`` and ``F`` as
        ``nn.Linear(seq_len, k)`` weights."""
        generator = generator_for(self.seed, generator)
        for linear in (self.to_q, self.to_k, self.to_v, self.to_out):
            _reset_linear(linear, generator)
        bound = 1.0 / math.sqrt(self.seq_len)
        uniform_(self.E, bound, generator)
        uniform_(self.F, bound, generator)

    def _heads(self, t: Tensor) -> Tensor:
        """``[B, N, Hh*d]`` -> ``[B, Hh, N, d]``."""
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Self-attention over the ``N <= seq_len`` positions of ``x``.

        Parameters
        ----------
        x : Tensor
            ``[B, N, D]`` in the parameters' dtype.
        key_padding_mask : Tensor or None
            ``[B, N]`` bool, True for padding (PyTorch's convention). Padded keys and values are
            zeroed before the projection; a row whose positions are all padded attends to zeros.

        Returns
        -------
        Tensor
            ``[B, N, D]``, ``x``'s dtype (padded positions get outputs too; ignore them).
        """
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, N, dim={self.dim}], got {shape}")
        if x.shape[1] > self.seq_len:
            raise ValueError(f"x has N = {x.shape[1]} positions but the layer was built for seq_len = {self.seq_len}")
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        E = self.E
        F_ = E if self.F is None else self.F
        if self.training and self.dropout > 0.0:
            out = self._composed(q, k, v, E, F_, key_padding_mask, self.dropout)
        else:
            out = linformer_attention(q, k, v, E, F_, key_padding_mask=key_padding_mask)
        return self.to_out(out.transpose(1, 2).flatten(2))

    @staticmethod
    def _composed(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F_: Tensor, key_padding_mask: Tensor | None,
                  dropout_p: float) -> Tensor:
        """The same attention as torch ops (used for dropout): mask, project, SDPA."""
        n = k.shape[2]
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (k.shape[0], n):
                raise ValueError(f"key_padding_mask must be bool [B, N] = {(k.shape[0], n)}, got "
                                 f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
            keep = ~key_padding_mask[:, None, :, None]
            k, v = k * keep, v * keep
        kp, vp = torch.matmul(E[:, :n], k), torch.matmul(F_[:, :n], v)
        return F.scaled_dot_product_attention(q, kp, vp, dropout_p=dropout_p)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, seq_len={self.seq_len}, "
                f"k={self.rank}, share_kv={self.share_kv}, dropout={self.dropout}")
