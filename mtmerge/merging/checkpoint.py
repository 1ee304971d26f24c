"""Local safetensors checkpoints, read memory-mapped one tensor (or chunk) at a time.

A checkpoint is a directory in Hugging Face's layout -- one ``*.safetensors`` file (preferably
``model.safetensors``) or several shards listed by ``model.safetensors.index.json`` -- or a
single ``.safetensors`` file. Pickle checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``,
``.pkl``) are refused: unpickling can execute arbitrary code. Nothing is ever downloaded.

Why not ``safetensors.safe_open``: it maps each whole file for the life of the handle, and
every page touched stays resident, so reading a model tensor by tensor grows the resident set
towards the model's size. Here each read maps only the byte range of one tensor chunk
(``mmap`` with ``MAP_PRIVATE``), and the mapping is dropped as soon as the tensor built on it
is: resident memory is bounded by the chunks alive at a time. A chunk stored in the dtype it
is wanted in is used in place (zero copy); one that must be cast is cast piecewise into a
caller-provided buffer, so a cast never holds the whole source chunk too. The header (8-byte
little-endian length, JSON) is parsed here; offsets are checked against the file size, so a
truncated file is an error before any merging starts.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"

#: safetensors dtype code -> (torch dtype or None, item size in bytes)
ST_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "U16": (getattr(torch, "uint16", None), 2), "U32": (getattr(torch, "uint32", None), 4),
    "U64": (getattr(torch, "uint64", None), 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
TORCH_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}

_MAX_HEADER = 100 * 2**20
_GRANULARITY = mmap.ALLOCATIONGRANULARITY
_CAST_PIECE = 8 * 2**20  # bytes of source mapped at a time when casting


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``nbytes`` bytes at absolute ``offset`` in ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return ST_DTYPES[self.dtype][1]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return ST_DTYPES[self.dtype][0]


def refuse_pickle(path: Path, where: str) -> None:
    raise ValueError(f"{where}: {str(path)!r} is a pickle checkpoint; mtmerge reads safetensors only, because "
                     "loading a pickle can execute arbitrary code. Convert it to safetensors first (from a "
                     "source you trust).")


def read_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the absolute offset of its data area."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{str(file)!r} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{str(file)!r} is not a safetensors file (bad header length {n})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{str(file)!r} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(file)!r} is not a safetensors file (its header is not a JSON object)")
    return header, 8 + n


def _file_tensors(file: Path) -> dict[str, TensorInfo]:
    header, data_start = read_header(file)
    size = file.stat().st_size
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{str(file)!r}: malformed header entry for tensor {name!r}") from None
        if dtype not in ST_DTYPES:
            raise ValueError(f"{str(file)!r}: tensor {name!r} has unsupported dtype {dtype!r}")
        info = TensorInfo(name, dtype, shape, file, data_start + int(start), int(stop) - int(start))
        if info.nbytes != info.numel * info.itemsize or start < 0:
            raise ValueError(f"{str(file)!r}: tensor {name!r} has {info.nbytes} bytes for shape {shape} {dtype}")
        if data_start + int(stop) > size:
            raise ValueError(f"{str(file)!r} is truncated: tensor {name!r} ends at byte {data_start + int(stop)} "
                             f"but the file has {size} bytes")
        out[name] = info
    return out


def _resolve_files(path: Path, where: str) -> tuple[Path | None, list[Path], dict[str, str] | None]:
    """(directory or None, safetensors files, weight_map or None)."""
    if not path.exists():
        raise FileNotFoundError(f"{where}: {str(path)!r} is not a local file or directory (mtmerge reads local "
                                "checkpoints only and never downloads; fetch it first, e.g. with "
                                "`huggingface-cli download REPO --local-dir DIR`)")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path, where)
        if path.suffix != ".safetensors":
            raise ValueError(f"{where}: {str(path)!r} is not a .safetensors file")
        return None, [path], None
    index = path / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = dict(data["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{where}: cannot read {str(index)!r}: {exc}") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{where}: shard {str(f)!r} listed in {INDEX_NAME} does not exist")
        return path, files, weight_map
    files = sorted(path.glob("*.safetensors"))
    if (path / "model.safetensors").is_file():
        return path, [path / "model.safetensors"], None
    if len(files) == 1:
        return path, files, None
    if len(files) > 1:
        raise ValueError(f"{where}: {str(path)!r} holds several .safetensors files but no {INDEX_NAME}")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(path / pickles[0], where)
    raise FileNotFoundError(f"{where}: {str(path)!r} holds no .safetensors file")


class Checkpoint:
    """A safetensors checkpoint opened for chunked, memory-mapped reads.

    Parameters
    ----------
    path : str or Path
        A checkpoint directory or a single ``.safetensors`` file.
    where : str
        How errors name it (e.g. ``"models[1]"``).

    Attributes
    ----------
    tensors : dict of str to TensorInfo
        Every tensor, by name.
    root : Path or None
        The directory (None for a single file).
    """

    def __init__(self, path: str | os.PathLike, where: str = "checkpoint"):
        self.path = Path(path)
        self.where = where
        self.root, self.files, weight_map = _resolve_files(self.path, where)
        tensors: dict[str, TensorInfo] = {}
        per_file = {}
        for f in self.files:
            if not os.access(f, os.R_OK):
                raise PermissionError(f"{where}: {str(f)!r} is not readable")
            per_file[f] = _file_tensors(f)
        if weight_map is None:
            for infos in per_file.values():
                tensors.update(infos)
        else:
            for name, fname in weight_map.items():
                info = per_file[self.root / fname].get(name)
                if info is None:
                    raise ValueError(f"{where}: {INDEX_NAME} puts {name!r} in {fname!r}, which does not hold it")
                tensors[name] = info
        if not tensors:
            raise ValueError(f"{where}: {str(self.path)!r} holds no tensors")
        self.tensors = tensors
        self._fds: dict[Path, int] = {}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file descriptors (mapped tensors stay valid until dropped)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def names(self) -> list[str]:
        return sorted(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def _map(self, info: TensorInfo, byte_start: int, byte_stop: int) -> tuple[mmap.mmap, int]:
        """A private mapping covering ``[byte_start, byte_stop)`` of the tensor; (map, offset in it)."""
        absolute = info.offset + byte_start
        aligned = absolute - absolute % _GRANULARITY
        mm = mmap.mmap(self._fd(info.file), absolute + (byte_stop - byte_start) - aligned,
                       access=mmap.ACCESS_COPY, offset=aligned)
        return mm, absolute - aligned

    def raw(self, name: str, byte_start: int = 0, byte_stop: int | None = None) -> memoryview:
        """The stored bytes ``[byte_start, byte_stop)`` of tensor ``name``, memory-mapped."""
        info = self.tensors[name]
        byte_stop = info.nbytes if byte_stop is None else byte_stop
        if byte_stop <= byte_start:
            return memoryview(b"")
        mm, off = self._map(info, byte_start, byte_stop)
        return memoryview(mm)[off:off + byte_stop - byte_start]

    def read(self, name: str, start: int = 0, stop: int | None = None, dtype: torch.dtype | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Flat elements ``[start, stop)`` of tensor ``name`` as a 1-D tensor.

        In the stored dtype (or ``dtype`` equal to it) the result is a zero-copy view of a
        private mapping, valid as long as it is referenced. Otherwise the elements are cast
        into ``out`` (a 1-D tensor of ``dtype`` and at least ``stop - start`` elements; a new
        one if None) a few MB of source at a time.
        """
        info = self.tensors[name]
        stored = info.torch_dtype
        if stored is None:
            raise ValueError(f"{self.where}: tensor {name!r} has dtype {info.dtype}, which this torch cannot hold")
        stop = info.numel if stop is None else stop
        count = stop - start
        if dtype is None or dtype == stored:
            if count <= 0:
                return torch.empty(0, dtype=stored)
            item = info.itemsize
            mm, off = self._map(info, start * item, stop * item)
            if (info.offset + start * item) % item:  # misaligned for the dtype: copy (rare)
                return torch.frombuffer(mm, dtype=torch.uint8, count=count * item, offset=off).clone().view(stored)
            return torch.frombuffer(mm, dtype=stored, count=count, offset=off)
        if out is None:
            out = torch.empty(count, dtype=dtype)
        out = out[:count]
        piece = max(1, _CAST_PIECE // info.itemsize)
        for s in range(start, stop, piece):
            e = min(stop, s + piece)
            out[s - start:e - start].copy_(self.read(name, s, e))
        return out

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor in its shape (memory-mapped when no cast is needed)."""
        info = self.tensors[name]
        return self.read(name, dtype=dtype).view(info.shape)

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` along dimension 0, shaped ``(stop - start, *shape[1:])``."""
        info = self.tensors[name]
        row = info.numel // info.shape[0] if info.shape and info.shape[0] else 0
        return self.read(name, start * row, stop * row, dtype=dtype).view(stop - start, *info.shape[1:])

    def aux_files(self) -> Iterator[Path]:
        """The non-tensor files a model needs next to its weights (config, tokenizer, ...)."""
        if self.root is None:
            return
        for p in sorted(self.root.iterdir()):
            if not p.is_file() or p.name.endswith(".index.json") or p.name.startswith("."):
                continue
            if p.suffix in (".json", ".txt", ".model", ".tiktoken", ".jinja") or p.name.startswith("tokenizer"):
                if p.suffix in PICKLE_SUFFIXES or p.suffix == ".safetensors":
                    continue
                yield p
