"""Everything that knows about processes: the only package that imports
torch.distributed or fairscale. Model math asks it for layers and sizes.

The world is a TP x DP grid laid out as fairscale does it: consecutive ranks
form one tensor-parallel group (one model replica), replicas are data parallel.
"""
from .state import (
    all_gather_objects, barrier, device, dp_all_reduce, dp_group, dp_rank, dp_size, init, is_distributed,
    is_main, rank, tp_group, tp_rank, tp_size, world_size, autocast_dtype,
)
from .layers import (column_parallel_linear, padded_vocab, row_parallel_linear, vocab_parallel_embedding,
                     vocab_parallel_output)
from .grads import (
    all_reduce_grads, clip_grad_norm, copy_to_tp, grad_norm, is_tp_sharded, param_count, reduce_from_tp, scale_grads,
)
from .groups import ReplicaGroups, all_gather_ranks, all_reduce_grads_over, broadcast_params, gather_objects, member

__all__ = [
    "all_gather_objects", "barrier", "device", "dp_all_reduce", "dp_group", "dp_rank", "dp_size", "init",
    "is_distributed", "is_main", "rank", "tp_group", "tp_rank", "tp_size", "world_size",
    "autocast_dtype", "column_parallel_linear", "row_parallel_linear", "vocab_parallel_embedding",
    "vocab_parallel_output", "padded_vocab",
    "all_reduce_grads", "clip_grad_norm", "copy_to_tp", "grad_norm", "is_tp_sharded", "param_count",
    "reduce_from_tp", "scale_grads", "ReplicaGroups", "all_gather_ranks", "all_reduce_grads_over",
    "broadcast_params", "gather_objects", "member",
]
