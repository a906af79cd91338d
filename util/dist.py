"""Distributed-run helpers: process group setup (torchrun, torch.distributed.launch, SLURM) and reductions."""
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def say(*parts, **kwargs) -> None:
    """print() on the main process only, so an N-process run does not repeat every line N times."""
    if is_main_process():
        print(*parts, **kwargs)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (no-op in a single process). Returns a new tensor."""
    tensor = tensor.clone()
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor)
    return tensor


def reduce_dict(values: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """Reduce a dict of scalar tensors over processes (same keys on every rank)."""
    world_size = get_world_size()
    if world_size < 2:
        return values
    with torch.no_grad():
        names = sorted(values.keys())
        stacked = torch.stack([values[k].detach().float() for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size
        return dict(zip(names, stacked))


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: what ``init_distributed_mode`` found and set up.

    ``device``: this process's device ('cuda:<local_gpu>' in a CUDA job, else the configured one);
    ``backend``: the process group's ('nccl' or 'gloo'), None in a single process.
    """

    distributed: bool
    rank: int
    world_size: int
    local_gpu: int
    device: str
    backend: Optional[str] = None


def init_distributed_mode(device: str, local_rank: int = 0) -> DistInfo:
    """Join the process group of a multi-process job, if this is one; returns this process's place.

    Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK, torch.distributed.launch's ``--local_rank`` flag
    (``local_rank``), or SLURM's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. ``device``: the
    configured device ('cuda' or 'cpu'). NCCL on CUDA, gloo on CPU.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_gpu = int(os.environ.get("LOCAL_RANK", local_rank or 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        rank = int(os.environ["SLURM_PROCID"])
        world_size = int(os.environ["SLURM_NTASKS"])
        local_gpu = int(os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(local_gpu))
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("SLURM run: set MASTER_ADDR (and MASTER_PORT) to the first node's address")
        os.environ.setdefault("MASTER_PORT", "29500")
    else:
        return DistInfo(distributed=False, rank=0, world_size=1, local_gpu=0, device=str(device))
    use_cuda = torch.cuda.is_available() and str(device).startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_gpu)
        device = f"cuda:{local_gpu}"
    dist.init_process_group(backend=backend, init_method="env://", world_size=world_size, rank=rank)
    dist.barrier()
    return DistInfo(distributed=True, rank=rank, world_size=world_size, local_gpu=local_gpu, device=str(device),
                    backend=backend)


def broadcast_int(value: int, device) -> int:
    """Rank 0's ``value`` on every process (so all ranks take the same branch); no-op in one process."""
    if not is_dist_avail_and_initialized():
        return value
    tensor = torch.tensor([value if is_main_process() else 0], dtype=torch.long, device=device)
    dist.broadcast(tensor, 0)
    return int(tensor.item())
