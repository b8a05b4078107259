"""SentencePiece `.model` tokenizers (Llama 1/2, Mistral, and the ones we train)."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from ..errors import UsageError
from .base import Tokenizer


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str | Path):
        self.path = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise UsageError(f"{self.path}: not a valid SentencePiece model ({e})") from None
        if self.sp.eos_id() < 0:
            raise UsageError(f"{self.path}: SentencePiece model defines no eos piece")

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    @property
    def bos_id(self) -> int | None:
        return self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def real_pad_id(self) -> int | None:
        # Llama's model has pad_id -1, which must never reach an embedding lookup.
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def files(self) -> dict[str, Path]:
        return {"tokenizer.model": self.path}
