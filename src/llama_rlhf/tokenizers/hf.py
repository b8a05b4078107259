"""Hugging Face `tokenizer.json` directories (Qwen, Llama-3), through transformers."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from .base import Tokenizer

# Everything a tokenizer directory may hold that AutoTokenizer reads back; transformers >= 5
# keeps the chat template in its own chat_template.jinja rather than in tokenizer_config.json.
# generation_config.json travels too: it lists the eos ids beyond the tokenizer's one (<|eot_id|>).
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "chat_template.jinja", "chat_template.json", "tokenizer.model", "generation_config.json")


class HFTokenizer(Tokenizer):
    def __init__(self, directory: str | Path):
        from transformers import AutoTokenizer  # slow import, paid only by HF users

        self.path = Path(directory)
        try:
            self.tok = AutoTokenizer.from_pretrained(str(self.path))
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"{self.path}: cannot load HF tokenizer ({first})") from None
        if self.tok.eos_token_id is None:
            raise UsageError(f"{self.path}: tokenizer defines no eos token")
        # A bos token the tokenizer never prepends (SmolLM2's <|im_start|>, a GGUF with add_bos_token
        # false) is no BOS here: Tokenizer.encode would put it in front of every prompt.
        bos = self.tok.bos_token_id
        self._bos_id = bos if bos is not None and self.tok.encode("a")[:1] == [bos] else None

    def _encode(self, text: str) -> list[int]:
        # Special tokens are added by Tokenizer.encode so that bos/eos mean the same for all.
        return self.tok.encode(text, add_special_tokens=False)

    def _decode(self, ids: list[int]) -> str:
        # No clean-up: it rewrites " ," and the like, so decode(encode(text)) would differ from text.
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self.tok.eos_token_id

    @property
    def real_pad_id(self) -> int | None:
        return self.tok.pad_token_id

    @property
    def stop_ids(self) -> list[int]:
        listed = _generation_eos_ids(self.path / "generation_config.json")
        return list(dict.fromkeys([self.eos_id, *listed]))

    @property
    def vocab_size(self) -> int:
        return len(self.tok)  # includes added tokens, which are real ids

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.path / name for name in HF_FILES if (self.path / name).is_file()}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        if not self.tok.chat_template:
            raise UsageError(f"{self.path}: tokenizer has no chat_template")
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateError as e:  # e.g. Mistral's template refuses a system role
            raise UsageError(f"{self.path}: the chat template refuses this conversation ({e})") from None


def _generation_eos_ids(path: Path) -> list[int]:
    """`eos_token_id` of a generation_config.json (an int or a list), [] without the file."""
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable generation config ({e})") from None
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UsageError(f"{path}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return ids
