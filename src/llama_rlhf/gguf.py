"""GGUF import: llama.cpp's one-file checkpoints (config, weights and tokenizer in one file).

    sd, args = read_gguf("model.gguf")        # Meta keys, float32, ModelArgs from the metadata
    write_gguf_tokenizer("model.gguf", dst)   # tokenizer.json, tokenizer_config.json, generation_config.json

One table (`GGUF_KEYS`) maps llama.cpp's tensor names to Meta's. Every type the `gguf` package can
dequantize (F32, F16, BF16, Q4_0 ... Q8_0, the K- and I-quants) is read; the checkpoint is float32.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize

from .errors import UsageError
from .log import get_logger
from .models import ModelArgs, parameter_count
from .models.args import ConfigError


class GGUFError(UsageError):
    """A GGUF that cannot be imported; one line naming the file. `checkpoint.load_source`
    re-raises it as its CheckpointError (this module sits below checkpoint in the layers)."""


# (GGUF tensor name, Meta key); {i} is the layer. No q/k permutation: llama.cpp's converter
# re-interleaves HF's q/k rows for its rope, i.e. a GGUF holds them in Meta's order already
# (transformers permutes them back to HF's on load; tests/test_gguf.py checks logits against it).
GGUF_KEYS: list[tuple[str, str]] = [
    ("token_embd.weight", "tok_embeddings.weight"),
    ("output_norm.weight", "norm.weight"),
    ("output.weight", "output.weight"),
    ("blk.{i}.attn_norm.weight", "layers.{i}.attention_norm.weight"),
    ("blk.{i}.attn_q.weight", "layers.{i}.attention.wq.weight"),
    ("blk.{i}.attn_k.weight", "layers.{i}.attention.wk.weight"),
    ("blk.{i}.attn_v.weight", "layers.{i}.attention.wv.weight"),
    ("blk.{i}.attn_output.weight", "layers.{i}.attention.wo.weight"),
    ("blk.{i}.ffn_norm.weight", "layers.{i}.ffn_norm.weight"),
    ("blk.{i}.ffn_gate.weight", "layers.{i}.feed_forward.w1.weight"),
    ("blk.{i}.ffn_down.weight", "layers.{i}.feed_forward.w2.weight"),
    ("blk.{i}.ffn_up.weight", "layers.{i}.feed_forward.w3.weight"),
]
_GGUF_RE = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), m) for g, m in GGUF_KEYS]

# llama.cpp spells a Llama "llama" (Mistral and Llama-3 too); its MoE variant adds expert tensors.
_ARCH = "llama"


# Metadata of the files read in this process, by (path, size, mtime): the reader parses every
# vocabulary entry (seconds for a 50k-128k vocab), and the tokenizer needs the same file next.
_METADATA: dict[tuple[str, int, int], dict[str, Any]] = {}


def _file_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def _open(path: str) -> GGUFReader:
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError, KeyError) as e:
        raise GGUFError(f"{path}: cannot read GGUF: {e}") from None
    # Arrays (tokens, merges, scores) are kept as their lengths: nothing here needs their items.
    _METADATA[_file_key(path)] = {k: len(f.data) if f.types[:1] == [GGUFValueType.ARRAY] else f.contents()
                                  for k, f in reader.fields.items()}
    return reader


def gguf_metadata(path: str) -> dict[str, Any]:
    """The file's metadata, arrays as their lengths."""
    key = _file_key(path)
    if key not in _METADATA:
        _open(path)
    return _METADATA[key]


def gguf_args(reader: GGUFReader, path: str) -> ModelArgs:
    """ModelArgs from the `llama.*` metadata; what this library cannot run is refused here."""
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    if arch != _ARCH:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported (only {_ARCH!r})")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{_ARCH}.{key}", default)
        if value is None:
            raise GGUFError(f"{path}: GGUF metadata has no {_ARCH}.{key}")
        return value

    names = {t.name for t in reader.tensors}
    if get("expert_count", 0):
        raise GGUFError(f"{path}: GGUF with experts (llama.expert_count) is not supported")
    if get("rope.scaling.type", "none") != "none" or "rope_freqs.weight" in names:
        raise GGUFError(f"{path}: GGUF rope scaling is not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = int(embd.shape[1]) if embd is not None else int(meta.get("tokenizer.ggml.tokens", 0))
    n_heads, dim = int(get("attention.head_count")), int(get("embedding_length"))
    head_dim = int(get("rope.dimension_count", dim // max(n_heads, 1)))
    if head_dim != dim // max(n_heads, 1):
        raise GGUFError(f"{path}: rope over {head_dim} of {dim // n_heads} head dims is not supported")
    try:
        return ModelArgs(
            family="llama", dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)), vocab_size=vocab,
            hidden_dim=int(get("feed_forward_length")), norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)), max_seq_len=int(get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in names)
    except (ConfigError, TypeError) as e:  # e.g. a per-layer list where one number is expected
        raise GGUFError(f"{path}: GGUF metadata: {e}") from None


def _meta_key(name: str, path: str) -> str:
    for regex, meta in _GGUF_RE:
        m = regex.match(name)
        if m:
            return meta.format(**m.groupdict())
    raise GGUFError(f"{path}: GGUF tensor {name!r} has no Meta equivalent (not in GGUF_KEYS)")


def _dequantized(t: ReaderTensor, path: str) -> torch.Tensor:
    try:
        values = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"{path}: tensor {t.name} is {t.tensor_type.name}, a type the gguf package "
                        f"cannot dequantize") from None
    # F32 comes back as a read-only view of the memory-mapped file: copy it out, the rest is fresh.
    values = np.array(values, dtype=np.float32, copy=not values.flags.writeable)
    return torch.from_numpy(values.reshape([int(d) for d in reversed(t.shape)]))  # GGUF lists dims fastest-first


def read_gguf(path: str) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """Full Meta-keyed float32 state dict and config of a llama GGUF. A tied output (no
    `output.weight` in the file) is the embedding tensor itself: one copy, counted once."""
    reader = _open(path)
    args = gguf_args(reader, path)
    sd = {_meta_key(t.name, path): _dequantized(t, path) for t in reader.tensors}
    if args.tie_word_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    types = Counter(t.tensor_type.name for t in reader.tensors)
    get_logger(__name__).info(f"read {path}: GGUF llama, {len(reader.tensors)} tensors "
                              f"({', '.join(f'{n} {k}' for k, n in types.most_common())}), "
                              f"{parameter_count(sd) / 1e6:.1f}M params, dequantized to float32")
    return sd, args


def _eos_ids(meta: dict[str, Any]) -> list[int]:
    """eos, then end-of-turn / end-of-message where the file names them (Llama-3's <|eot_id|>)."""
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def write_gguf_tokenizer(path: str, dst: str) -> None:
    """The tokenizer of a GGUF's metadata as HF files in `dst`: tokenizer.json,
    tokenizer_config.json (chat template, bos / eos, add_bos_token as the file says) and
    generation_config.json (eos ids)."""
    from transformers import AutoTokenizer  # slow import, paid only when a GGUF is converted

    meta = gguf_metadata(path)
    if not meta.get("tokenizer.ggml.tokens"):
        raise GGUFError(f"{path}: GGUF has no tokenizer (no tokenizer.ggml.tokens)")
    folder, name = os.path.split(os.path.abspath(path))
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)  # never a hub
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GGUFError(f"{path}: cannot build a tokenizer from the GGUF metadata ({first})") from None
    tok.model_max_length = int(meta.get(f"{_ARCH}.context_length", tok.model_max_length))
    os.makedirs(dst, exist_ok=True)
    tok.save_pretrained(dst, save_jinja_files=False)  # the chat template goes into tokenizer_config.json
    _patch_json(os.path.join(dst, "tokenizer_config.json"), add_bos_token=_adds_bos(tok),
                drop=("is_local", "local_files_only"))
    generation = {"bos_token_id": tok.bos_token_id, "eos_token_id": _eos_ids(meta) or tok.eos_token_id,
                  "pad_token_id": tok.pad_token_id}
    with open(os.path.join(dst, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)


def _adds_bos(tok: Any) -> bool:
    """What the built tokenizer does (transformers applies tokenizer.ggml.add_bos_token and
    llama.cpp's default for old files), so the config states what encoding will do."""
    return tok.bos_token_id is not None and tok.encode("a")[:1] == [tok.bos_token_id]


def _patch_json(file: str, drop: tuple[str, ...] = (), **values: Any) -> None:
    with open(file) as f:
        data = json.load(f)
    for key in drop:
        data.pop(key, None)
    data.update(values)
    with open(file, "w") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
