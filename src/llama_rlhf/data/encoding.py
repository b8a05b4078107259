"""Token ids of prompts and answers, one way for every stage: SFT, pairs, generation, PPO."""
from __future__ import annotations

from typing import Optional

from ..errors import UsageError
from ..tasks.gsm8k import format_prompt


def encode_prompt(tokenizer, instruction: str) -> list[int]:
    """Prompt ids of an instruction, exactly as SFT, generation and PPO encode it."""
    return tokenizer.encode(format_prompt(instruction), bos=True, eos=False)


def encode_response(tokenizer, text: str) -> list[int]:
    """Response ids of an answer text: its tokens + EOS (what SFT trains and generation emits)."""
    return tokenizer.encode(text, bos=False, eos=False) + [tokenizer.eos_id]


def left_truncate(ids: list[int], max_len: int, bos_id: Optional[int]) -> list[int]:
    """The last `max_len` ids, keeping a leading BOS (when there is room for more than it)."""
    if len(ids) <= max_len:
        return ids
    head = ids[:1] if bos_id is not None and ids and ids[0] == bos_id and max_len > 1 else []
    return head + ids[len(ids) - (max_len - len(head)):]


def fit_length(prompt: list[int], response: list[int], max_seq_len: Optional[int],
               bos_id: Optional[int] = None) -> tuple[list[int], list[int], bool]:
    """(prompt, response, truncated) with len(prompt) + len(response) <= max_seq_len: the prompt
    is cut from the left (BOS kept), then the response from the end; both keep >= 1 token."""
    if max_seq_len is None or len(prompt) + len(response) <= max_seq_len:
        return prompt, response, False
    if max_seq_len < 2:
        raise UsageError(f"--max_seq_len must be >= 2, got {max_seq_len}")
    keep_bos = bool(prompt) and bos_id is not None and prompt[0] == bos_id
    prompt = left_truncate(prompt, max(max_seq_len - len(response), 1 + keep_bos), bos_id)
    response = response[:max_seq_len - len(prompt)]
    return prompt, response, True
