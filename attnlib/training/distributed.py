"""Process-group setup for DDP under torchrun or Slurm (submitit), gloo on CPU and NCCL on GPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_reduce_sum", "init_distributed"]


@dataclass
class DistInfo:
    """rank, world size, local rank and the device of this process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable default
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints and results."""
        return self.rank == 0


def _slurm_env() -> None:
    """Export RANK/WORLD_SIZE/... from Slurm variables for a multi-task Slurm job (submitit launcher)."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:  # pragma: no cover
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Initialise the default process group when launched by torchrun / Slurm with several processes.

    ``device``: "auto" (CUDA if available), "cpu" or "cuda". Backend: NCCL for CUDA, gloo for CPU.
    A single process gets no process group.
    """
    _slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available")
    dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 1, 0, dev)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev)
    dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    return DistInfo(rank, world, local, dev, initialized_here=True)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a list of floats over the ranks (identity for one process)."""
    if info.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()
