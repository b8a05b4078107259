"""Sequence-level rewards for PPO: the verifier's score, the GSM8K rule, or both."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import UsageError
from ..tasks.gsm8k import extract_answer, is_correct

REWARDS = ("rm", "rule", "rm+rule")


def rule_rewards(texts: list[str], labels: list[Optional[str]]) -> torch.Tensor:
    """1 when the extracted answer equals the record's label, else 0. [N]"""
    out = []
    for text, label in zip(texts, labels):
        pred = extract_answer(text)
        out.append(1.0 if pred is not None and is_correct(pred, label) else 0.0)
    return torch.tensor(out)


def combine_rewards(kind: str, rm_scores: Optional[torch.Tensor], rule: Optional[torch.Tensor],
                    finished: torch.Tensor, unfinished_penalty: float) -> torch.Tensor:
    """Score per response [N]; answers that never finished get `-unfinished_penalty` added."""
    if kind not in REWARDS:
        raise UsageError(f"--reward must be one of {REWARDS}, got {kind!r}")
    score = torch.zeros_like(finished, dtype=torch.float32)
    if "rm" in kind:
        score = score + rm_scores.float()
    if "rule" in kind:
        score = score + rule.float()
    return score - unfinished_penalty * (~finished).float()
