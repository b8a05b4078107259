"""The parallel layers the transformer is built from.

At TP = 1 they are plain torch modules (no process group needed on a laptop);
at TP > 1 they are FairScale's column / row / vocab-parallel layers. Parameter
names are `weight` / `bias` either way, so checkpoints do not care.
"""
from __future__ import annotations

import torch.nn as nn
from fairscale.nn.model_parallel import layers as fsl

from .state import tp_size


def _no_init(w):  # weights come from a checkpoint or an explicit init pass
    return w


def column_parallel_linear(in_features: int, out_features: int, bias: bool = False,
                           gather_output: bool = False) -> nn.Module:
    """y = x W^T with W split on the output dim (dim 0 of the weight)."""
    if tp_size() == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return fsl.ColumnParallelLinear(in_features, out_features, bias=bias, gather_output=gather_output,
                                    init_method=_no_init)


def row_parallel_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    """y = x W^T with W split on the input dim; partial sums all-reduced."""
    if tp_size() == 1:
        return nn.Linear(in_features, out_features, bias=bias)
    return fsl.RowParallelLinear(in_features, out_features, bias=bias, input_is_parallel=True,
                                 init_method=_no_init)


def vocab_parallel_embedding(num_embeddings: int, embedding_dim: int) -> nn.Module:
    """Embedding split on the vocabulary (dim 0), so it can be tied to the output."""
    if tp_size() == 1:
        return nn.Embedding(num_embeddings, embedding_dim)
    return fsl.VocabParallelEmbedding(num_embeddings, embedding_dim, init_method=_no_init)
