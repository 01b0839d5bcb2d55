"""Multi-process (torchrun / DDP) helpers; every function is a no-op in a single-process run."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from pipeline.errors import UserError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU.

    Returns the device this process uses (`cuda:<LOCAL_RANK>` on CUDA); unchanged when not launched
    by torchrun.
    """
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"torchrun started process {local_rank} on this node but only {torch.cuda.device_count()} CUDA "
                f"device(s) are visible: lower --gpus / --nproc_per_node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def cleanup() -> None:
    """Leave the process group (end of a torchrun stage)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over all processes (a copy; the input is left alone)."""
    if not is_distributed():
        return values.clone()
    out = values.detach().to(_collective_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def all_reduce_min_(values: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum of a small tensor over all processes, in place; returns it."""
    if not is_distributed():
        return values
    out = values.detach().to(_collective_device())
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    if out.data_ptr() != values.data_ptr():
        values.copy_(out)
    return values


def all_reduce_min(value: int) -> int:
    """The smallest of one integer over all processes."""
    if not is_distributed():
        return int(value)
    out = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return int(out.item())


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite every tensor in place with process `src`'s copy (e.g. batch-norm statistics)."""
    if not is_distributed():
        return
    device = _collective_device()
    for tensor in tensors:
        buffer = tensor.detach().to(device)  # the tensor itself when it already lives there
        dist.broadcast(buffer, src)
        if buffer.data_ptr() != tensor.data_ptr():
            tensor.detach().copy_(buffer)


def all_gather_arrays(*arrays: np.ndarray) -> list[np.ndarray]:
    """Concatenate each array along axis 0 over all processes, in rank order (lengths may differ)."""
    if not is_distributed():
        return [np.asarray(a) for a in arrays]
    gathered: list[list[np.ndarray] | None] = [None] * world_size()
    dist.all_gather_object(gathered, [np.asarray(a) for a in arrays])
    return [np.concatenate([parts[i] for parts in gathered]) for i in range(len(arrays))]


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... of range(n): every sample exactly once over all ranks (no padding).

    Use it for validation/inference loaders so gathered predictions are not duplicated.
    """

    def __init__(self, n: int, shard: int | None = None, num_shards: int | None = None) -> None:
        self.n = int(n)
        self.shard = rank() if shard is None else int(shard)
        self.num_shards = world_size() if num_shards is None else int(num_shards)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.shard, self.n, self.num_shards))

    def __len__(self) -> int:
        return len(range(self.shard, self.n, self.num_shards))
