"""Finding, copying and training tokenizers."""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm

from ..errors import MissingPathError, UsageError
from ..gguf import write_gguf_tokenizer
from ..log import get_logger
from .base import Tokenizer
from .hf import HFTokenizer
from .sp import SentencePieceTokenizer
from .tiktoken_bpe import TiktokenTokenizer, is_tiktoken_file

# Special ids of the SentencePiece models we train: Llama's layout (unk 0, bos 1, eos 2)
# plus a real pad at 3, so padding never aliases eos and ids stay distinct.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_N_BYTE_PIECES = 256  # byte_fallback reserves one piece per byte value


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A `.model` file (SentencePiece, or tiktoken text as Meta's Llama-3 ships), a `*.tiktoken`
    file (Qwen-1), a `.gguf` (the tokenizer in its metadata), or a directory holding
    tokenizer.json (preferred), tokenizer.model or one `*.tiktoken`."""
    p = Path(path)
    if not p.exists():
        raise MissingPathError(f"tokenizer not found: {p}")
    if p.is_file():
        if p.name == "tokenizer.json":
            return HFTokenizer(p.parent)
        if p.suffix == ".tiktoken" or (p.suffix == ".model" and is_tiktoken_file(p)):
            return TiktokenTokenizer(p)
        if p.suffix == ".model":
            return SentencePieceTokenizer(p)
        if p.suffix == ".gguf":
            return _gguf_tokenizer(p)
        raise UsageError(f"{p}: not a tokenizer file (expected a SentencePiece or tiktoken .model, a .tiktoken, "
                         f"tokenizer.json or .gguf)")
    # HF directories of Llama-2/Mistral hold both files; tokenizer.json also brings the chat template.
    if (p / "tokenizer.json").is_file():
        return HFTokenizer(p)
    if (p / "tokenizer.model").is_file():
        return load_tokenizer(p / "tokenizer.model")  # SentencePiece or tiktoken, by its content
    bpe = sorted(p.glob("*.tiktoken"))
    if len(bpe) > 1:
        raise UsageError(f"{p}: several *.tiktoken files ({', '.join(f.name for f in bpe)}); name one")
    if bpe:
        return TiktokenTokenizer(bpe[0])
    raise MissingPathError(f"{p}: directory holds neither tokenizer.json nor tokenizer.model nor a *.tiktoken")


def _gguf_tokenizer(path: Path) -> HFTokenizer:
    """The GGUF's tokenizer as HF files in a temp dir that lives as long as the tokenizer does,
    so `save_tokenizer` can copy them into a checkpoint."""
    tmp = tempfile.TemporaryDirectory(prefix="gguf-tokenizer-")
    write_gguf_tokenizer(str(path), tmp.name)
    tok = HFTokenizer(tmp.name)
    tok._gguf_files = tmp  # removed when the tokenizer is garbage-collected
    return tok


def _copy_atomic(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tokenizer(tok: Tokenizer, dst_dir: str | os.PathLike) -> list[Path]:
    """Copy `tok`'s files into `dst_dir` (e.g. a checkpoint) so `load_tokenizer(dst_dir)` gives it back."""
    dst = Path(dst_dir)
    if isinstance(tok, (SentencePieceTokenizer, TiktokenTokenizer)) and (dst / "tokenizer.json").is_file():
        # load_tokenizer prefers tokenizer.json, so the copied model would be silently ignored.
        raise UsageError(f"{dst}: already holds a tokenizer.json; refusing to add a different "
                         f"{next(iter(tok.files))}")
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for name, src in tok.files.items():
        target = dst / name
        if not (target.exists() and target.samefile(src)):
            _copy_atomic(src, target)
        written.append(target)
    return written


def train_sentencepiece(texts: list[str], model_prefix: str, vocab_size: int) -> str:
    """Train a byte-fallback BPE SentencePiece model on `texts`; returns `{model_prefix}.model`.

    Digits are split one per piece so numbers are spelled digit by digit, which is what lets
    a model learn arithmetic. Special ids: unk 0, bos 1, eos 2, pad 3. Single-threaded and
    written without the prefix inside, so the same texts give a byte-identical file. The
    vocabulary may come out smaller than `vocab_size` when the texts are too few to fill it."""
    if not texts:
        raise ValueError("train_sentencepiece: no texts to train on")
    chars = {"▁" if c == " " else c for c in "".join(texts)}
    need = _N_BYTE_PIECES + 4 + len(chars)
    if vocab_size < need:
        raise ValueError(f"train_sentencepiece: vocab_size {vocab_size} too small, need at least {need} "
                         f"(256 byte pieces + 4 specials + {len(chars)} distinct characters)")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, hard_vocab_limit=False,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama: text round-trips
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    path = Path(f"{model_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(proto.getvalue())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    get_logger(__name__).info(f"trained SentencePiece model ({vocab_size} pieces max, {len(texts)} texts) -> {path}")
    return str(path)
