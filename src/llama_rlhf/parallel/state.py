"""Process-group set-up for torchrun and the rank / size queries used everywhere."""
from __future__ import annotations

import atexit
import datetime
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from ..errors import UsageError
from fairscale.nn.model_parallel import initialize as fs



def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def device() -> torch.device:
    """CUDA (one GPU per local rank) when present, else CPU; never hard-coded."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_dtype() -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slower than fp32 here)."""
    return torch.bfloat16 if device().type == "cuda" else torch.float32


def init(tp: Optional[int] = None) -> None:
    """Join the torchrun world (if any) and split it into TP x DP.

    `tp` defaults to 1; scripts pass the number of shards in the checkpoint dir.
    Without torchrun (a laptop) nothing is initialised and TP = DP = 1.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    tp = tp or 1
    if world % tp:
        raise UsageError(f"world size {world} (torchrun --nproc_per_node) is not a multiple of the "
                         f"tensor-parallel size {tp} (checkpoint shards)")
    if world == 1 and tp == 1:
        return
    if not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device())
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        # gloo can abort at interpreter exit when the group is never torn down.
        atexit.register(_shutdown)
    if not fs.model_parallel_is_initialized():
        fs.initialize_model_parallel(tp)
    elif fs.get_model_parallel_world_size() != tp:
        raise ValueError(f"already initialised with TP={fs.get_model_parallel_world_size()}, asked for {tp}")


def _shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def tp_size() -> int:
    return fs.get_model_parallel_world_size() if _mp() else 1


def tp_rank() -> int:
    return fs.get_model_parallel_rank() if _mp() else 0


def dp_size() -> int:
    return fs.get_data_parallel_world_size() if _mp() else 1


def dp_rank() -> int:
    return fs.get_data_parallel_rank() if _mp() else 0


def tp_group() -> Any:
    return fs.get_model_parallel_group() if _mp() else None


def dp_group() -> Any:
    return fs.get_data_parallel_group() if _mp() else None


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def dp_all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over the data-parallel group (sum or max)."""
    if dp_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=dp_group())
    return tensor


def all_gather_objects(obj: Any, group: str = "dp") -> list:
    """Every DP replica's `obj`, in DP rank order (identical on all ranks)."""
    if dp_size() == 1 or group != "dp":
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    # TP ranks of one replica hold the same object: keep one per replica.
    return out[::tp_size()]


def _mp() -> bool:
    return is_distributed() and fs.model_parallel_is_initialized()
