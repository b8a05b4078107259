"""Token ids of prompts and answers, one way for every stage: SFT, pairs, generation, PPO.

A `PromptFormat` says how an instruction becomes a prompt:

* `plain`: the instruction + a newline (tasks/gsm8k.py `format_prompt`), BOS as the tokenizer
  adds it; the target is the answer + EOS.
* `chat`: `[{"role": "user", "content": instruction}]` (after an optional system message)
  rendered by the tokenizer's own chat template with `add_generation_prompt=True`. The target
  is what the template renders for the assistant reply, up to and including its end-of-turn
  token (the first of the tokenizer's `stop_ids`). The whole conversation is tokenised once
  and the prompt ids must be a prefix of it, so the split never cuts a merged token.

Either way `prompt_suffix` is appended to each instruction (a zero-shot instruction such as
"Let's think step by step.") and few-shot exemplars come first: plain text blocks, or
earlier user / assistant turns. BOS follows the tokenizer: none for tokenizers that add none
(SmolLM2, Qwen), and never a second one when the template renders it (Llama-3).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..config import flag
from ..errors import UsageError
from ..records import load_records
from ..tasks.gsm8k import format_prompt

TEMPLATES = ("plain", "chat")
PROMPT_FILE = "prompt.json"  # the format a checkpoint was trained with, read as later stages' default


@dataclass(frozen=True)
class PromptFormat:
    template: str = "plain"
    system_prompt: Optional[str] = None
    prompt_suffix: str = ""
    fewshot: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # (instruction, answer)

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise UsageError(f"--template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if self.system_prompt is not None and self.template != "chat":
            raise UsageError("--system_prompt needs --template chat")

    def recorded(self) -> dict:
        """What a checkpoint records (exemplars are an evaluation choice, not a model's)."""
        return {k: v for k, v in asdict(self).items() if k != "fewshot"}

    def messages(self, instruction: str, reply: Optional[str] = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        for q, a in self.fewshot:
            msgs += [{"role": "user", "content": self._ask(q)}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": self._ask(instruction)})
        return msgs if reply is None else [*msgs, {"role": "assistant", "content": reply}]

    def plain_text(self, instruction: str) -> str:
        shots = "".join(format_prompt(self._ask(q)) + a.rstrip() + "\n\n" for q, a in self.fewshot)
        return shots + format_prompt(self._ask(instruction))

    def _ask(self, instruction: str) -> str:
        return instruction.rstrip() + self.prompt_suffix


PLAIN = PromptFormat()


@dataclass(kw_only=True)
class PromptFlags:
    """The prompt flags of every stage. Unset, each takes what the input checkpoint recorded
    (its prompt.json), else the plain default, so a chat SFT run's later stages stay chat."""
    template: Optional[str] = flag(None, choices=TEMPLATES)  # plain | chat
    system_prompt: Optional[str] = None  # chat only: a system message before the user turn
    prompt_suffix: Optional[str] = None  # appended to every instruction, e.g. " Answer step by step."

    def prompt_format(self, ckpt_dir: Optional[str], fewshot: tuple = ()) -> PromptFormat:
        recorded = read_prompt_format(ckpt_dir)
        template = self.template or recorded.get("template", "plain")
        system = self.system_prompt if self.system_prompt is not None else recorded.get("system_prompt")
        if self.template == "plain" and self.system_prompt is None:
            system = None  # an explicit plain overrides a recorded chat format entirely
        suffix = self.prompt_suffix if self.prompt_suffix is not None else recorded.get("prompt_suffix", "")
        return PromptFormat(template, system, suffix, tuple(fewshot))


def encode_prompt(tokenizer, instruction: str, fmt: PromptFormat = PLAIN) -> list[int]:
    """Prompt ids of an instruction, exactly as SFT, generation and PPO encode it."""
    if fmt.template == "chat":
        return tokenizer.encode(tokenizer.apply_chat_template(fmt.messages(instruction)), bos=True)
    return tokenizer.encode(fmt.plain_text(instruction), bos=True, eos=False)


def encode_response(tokenizer, text: str, fmt: PromptFormat = PLAIN, instruction: str = "",
                    prompt: Optional[list[int]] = None) -> list[int]:
    """Response ids of an answer text, what SFT trains and generation emits: its tokens + EOS
    (plain), or the template's assistant turn through its end-of-turn token (chat)."""
    if fmt.template != "chat":
        return tokenizer.encode(text, bos=False, eos=False) + [tokenizer.eos_id]
    prompt = encode_prompt(tokenizer, instruction, fmt) if prompt is None else prompt
    rendered = tokenizer.apply_chat_template(fmt.messages(instruction, text), add_generation_prompt=False)
    full = tokenizer.encode(rendered, bos=True)
    if full[:len(prompt)] != prompt:
        raise UsageError("the chat template's prompt ids are not a prefix of the rendered conversation "
                         f"(instruction {instruction[:40]!r}); use --template plain")
    reply, stops = full[len(prompt):], set(tokenizer.stop_ids)
    end = next((i for i, t in enumerate(reply) if t in stops), None)
    if end is None:
        raise UsageError(f"the chat template ends the assistant turn with none of the stop ids {sorted(stops)} "
                         "(add the end-of-turn id to generation_config.json eos_token_id)")
    return reply[:end + 1]


def read_prompt_format(ckpt_dir: Optional[str]) -> dict:
    """The format recorded in a checkpoint dir ({} when none is)."""
    path = os.path.join(ckpt_dir, PROMPT_FILE) if ckpt_dir else ""
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{path}: unreadable prompt format ({e})") from None


def fewshot_exemplars(path: str, k: int, seed: int = 0) -> tuple[tuple[str, str], ...]:
    """`k` (instruction, first answer) pairs drawn from the records of `path` with a fixed seed."""
    records = load_records(path)
    if k > len(records):
        raise UsageError(f"--fewshot {k} is larger than --fewshot_file {path} ({len(records)} records)")
    picked = random.Random(seed).sample(range(len(records)), k)
    out = []
    for i in picked:
        answer = records[i]["output"]
        out.append((records[i]["instruction"], answer if isinstance(answer, str) else answer[0]))
    return tuple(out)


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
