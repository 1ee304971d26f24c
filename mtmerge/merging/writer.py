"""Streaming safetensors output, written into a temporary directory and moved into place whole.

Layout. Every output tensor's name, dtype and shape are known from the plan, so every shard's
header -- and every tensor's byte offset -- is fixed before any tensor is merged. Each shard
file is created with its header and extended (sparse) to its final size; merged bytes are then
``pwrite``-n at their offsets as they are produced, a chunk at a time: a shard is never held
in memory, tensors (and chunks) may be written in any order, and several processes can fill
one shard (the distributed merge gives files identical to the single-process ones, for any
number of ranks). Format: an 8-byte little-endian header length, the JSON header
(``dtype``/``shape``/``data_offsets`` per tensor and ``__metadata__: {"format": "pt"}``),
padded with spaces to a multiple of 8, then the raw little-endian tensor bytes in the plan's
order (sorted names). Shards are ``model-00001-of-00003.safetensors`` with
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``); a single shard is
``model.safetensors`` without an index, as transformers writes them. A shard is closed when
adding the next tensor would exceed ``max_shard_size`` (a larger tensor gets a shard of its
own); sizes parse like transformers': ``"5GB"`` = 5 * 10**9, ``"5GiB"`` = 5 * 2**30.

Atomicity. Everything is written into ``PARENT/.mtmerge-tmp-NAME-HOST-PID-XXXX``, fsynced,
then renamed to ``OUT_DIR`` in one step; an existing ``OUT_DIR`` is only replaced with
``overwrite=True`` and only once the new one is complete (an atomic exchange with
``renameat2(RENAME_EXCHANGE)`` where the kernel offers it, else rename old away / rename new
in), then the old one is deleted. Any exception removes the temporary directory; a process
killed outright (SIGKILL) leaves it behind, and the next merge into the same parent removes
such directories whose process (same host) is gone. ``OUT_DIR`` itself is never partially
written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TMP_PREFIX = ".mtmerge-tmp-"
OLD_PREFIX = ".mtmerge-old-"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(size: int | str, name: str = "size") -> int:
    """Bytes from an int or a string like ``"5GB"`` (10**9), ``"500MiB"`` (2**20), ``"1.5G"``."""
    if isinstance(size, bool):
        raise TypeError(f"{name} must be an int or a string like '5GB', got bool")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", size)
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"{name} must be a size like '5GB', '500MB' or '1GiB', got {size!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise TypeError(f"{name} must be an int or a string like '5GB', got {type(size).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


@dataclass
class ShardLayout:
    """One output file: its name, header bytes and where each tensor's bytes go."""

    filename: str
    header: bytes
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (absolute offset, nbytes)

    @property
    def size(self) -> int:
        return len(self.header) + sum(n for _, n in self.offsets.values())

    @property
    def data_bytes(self) -> int:
        return sum(n for _, n in self.offsets.values())


def safetensors_header(entries: Sequence[tuple[str, str, tuple[int, ...], int]],
                       metadata: dict[str, str] | None = None) -> bytes:
    """The header (length prefix included) for tensors laid out back to back in ``entries``
    order: ``(name, dtype code, shape, nbytes)``."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def shard_layouts(entries: Sequence[tuple[str, str, tuple[int, ...], int]], max_shard_size: int) -> list[ShardLayout]:
    """Pack ``(name, dtype, shape, nbytes)`` in order into shards of at most ``max_shard_size``
    data bytes (a bigger tensor gets its own shard)."""
    groups: list[list[tuple[str, str, tuple[int, ...], int]]] = []
    size = 0
    for entry in entries:
        if not groups or (size + entry[3] > max_shard_size and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry[3]
    count = len(groups)
    layouts = []
    for i, group in enumerate(groups):
        name = SINGLE_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        header = safetensors_header(group)
        layout = ShardLayout(name, header)
        pos = len(header)
        for tname, _, _, nbytes in group:
            layout.offsets[tname] = (pos, nbytes)
            pos += nbytes
        layouts.append(layout)
    return layouts


def index_json(layouts: Sequence[ShardLayout]) -> str:
    weight_map = {name: layout.filename for layout in layouts for name in layout.offsets}
    total = sum(layout.data_bytes for layout in layouts)
    data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(data, indent=2) + "\n"


class ShardWriter:
    """Positional writes of tensor bytes into pre-sized shard files in ``directory``."""

    def __init__(self, directory: Path, layouts: Sequence[ShardLayout]):
        self.directory = Path(directory)
        self.layouts = list(layouts)
        self._where = {name: (layout, *pos) for layout in self.layouts for name, pos in layout.offsets.items()}
        self._fds: dict[str, int] = {}

    def create(self) -> None:
        """Write every header and size every file (done once, by one process)."""
        for layout in self.layouts:
            path = self.directory / layout.filename
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _pwrite_all(fd, layout.header, 0)
                os.ftruncate(fd, layout.size)
            finally:
                os.close(fd)

    def write(self, name: str, data, byte_offset: int = 0) -> None:
        """Write ``data`` (bytes-like) at ``byte_offset`` within tensor ``name``'s bytes."""
        layout, start, nbytes = self._where[name]
        view = memoryview(data).cast("B")
        if byte_offset < 0 or byte_offset + view.nbytes > nbytes:
            raise ValueError(f"write of {view.nbytes} bytes at {byte_offset} overflows tensor {name!r} ({nbytes} B)")
        fd = self._fds.get(layout.filename)
        if fd is None:
            fd = self._fds[layout.filename] = os.open(self.directory / layout.filename, os.O_WRONLY)
        _pwrite_all(fd, view, start + byte_offset)

    def close(self, sync: bool = True) -> None:
        for fd in self._fds.values():
            try:
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        self._fds.clear()

    def write_index(self) -> None:
        if len(self.layouts) > 1:
            write_text_synced(self.directory / INDEX_NAME, index_json(self.layouts))


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def clean_stale(parent: Path, name: str) -> list[Path]:
    """Remove ``parent/.mtmerge-{tmp,old}-NAME-HOST-PID-*`` left by dead processes of this host."""
    removed = []
    host = _host()
    pattern = re.compile(r"\.mtmerge-(?:tmp|old)-" + re.escape(name) + "-" + re.escape(host) + r"-(\d+)-.*")
    with contextlib.suppress(OSError):
        for p in parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and not _pid_alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


class OutputDir:
    """A temporary directory next to ``out_dir``, committed into place atomically.

    Use :meth:`create` (or pass an existing temporary path, for other ranks), write into
    :attr:`tmp`, then :meth:`commit`; :meth:`abort` (or any exception in a ``with`` block)
    removes the temporary directory.
    """

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False):
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def check(self) -> None:
        """Refuse an existing ``out_dir`` without ``overwrite``, or a non-directory."""
        if self.out_dir.exists() or self.out_dir.is_symlink():
            if not self.out_dir.is_dir():
                raise FileExistsError(f"output {str(self.out_dir)!r} exists and is not a directory")
            if not self.overwrite:
                raise FileExistsError(f"output directory {str(self.out_dir)!r} already exists; pass --overwrite "
                                      "(overwrite=True) to replace it once the new merge is complete")
        parent = self.out_dir.parent
        if not parent.is_dir():
            raise FileNotFoundError(f"the parent directory of the output, {str(parent)!r}, does not exist")
        if not os.access(parent, os.W_OK):
            raise PermissionError(f"cannot write to {str(parent)!r} (the output's parent directory)")

    def create(self) -> Path:
        self.check()
        clean_stale(self.out_dir.parent, self.out_dir.name)
        prefix = f"{TMP_PREFIX}{self.out_dir.name}-{_host()}-{os.getpid()}-"
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.out_dir.parent))
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 would stick to OUT_DIR
        return self.tmp

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def commit(self) -> None:
        """fsync the temporary directory and move it to ``out_dir``."""
        assert self.tmp is not None
        _fsync_dir(self.tmp)
        if self.out_dir.exists() or self.out_dir.is_symlink():
            self.check()  # still only with overwrite
            if _rename_exchange(self.tmp, self.out_dir):
                old = self.tmp  # now holds the previous out_dir
            else:
                old = self.tmp.parent / f"{OLD_PREFIX}{self.out_dir.name}-{_host()}-{os.getpid()}-{os.urandom(4).hex()}"
                os.rename(self.out_dir, old)
                os.rename(self.tmp, self.out_dir)
            self.tmp = None
            _fsync_dir(self.out_dir.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out_dir)
            self.tmp = None
            _fsync_dir(self.out_dir.parent)
