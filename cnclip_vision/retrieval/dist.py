"""Several extraction processes on existing launchers: ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and SLURM's ``srun`` (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
``SLURM_LOCALID``, the step's node list). The processes talk over a gloo process group (CPU tensors, also
when the model runs on GPUs): extraction only exchanges small Python objects (plans, counts), never
embeddings, which go to the shared file system.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger("cnclip_vision.retrieval")

__all__ = ["Group", "local_device", "world_from_env"]

T = TypeVar("T")

#: How long a process waits for the others at a synchronisation point (the slowest rank's share of the work).
DEFAULT_TIMEOUT_S = 24 * 3600.0


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``gpu[03-05,9],cpu1`` -> ``gpu03``); ``scontrol`` if installed."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _apply_slurm_env() -> None:
    """Under ``srun`` (and not under torchrun, whose variables win), export the torchrun variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")) or 1)
    if "SLURM_STEP_NUM_TASKS" not in os.environ or tasks <= 1:
        return  # a batch script's own process, not a task of a parallel srun step
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(tasks)
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise ValueError("running under srun without a node list: set MASTER_ADDR (and MASTER_PORT)")
        os.environ["MASTER_ADDR"] = _first_host(nodes)
    if "MASTER_PORT" not in os.environ:  # the same on every task of the job, different between jobs
        os.environ["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` of this process under torchrun / srun, ``(0, 1, 0)`` alone."""
    _apply_slurm_env()
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def local_device(device: str | None = None) -> str:
    """The device this process should load its model on: ``cuda:LOCAL_RANK`` when CUDA is available and
    ``device`` is None or ``"cuda"``, else ``device`` (default ``"cpu"``)."""
    import torch

    _, _, local_rank = world_from_env()
    if device in (None, "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        return f"cuda:{local_rank}"
    return device or "cpu"


@dataclass
class Group:
    """This process's place among the extraction processes, with the few collectives extraction needs.
    One process: every collective is a no-op. Reuses the process group when the caller made one (a gloo
    sub-group of it when its backend is not gloo)."""

    rank: int = 0
    world_size: int = 1
    _group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
        rank, world, _ = world_from_env()
        if world <= 1:
            return cls()
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        group = None
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timeout)
            logger.info("extraction rank %d of %d (gloo)", rank, world)
        elif dist.get_backend() != "gloo":
            group = dist.new_group(backend="gloo", timeout=timeout)
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(
                f"the process group ({dist.get_rank()}/{dist.get_world_size()}) does not match "
                f"RANK/WORLD_SIZE ({rank}/{world})"
            )
        return cls(rank, world, group)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def all_gather(self, obj: T) -> list[T]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast(self, obj: T | None) -> T:
        """Rank 0's ``obj`` (not None; the other ranks may pass None) on every rank."""
        if self.world_size == 1:
            value = obj
        else:
            import torch.distributed as dist

            box = [obj]
            dist.broadcast_object_list(box, src=0, group=self._group)
            value = box[0]
        if value is None:
            raise ValueError("broadcast: rank 0 passed None")
        return value

    def run_on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, its result (or its error, re-raised as CNClipError/ValueError) on every rank."""
        from cnclip_vision.errors import CNClipError

        result: tuple[str, Any] | None = None
        if self.is_main:
            try:
                result = ("ok", fn())
            except (CNClipError, ValueError) as e:
                if self.world_size == 1:
                    raise
                result = ("error", (type(e).__name__, str(e)))
        result = self.broadcast(result)
        assert result is not None  # broadcast always delivers rank 0's tuple
        if result[0] == "error":
            name, message = result[1]
            raise (ValueError if name == "ValueError" else CNClipError)(message)
        return result[1]
