"""Argument checks of the public ops: run once, before any kernel, naming the public argument.

Every check raises ``TypeError`` for a value of the wrong type and ``ValueError`` for a value
out of range, with the caller's argument name in the message. The kernels behind the ops keep
only cheap defensive checks; they never see an argument these functions would reject.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

TensorOrTensors = Tensor | Sequence[Tensor]


def choice(value, allowed: Sequence, name: str):
    """``value`` if it is one of ``allowed``, else ValueError naming ``name``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def as_tensor_list(x: TensorOrTensors, name: str = "x") -> list[Tensor]:
    """A tensor or a non-empty sequence of float tensors of one dtype and device, as a list."""
    if isinstance(x, Tensor):
        xs = [x]
    elif isinstance(x, Sequence) and not isinstance(x, str | bytes):
        xs = list(x)
        if not xs:
            raise ValueError(f"{name} must be a tensor or a non-empty sequence of tensors, got an empty sequence")
    else:
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(x).__name__}")
    for i, t in enumerate(xs):
        label = name if isinstance(x, Tensor) else f"{name}[{i}]"
        if not isinstance(t, Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{label} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.dtype != xs[0].dtype:
            raise TypeError(f"{label} has dtype {t.dtype} but {name}[0] has {xs[0].dtype}: one dtype for all")
        if t.device != xs[0].device:
            raise ValueError(f"{label} is on {t.device} but {name}[0] is on {xs[0].device}: one device for all")
    return xs


def int_in_range(k, low: int, high: int | None, name: str, what: str = "") -> int:
    """``k`` as an int in ``[low, high]`` (``>= low`` when high is None; bool is not an int here)."""
    if isinstance(k, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(k).__name__}") from None
    if k < low or (high is not None and k > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}{what}, got {name} = {k}")
    return k


def task_tensors(x, name: str) -> list[Tensor]:
    """A non-empty sequence of tensors, or a tensor whose first dimension indexes tasks."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError(f"{name} must be a sequence of tensors or a tensor [T, ...], got a 0-d tensor")
        xs = list(x.unbind(0))
    elif isinstance(x, Sequence) and not isinstance(x, str | bytes):
        xs = list(x)
    else:
        raise TypeError(f"{name} must be a sequence of tensors, got {type(x).__name__}")
    if not xs:
        raise ValueError(f"{name} must hold at least one tensor, got an empty sequence")
    for i, t in enumerate(xs):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return xs


def check_like(t: Tensor, label: str, ref: Tensor, ref_label: str, dtypes=FLOAT_DTYPES) -> None:
    """``t`` has ``ref``'s shape, dtype and device (and a dtype in ``dtypes``)."""
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{label} must be one of {names}, got {t.dtype}")
    if t.shape != ref.shape:
        raise ValueError(f"{label} has shape {tuple(t.shape)} but {ref_label} has {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{label} has dtype {t.dtype} but {ref_label} has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{label} is on {t.device} but {ref_label} is on {ref.device}")


def task_inputs(base: Tensor | None, finetuned, name: str = "finetuned", dtypes=FLOAT_DTYPES) -> list[Tensor]:
    """``finetuned`` as a list of tensors like ``base`` (or like each other without a base)."""
    if base is not None and not isinstance(base, Tensor):
        raise TypeError(f"base must be a tensor, got {type(base).__name__}")
    xs = task_tensors(finetuned, name)
    ref, ref_label = (base, "base") if base is not None else (xs[0], f"{name}[0]")
    check_like(ref, ref_label, ref, ref_label, dtypes)
    for i, t in enumerate(xs):
        check_like(t, f"{name}[{i}]", ref, ref_label, dtypes)
    return xs


def per_task_floats(value, count: int, name: str, default: float | None = None) -> list[float]:
    """A float or ``count`` floats (a sequence or a tensor) as a list of ``count`` floats."""
    if value is None:
        if default is None:
            raise ValueError(f"{name} is required")
        return [default] * count
    if isinstance(value, Tensor):
        value = value.tolist() if value.dim() else value.item()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [float(value)] * count
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a float or a sequence of {count} floats, got {type(value).__name__}")
    if len(value) != count:
        raise ValueError(f"{name} must have one entry per task ({count}), got {len(value)}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"{name} must hold floats, got {type(v).__name__}")
        out.append(float(v))
    return out


def densities(density, count: int) -> list[float]:
    values = per_task_floats(density, count, "density")
    for d in values:
        if not 0.0 <= d <= 1.0:  # also rejects NaN
            raise ValueError(f"density must be in [0, 1], got {d}")
    return values


def weights(value, count: int, name: str = "weights") -> list[float]:
    out = per_task_floats(value, count, name, default=1.0)
    if not all(math.isfinite(w) for w in out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def finite_float(value, name: str) -> float:
    """A finite real number (int, float, numpy scalar; not bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def seed(value) -> int:
    if value is None:
        raise ValueError("seed is required with DARE (an int in [0, 2**63))")
    return int_in_range(value, 0, 2**63 - 1, "seed")


def out_buffer(out: Tensor | None, like: Tensor) -> Tensor:
    """``out`` checked against ``like`` (any float dtype, same shape and device, contiguous), or
    a new tensor like ``like``."""
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a tensor, got {type(out).__name__}")
    if out.dtype not in FLOAT_DTYPES:
        raise TypeError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
    if out.shape != like.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but the inputs have {tuple(like.shape)}")
    if out.device != like.device:
        raise ValueError(f"out is on {out.device} but the inputs are on {like.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out


def consensus_bits(consensus: Tensor | None, n: int, device) -> Tensor | None:
    """A packed consensus mask (uint8, ``ceil(n/8)`` bytes, the inputs' device), flattened."""
    if consensus is None:
        return None
    if not isinstance(consensus, Tensor):
        raise TypeError(f"consensus must be a tensor, got {type(consensus).__name__}")
    if consensus.dtype != torch.uint8:
        raise TypeError(f"consensus must be a packed uint8 mask (see consensus_mask), got {consensus.dtype}")
    if consensus.numel() != (n + 7) // 8:
        raise ValueError(f"consensus must hold ceil(n/8) = {(n + 7) // 8} bytes, got {consensus.numel()}")
    if consensus.device != device:
        raise ValueError(f"consensus is on {consensus.device} but the inputs are on {device}")
    return consensus.reshape(-1).contiguous()


def raise_if_nonfinite(inputs: Sequence[tuple[str, Tensor | None]], cause: BaseException | None = None) -> None:
    """Raise ValueError naming the first ``(label, tensor)`` of ``inputs`` that holds NaN or Inf.

    A data check, for the error path of a pass that refused NaN/Inf and for paths without a
    fused check; it reads the tensors back to the host.
    """
    for label, x in inputs:
        if x is not None:
            bad = int((~torch.isfinite(x.detach())).sum())
            if bad:
                raise ValueError(f"{label} contains {bad} NaN or Inf value(s); pass allow_nonfinite=True to merge "
                                 "anyway") from cause


# ---- tensor arguments of the MoE and low-rank wrappers -------------------------------------------
# Wrong types are TypeError; dtypes, shapes, devices and values are ValueError (issue 9's rule).

ANY_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # float64: gradcheck
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor_arg(t, name: str, dtypes: Sequence[torch.dtype], what: str) -> Tensor:
    """``t`` if it is a tensor of one of ``dtypes`` (described by ``what`` in the message)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {what}, got {t.dtype}")
    return t


def float_arg(t, name: str) -> Tensor:
    return tensor_arg(t, name, ANY_FLOAT_DTYPES, "float32, bfloat16, float16 or float64")


def index_arg(t, name: str) -> Tensor:
    return tensor_arg(t, name, INDEX_DTYPES, "int32 or int64")


def bool_arg(t, name: str) -> Tensor:
    return tensor_arg(t, name, (torch.bool,), "bool")


def int_arg(value, name: str, low: int, high: int | None = None, what: str = "") -> int:
    """``value`` as an int ``>= low`` (and ``<= high`` when given); bool is not an int here."""
    return int_in_range(value, low, high, name, what)


def flag_arg(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def same_device(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def same_dtype(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: they must match")


def shape_is(t: Tensor, name: str, shape: Sequence[int], layout: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(t.shape)}")


def dims_is(t: Tensor, name: str, dim: int, layout: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")


def ids_in_range(ids: Tensor, name: str, low: int, high: int) -> None:
    """Every entry of ``ids`` in ``[low, high)`` (one min/max reduction read back)."""
    if ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())
    if lo < low or hi >= high:
        bad = lo if lo < low else hi
        raise ValueError(f"{name} must be in [{low}, {high}), got a value of {bad}")


def no_nan(t: Tensor, name: str) -> None:
    if t.numel() and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN")
