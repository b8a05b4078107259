"""The rollout buffer: everything one PPO round produces, phase by phase.

Per-token tensors live on action positions [N, T-1] (see `llama_rlhf.scoring`):
position j holds the log-prob / value / reward of token j+1.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..checkpoint import atomic_torch_save
from ..scoring import PairBatch, packed_batch, pair_batch, prompt_rows

# A packed row's length: it bounds one row's activations (`PackedAttention` keeps attention
# linear in the number of responses, so longer rows would cost no more compute).
PACK_ROW_TOKENS = 1024


@dataclass
class RolloutBuffer:
    prompts: list[list[int]]
    responses: list[list[int]]
    labels: list[Optional[str]]
    finished: torch.Tensor  # [N] bool: ended on EOS / stop string
    gen_logprobs: list[list[float]]  # per response token, from the sampler
    texts: list[str] = field(default_factory=list)
    # Filled by later phases, all [N, T-1] float on action positions unless noted.
    logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None  # [N]
    rewards: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, idx: list[int], pad_id: int) -> PairBatch:
        """Rows `idx`, padded only to their own longest row (T-1 columns sliced to match). The
        samples of one prompt among them share packed rows: the prompt is computed once."""
        prompts, responses = [self.prompts[i] for i in idx], [self.responses[i] for i in idx]
        rows = prompt_rows(prompts, responses, PACK_ROW_TOKENS)
        if len(rows) == len(idx):
            return pair_batch(prompts, responses, pad_id)
        return packed_batch(prompts, responses, rows, pad_id)

    def generation_logprobs(self) -> torch.Tensor:
        """Sampler log-probs laid out on action positions [N, T-1]."""
        out = torch.zeros(len(self), self.width())
        for i, (p, lp) in enumerate(zip(self.prompts, self.gen_logprobs)):
            out[i, len(p) - 1:len(p) - 1 + len(lp)] = torch.tensor(lp)
        return out

    def width(self) -> int:
        return max(len(p) + len(r) for p, r in zip(self.prompts, self.responses)) - 1

    def save(self, path: str) -> None:
        """Atomic write, so a crash never leaves a half buffer behind."""
        atomic_torch_save(dataclasses.asdict(self), path)

    @classmethod
    def load(cls, path: str) -> "RolloutBuffer":
        return cls(**torch.load(path, weights_only=False))
