"""The one tokenizer interface the trainers see, whatever library sits underneath."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable

from ..errors import UsageError


class Tokenizer(ABC):
    """Text <-> ids with the special ids a causal LM trainer needs.

    `bos_id` is None for tokenizers that use no BOS (Qwen); `pad_id` is always a valid id
    (the real pad, else eos, else 0) because padded batches must index the embedding."""

    @abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Ids of `text` with no special tokens added."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of ids that are all in range and not bos/eos/pad."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def files(self) -> dict[str, Path]:
        """What `save_tokenizer` copies: destination file name -> source path."""

    @property
    def real_pad_id(self) -> int | None:
        return None

    @property
    def stop_ids(self) -> list[int]:
        """Every id that ends a generated row: eos, plus what the model's generation config
        lists (Llama-3's <|eot_id|>, Qwen's <|im_end|>), so chat replies stop at end of turn."""
        return [self.eos_id] if self.eos_id >= 0 else []

    @property
    def pad_id(self) -> int:
        pad = self.real_pad_id
        if pad is not None:
            return pad
        return self.eos_id if self.eos_id >= 0 else 0

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of `text`; BOS is not doubled when the text (e.g. a chat template) already has it."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._encode(text)
        if bos and self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids = [self.bos_id, *ids]
        return [*ids, self.eos_id] if eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` with bos/eos/pad/stop ids dropped, and ids past the tokenizer's vocabulary too
        (a model's embedding is often padded beyond it, e.g. to split evenly across ranks)."""
        special = {self.bos_id, self.eos_id, self.pad_id, *self.stop_ids}
        n = self.vocab_size
        return self._decode([i for i in map(int, ids) if 0 <= i < n and i not in special])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered as the model was trained to see it."""
        raise UsageError(f"{type(self).__name__}: this tokenizer has no chat template")
