"""Forward passes over (prompt, response) pairs: per-token log-probs, values and
verifier scores. Shared by the verifier, DPO and PPO so all three agree on one
token alignment:

    tokens  [B, T]    prompt + response, right-padded
    actions [B, T-1]  position j is the prediction of token j+1 from tokens <= j
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import token_entropy, token_logprobs


@dataclass
class PairBatch:
    tokens: torch.Tensor  # [B, T] long
    action_mask: torch.Tensor  # [B, T-1] bool: True where token j+1 is a response token
    last_index: torch.Tensor  # [B] long: position of each row's last response token

    def to(self, device) -> "PairBatch":
        return PairBatch(self.tokens.to(device), self.action_mask.to(device), self.last_index.to(device))


def pair_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PairBatch:
    """Right-padded prompt+response rows; every response must be non-empty."""
    rows = [p + r for p, r in zip(prompts, responses)]
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    action_mask = torch.zeros(len(rows), max(T - 1, 1), dtype=torch.bool)
    last = torch.zeros(len(rows), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not r:
            raise ValueError(f"row {i}: empty response")
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        action_mask[i, len(p) - 1:len(p) + len(r) - 1] = True
        last[i] = len(p) + len(r) - 1
    return PairBatch(tokens, action_mask, last)


def action_logprobs(model, batch: PairBatch, with_entropy: bool = False):
    """log p(token j+1 | tokens <= j) for every action position: [B, T-1] (and entropy [B, T-1]).

    Logits are only made from the first action column on: the prompt positions before it
    would cost a [B, prompt, V] fp32 tensor for nothing (their values are 0 here)."""
    start = int(batch.action_mask.any(0).int().argmax())  # first column with an action in any row
    logits = model.output(model.hidden(batch.tokens)[:, start:-1]).float()  # [B, T-1-start, V]
    pad = (start, 0)  # back to [B, T-1]
    logps = torch.nn.functional.pad(token_logprobs(logits, batch.tokens[:, start + 1:]), pad)
    if with_entropy:
        return logps, torch.nn.functional.pad(token_entropy(logits), pad)
    return logps


def action_values(model, batch: PairBatch) -> torch.Tensor:
    """Critic value of the state before each action: [B, T-1]."""
    return model.values(model.hidden(batch.tokens))[:, :-1]


def sequence_scores(model, batch: PairBatch, reduce: str = "last") -> torch.Tensor:
    """Verifier score of each response: the head at its last token, or the mean over its tokens. [B]"""
    values = model.values(model.hidden(batch.tokens))  # [B, T]
    if reduce == "last":
        return values.gather(1, batch.last_index[:, None])[:, 0]
    if reduce == "mean":
        # Response tokens are the targets of the action positions: shift the mask by one.
        mask = torch.zeros_like(values, dtype=torch.bool)
        mask[:, 1:] = batch.action_mask
        return (values * mask).sum(1) / mask.sum(1)
    raise ValueError(f"--reduce must be 'last' or 'mean', got {reduce!r}")
