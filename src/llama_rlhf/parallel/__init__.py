"""Everything that knows about processes: the only package that imports
torch.distributed or fairscale. Model math asks it for layers and sizes.

The world is a TP x DP grid laid out as fairscale does it: consecutive ranks
form one tensor-parallel group (one model replica), replicas are data parallel.
"""
from .state import (
    all_gather_objects, barrier, device, dp_all_reduce, dp_group, dp_rank, dp_size, init, is_distributed,
    is_main, rank, tp_group, tp_rank, tp_size, world_size, broadcast_object, autocast_dtype,
)
from .layers import column_parallel_linear, row_parallel_linear, vocab_parallel_embedding

__all__ = [
    "all_gather_objects", "barrier", "device", "dp_all_reduce", "dp_group", "dp_rank", "dp_size", "init",
    "is_distributed", "is_main", "rank", "tp_group", "tp_rank", "tp_size", "world_size", "broadcast_object",
    "autocast_dtype", "column_parallel_linear", "row_parallel_linear", "vocab_parallel_embedding",
]
