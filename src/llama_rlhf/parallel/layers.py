"""The parallel layers the transformer is built from.

At TP = 1 they are plain torch modules (no process group needed on a laptop);
at TP > 1 they are FairScale's column / row / vocab-parallel layers. Parameter
names are `weight` / `bias` either way, so checkpoints do not care.

A vocabulary TP does not divide (32001: an added pad token) is split as if it had
`padded_vocab(vocab, tp)` rows: the embedding and the output projection carry the extra
rows inside their shards, and the output returns logits of the real vocabulary only, so
no caller ever sees a padded id (their logits could otherwise win an argmax or take
softmax mass).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from fairscale.nn.model_parallel import layers as fsl

from .state import tp_size


def _no_init(w):  # weights come from a checkpoint or an explicit init pass
    return w


def padded_vocab(vocab_size: int, tp: int) -> int:
    """Rows of the embedding / output weight split `tp` ways: `vocab_size` rounded up to a
    multiple of `tp` (the only place the padded size is computed). Equal to `vocab_size`
    at TP = 1 and whenever TP divides it."""
    if vocab_size < 1 or tp < 1:
        raise ValueError(f"padded_vocab: vocab_size {vocab_size} and tp {tp} must be >= 1")
    return -(-vocab_size // tp) * tp


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
    """Embedding split on the vocabulary (dim 0), so it can be tied to the output. Its rows
    are padded to `padded_vocab`; ids past `num_embeddings` never come (the tokenizer's
    vocabulary is at most the model's), so the pad rows are never looked up."""
    tp = tp_size()
    if tp == 1:
        return nn.Embedding(num_embeddings, embedding_dim)
    emb = fsl.VocabParallelEmbedding(padded_vocab(num_embeddings, tp), embedding_dim, init_method=_no_init)
    emb.vocab_pad_rows = padded_vocab(num_embeddings, tp) - num_embeddings
    return emb


class VocabParallelOutput(fsl.ColumnParallelLinear):
    """The output projection at TP > 1: column-parallel over the padded vocabulary, logits
    gathered on every rank and cut to the real vocabulary (pad columns dropped before anyone
    sees them, so they get no gradient either)."""

    def __init__(self, in_features: int, vocab_size: int, tp: int):
        super().__init__(in_features, padded_vocab(vocab_size, tp), bias=False, gather_output=True,
                         init_method=_no_init)
        self.vocab_size = vocab_size
        self.vocab_pad_rows = padded_vocab(vocab_size, tp) - vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits[..., :self.vocab_size] if self.vocab_pad_rows else logits


def vocab_parallel_output(in_features: int, vocab_size: int) -> nn.Module:
    """logits = x W^T over the full (real) vocabulary on every rank, W split on the vocab."""
    tp = tp_size()
    if tp == 1:
        return nn.Linear(in_features, vocab_size, bias=False)
    return VocabParallelOutput(in_features, vocab_size, tp)
