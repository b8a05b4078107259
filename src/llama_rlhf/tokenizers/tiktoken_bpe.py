"""tiktoken BPE files (Meta Llama-3's `tokenizer.model`, Qwen-1's `qwen.tiktoken`), through `tiktoken`.

The file is one line per mergeable token, `<base64 of its bytes> <rank>`, ranks 0..n-1. It holds
no special tokens, split regex or bos / eos: those belong to the model family (the "flavour")
and are listed here, the specials taking the ids n, n+1, ... in the order given:

- llama3: 256 specials, `<|begin_of_text|>` (n, the BOS) and `<|end_of_text|>` (n+1, the EOS) first,
  `<|eot_id|>` at n+9; a chat turn ends with `<|eot_id|>`.
- qwen1: `<|endoftext|>` (n, the EOS), `<|im_start|>`, `<|im_end|>`, `<|extra_0|>`..`<|extra_204|>`;
  no BOS; a chat turn ends with `<|im_end|>`.

Which flavour (`flavour_of`): a `tokenizer_config.json` beside the file naming QWenTokenizer, or a
`config.json` beside it with model_type "qwen", means qwen1; otherwise the file name decides:
`*.tiktoken` is qwen1 (Qwen-1 is the model that ships that name), a `.model` file is llama3.
The name is kept when the tokenizer is saved, so a checkpoint reads back as the same flavour.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import UsageError
from .base import Tokenizer

# A tiktoken line: base64 (padded), whitespace, a decimal rank. A SentencePiece protobuf starts
# with byte 0x0a (field 1, the pieces), so its first line is empty and never matches.
_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2}[ \t]+\d+\r?$")


@dataclass(frozen=True)
class Flavour:
    name: str
    pat_str: str  # the pre-tokenisation regex the model was trained with
    specials: tuple[str, ...]  # ids len(ranks), len(ranks) + 1, ... in this order
    bos: Optional[str]
    eos: str
    end_of_turn: str


def _llama3_specials() -> tuple[str, ...]:
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
             9: "<|eot_id|>"}
    reserved = iter(range(256))  # every other slot is reserved_special_token_0, _1, ... in order
    return tuple(named.get(i) or f"<|reserved_special_token_{next(reserved)}|>" for i in range(256))


# The two regexes differ only in numbers: Llama-3 groups up to 3 digits, Qwen-1 splits every digit.
_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3 = Flavour("llama3", _PAT % "{1,3}", _llama3_specials(), "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
QWEN1 = Flavour("qwen1", _PAT % "",
                ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205))),
                None, "<|endoftext|>", "<|im_end|>")


def is_tiktoken_file(path: Path) -> bool:
    """Whether `path` starts like a tiktoken BPE file (so a `.model` is not SentencePiece)."""
    try:
        with open(path, "rb") as f:
            first = f.read(4096).split(b"\n", 1)[0]
    except OSError:
        return False
    return bool(_LINE.match(first))


def _json_beside(path: Path, name: str) -> dict:
    try:
        raw = json.loads((path.parent / name).read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: it only refines the guess, the tokenizer file decides
    return raw if isinstance(raw, dict) else {}


def flavour_of(path: Path) -> Flavour:
    if _json_beside(path, "tokenizer_config.json").get("tokenizer_class") == "QWenTokenizer":
        return QWEN1
    if _json_beside(path, "config.json").get("model_type") == "qwen":
        return QWEN1
    return QWEN1 if path.suffix == ".tiktoken" else LLAMA3


def read_ranks(path: Path) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken file; a malformed one is a UsageError naming the line."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise UsageError(f"{path}: cannot read tiktoken file ({e.strerror})") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not _LINE.match(line):
            raise UsageError(f"{path}:{n}: not a tiktoken BPE line (expected '<base64> <rank>')")
        token, rank = line.split()
        try:
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except binascii.Error:
            raise UsageError(f"{path}:{n}: bad base64 token") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UsageError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once (tokens and ranks unique)")
    if any(bytes([b]) not in ranks for b in range(256)):
        # byte-level BPE falls back to single bytes: without all 256 some text has no encoding
        raise UsageError(f"{path}: lacks some of the 256 single-byte tokens")
    return ranks


class TiktokenTokenizer(Tokenizer):
    def __init__(self, path: str | Path, flavour: Optional[Flavour] = None):
        import tiktoken  # imported only by users of these files

        self.path = Path(path)
        self.flavour = flavour or flavour_of(self.path)
        ranks = read_ranks(self.path)
        specials = {tok: len(ranks) + i for i, tok in enumerate(self.flavour.specials)}
        self.enc = tiktoken.Encoding(f"{self.flavour.name}:{self.path.name}", pat_str=self.flavour.pat_str,
                                     mergeable_ranks=ranks, special_tokens=specials)
        self.special_ids = specials

    def _encode(self, text: str) -> list[int]:
        # Special tokens written in the text are parsed (as HF and Qwen's own tokenizer do), so a
        # rendered chat template keeps its markers and a leading BOS is not doubled.
        return self.enc.encode(text, allowed_special="all")

    def _decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)  # invalid UTF-8 (a cut multi-byte char) becomes U+FFFD

    @property
    def bos_id(self) -> int | None:
        return None if self.flavour.bos is None else self.special_ids[self.flavour.bos]

    @property
    def eos_id(self) -> int:
        return self.special_ids[self.flavour.eos]

    @property
    def stop_ids(self) -> list[int]:
        """eos and the end of a chat turn: an instruct model ends its reply with the latter."""
        return [self.eos_id, self.special_ids[self.flavour.end_of_turn]]

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def files(self) -> dict[str, Path]:
        # tokenizer_config.json travels too: it may hold the chat template and names the flavour.
        beside = self.path.parent / "tokenizer_config.json"
        return {self.path.name: self.path, **({beside.name: beside} if beside.is_file() else {})}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        template = _json_beside(self.path, "tokenizer_config.json").get("chat_template")
        if not isinstance(template, str):
            raise UsageError(f"{self.path}: tiktoken tokenizer has no chat template "
                             f"(no tokenizer_config.json with a chat_template beside it)")
        return _render(template, self.path, messages, add_generation_prompt,
                       bos_token=self.flavour.bos or "", eos_token=self.flavour.eos)


def _render(template: str, source: Path, messages: list[dict], add_generation_prompt: bool, **tokens: str) -> str:
    """A chat template rendered as transformers does (sandboxed, trim / lstrip blocks)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **tokens)
    except TemplateError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{source}: the chat template fails on this conversation ({first})") from None
