"""Distributed-run helpers: process group setup (torchrun, torch.distributed.launch, SLURM) and reductions."""
import os
from typing import Dict

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


def init_distributed_mode(args) -> None:
    """Set ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu`` and join the group.

    Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK, torch.distributed.launch's ``--local_rank`` flag
    (``args.local_rank``), or SLURM's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID.
    NCCL on CUDA, gloo on CPU.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", getattr(args, "local_rank", 0) or 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        args.gpu = int(os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("RANK", str(args.rank))
        os.environ.setdefault("WORLD_SIZE", str(args.world_size))
        os.environ.setdefault("LOCAL_RANK", str(args.gpu))
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("SLURM run: set MASTER_ADDR (and MASTER_PORT) to the first node's address")
        os.environ.setdefault("MASTER_PORT", "29500")
    else:
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return
    args.distributed = True
    use_cuda = torch.cuda.is_available() and str(getattr(args, "device", "cuda")).startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    args.dist_backend = backend
    dist.init_process_group(backend=backend, init_method="env://", world_size=args.world_size, rank=args.rank)
    dist.barrier()


def broadcast_int(value: int, device) -> int:
    """Rank 0's ``value`` on every process (so all ranks take the same branch); no-op in one process."""
    if not is_dist_avail_and_initialized():
        return value
    tensor = torch.tensor([value if is_main_process() else 0], dtype=torch.long, device=device)
    dist.broadcast(tensor, 0)
    return int(tensor.item())
