"""SFT data: records (`instruction`, `output`: one answer or a list of answers) -> token rows
with next-token targets and a loss mask on the answer tokens + EOS only (never the prompt,
never padding), right-padded collation, and optional packing of several samples per row.

Sequence of one sample: ``encode(format_prompt(instruction), bos=True) + encode(answer,
bos=False) + [eos]``; model input = sequence[:-1], targets = sequence[1:], so a row never
exceeds ``max_seq_len`` input tokens (longer sequences are truncated at the end, counted and
logged). Which answer a record contributes is drawn from a generator seeded by (seed,
epoch, record index): the same under any DP / accumulation layout and after ``--resume``.

Packing concatenates the samples of a micro-batch into as few rows of ``max_seq_len`` as
first-fit allows, with segment ids (attention block-diagonal, via ``causal_mask``) and
positions restarting at 0 per sample, so every sample sees exactly what it would alone: the
summed loss is the same as unpacked.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import UsageError
from ..log import get_logger

from ..records import DataError, load_records
from .encoding import PLAIN, PromptFormat, encode_prompt, encode_response

REQUIRED = ("instruction", "output")


@dataclass
class SFTSample:
    tokens: list[int]  # model input, len <= max_seq_len
    targets: list[int]  # next token of each input position
    mask: list[bool]  # loss on this position (its target is an answer token or EOS)


def _answers(record: dict, where: str) -> list[str]:
    out = record["output"]
    if isinstance(out, str):
        out = [out]
    if not isinstance(out, list) or not out or not all(isinstance(a, str) for a in out):
        raise DataError(f"{where}: 'output' must be a string or a non-empty list of strings")
    if not isinstance(record["instruction"], str):
        raise DataError(f"{where}: 'instruction' must be a string")
    return out


class SFTDataset:
    """Tokenised once up front: every (record, answer) pair, with truncation counted."""

    def __init__(self, records: Sequence[dict], tokenizer, max_seq_len: int, seed: int = 0,
                 source: str = "train file", fmt: PromptFormat = PLAIN):
        if max_seq_len < 2:
            raise UsageError(f"--max_seq_len must be >= 2, got {max_seq_len}")
        if not records:
            raise DataError(f"{source}: no records")
        self.max_seq_len, self.seed = int(max_seq_len), int(seed)
        self.pad_id = tokenizer.pad_id
        self.seqs: list[list[tuple[list[int], int]]] = []  # per record: [(sequence, n_prompt)]
        self.n_sequences = self.n_truncated = self.n_empty = 0
        for i, rec in enumerate(records):
            where = f"{source}: record {i}"
            missing = [k for k in REQUIRED if k not in rec]
            if missing:
                raise DataError(f"{where}: record is missing key(s) {', '.join(missing)}")
            prompt = encode_prompt(tokenizer, rec["instruction"], fmt)
            seqs = []
            for answer in _answers(rec, where):
                seq = prompt + encode_response(tokenizer, answer, fmt, rec["instruction"], prompt)
                self.n_sequences += 1
                if len(seq) > self.max_seq_len + 1:
                    seq = seq[:self.max_seq_len + 1]
                    self.n_truncated += 1
                    if len(prompt) >= len(seq):
                        self.n_empty += 1  # the prompt alone fills the window: nothing to learn
                seqs.append((seq, len(prompt)))
            self.seqs.append(seqs)
        log = get_logger()
        if self.n_truncated:
            log.warning(f"{source}: truncated {self.n_truncated} of {self.n_sequences} sequences to "
                        f"--max_seq_len {self.max_seq_len} ({self.n_empty} keep no answer token)")
        else:
            log.info(f"{source}: {len(self.seqs)} records, {self.n_sequences} sequences, none truncated")

    def __len__(self) -> int:
        return len(self.seqs)

    def sample(self, index: int, epoch: int) -> SFTSample:
        choices = self.seqs[index]
        pick = 0 if len(choices) == 1 else random.Random(f"{self.seed}/{epoch}/{index}").randrange(len(choices))
        seq, n_prompt = choices[pick]
        tokens, targets = seq[:-1], seq[1:]
        # target position t predicts seq[t+1]: an answer token / EOS iff t + 1 >= n_prompt
        mask = [t + 1 >= n_prompt for t in range(len(tokens))]
        return SFTSample(tokens, targets, mask)

    def collate(self, indices: Sequence[int], epoch: int, packing: bool = False) -> dict:
        samples = [self.sample(i, epoch) for i in indices]
        return pack(samples, self.max_seq_len, self.pad_id) if packing else pad(samples, self.pad_id)


def pad(samples: Sequence[SFTSample], pad_id: int) -> dict:
    """Right-padded rows: tokens / targets [B, T] long, mask [B, T] bool."""
    T = max(len(s.tokens) for s in samples)
    B = len(samples)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for r, s in enumerate(samples):
        n = len(s.tokens)
        tokens[r, :n] = torch.tensor(s.tokens)
        targets[r, :n] = torch.tensor(s.targets)
        mask[r, :n] = torch.tensor(s.mask)
    return {"tokens": tokens, "targets": targets, "mask": mask,
            "n_tokens": sum(len(s.tokens) for s in samples)}


def pack(samples: Sequence[SFTSample], max_seq_len: int, pad_id: int) -> dict:
    """First-fit packing into rows of <= max_seq_len tokens; adds positions [B, T] (restarting
    per sample) and segments [B, T] (sample number within its row; the padded tail is one
    more segment of its own, so no query row is ever fully masked)."""
    rows: list[list[SFTSample]] = []
    room: list[int] = []
    for s in sorted(samples, key=lambda s: -len(s.tokens)):
        for r, free in enumerate(room):
            if len(s.tokens) <= free:
                rows[r].append(s)
                room[r] -= len(s.tokens)
                break
        else:
            rows.append([s])
            room.append(max_seq_len - len(s.tokens))
    T = max(max_seq_len - free for free in room)
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.zeros((B, T), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, s in enumerate(row):
            n = len(s.tokens)
            tokens[r, at:at + n] = torch.tensor(s.tokens)
            targets[r, at:at + n] = torch.tensor(s.targets)
            mask[r, at:at + n] = torch.tensor(s.mask)
            positions[r, at:at + n] = torch.arange(n)
            segments[r, at:at + n] = k
            at += n
        if at < T:
            positions[r, at:] = torch.arange(T - at)
            segments[r, at:] = len(row)
    return {"tokens": tokens, "targets": targets, "mask": mask, "positions": positions, "segments": segments,
            "n_tokens": sum(len(s.tokens) for s in samples)}


def load_sft_dataset(path: str, tokenizer, max_seq_len: int, seed: int = 0,
                     fmt: PromptFormat = PLAIN) -> SFTDataset:
    """Records of a JSON / JSONL file (errors name the file and line) -> SFTDataset."""
    records = load_records(path, REQUIRED)
    return SFTDataset(records, tokenizer, max_seq_len, seed, source=str(path), fmt=fmt)


def sft_collate_fn(dataset: SFTDataset, packing: bool = False):
    def collate(indices: list[int], epoch: int, _ds=dataset, _packing=packing) -> dict:
        return _ds.collate(indices, epoch, _packing)
    return collate


__all__ = ["SFTDataset", "SFTSample", "pad", "pack", "load_sft_dataset", "sft_collate_fn", "REQUIRED", "DataError"]
