"""torch.distributed for the checkpoint merge: the process group and error agreement.

With ``WORLD_SIZE > 1`` (``torchrun --nproc-per-node N -m mtmerge merge ...``) the process
group is initialized (gloo on CPU, nccl with CUDA: then each rank computes on
``cuda:LOCAL_RANK``). Every phase of a merge runs through :meth:`Dist.phase`: an error on any
rank stops every rank with that error (no hang). Collectives move int64 host tensors
(histograms, tie tables, peak memory) through the group's device.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import Any

import torch

#: Exception types re-raised as themselves on the other ranks (anything else: RuntimeError).
_REBUILT = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, OSError)


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class Dist:
    """The process group (or a single process), with error agreement between phases.

    Attributes
    ----------
    world : int
        Number of ranks (1 without a process group).
    rank : int
        This rank.
    device : torch.device
        Where collectives run: CPU (gloo, or no group) or this rank's CUDA device (nccl).
    """

    def __init__(self) -> None:
        self.world = 1
        self.rank = 0
        self.device = torch.device("cpu")

    @classmethod
    def setup(cls) -> Dist:
        """Join the caller's process group, or that of a ``torchrun`` launch (``WORLD_SIZE > 1``).

        A group created here lives until the interpreter exits (it is destroyed then), so
        several merges in one process share it: torchrun's rendezvous cannot be redone.

        Returns
        -------
        Dist
            A single-process ``Dist`` when there is no group and ``WORLD_SIZE <= 1``.

        Raises
        ------
        RuntimeError
            ``WORLD_SIZE > 1`` but this torch build has no torch.distributed.
        """
        d = cls()
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        if not initialized and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return d
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
            atexit.register(_destroy_group)
        d.world, d.rank = dist.get_world_size(), dist.get_rank()
        if dist.get_backend() == "nccl":
            d.device = torch.device("cuda", torch.cuda.current_device())
        return d

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``t`` over the ranks in place.

        Parameters
        ----------
        t : Tensor
            Any device; it travels through :attr:`device` and is written back.
        op : {"sum", "max"}

        Returns
        -------
        Tensor
            ``t``.
        """
        if self.world == 1:
            return t
        import torch.distributed as dist

        x = t.to(self.device)
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        t.copy_(x.to(t.device))
        return t

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def phase(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` here; if it failed on any rank, raise that error on every rank.

        Returns
        -------
        Any
            What ``fn`` returned on this rank.

        Raises
        ------
        Exception
            This rank's own error, else the first failing rank's: rebuilt as its type when
            that is one of ``ValueError``, ``TypeError``, ``FileNotFoundError``,
            ``FileExistsError``, ``PermissionError``, ``OSError`` (its message ending with
            "(on rank R)"), else a ``RuntimeError``. Interrupts (``BaseException``) propagate
            at once, without agreement.
        """
        err: Exception | None = None
        result = None
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            err = exc
        if self.world == 1:
            if err is not None:
                raise err
            return result
        import torch.distributed as dist

        infos: list[Any] = [None] * self.world
        dist.all_gather_object(infos, None if err is None else (type(err).__name__, str(err)))
        if err is not None:
            raise err
        for r, info in enumerate(infos):
            if info is not None:
                name, message = info
                for cls in _REBUILT:
                    if cls.__name__ == name:
                        raise cls(f"{message} (on rank {r})")
                raise RuntimeError(f"rank {r} failed: {name}: {message}")
        return result
