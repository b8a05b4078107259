"""Format conversion: any source (Meta .pth, HF .bin / .safetensors / dir, consolidated dir, GGUF)
-> a Meta-keyed state dict + config, and out again as TP shards or an HF directory;
`checkpoint_split.py` (`SplitConfig`, `split`).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from safetensors.torch import save_file

from .. import gguf
from ..config import flag
from ..log import get_logger
from ..models import ModelArgs, parameter_count, read_args, write_params
from ..models.args import ConfigError, family_of, hf_config_from_args
from ..tokenizers import Tokenizer, load_tokenizer, save_tokenizer
from .io import atomic_torch_save, commit_dir, copy_tokenizer, dir_args, find_tokenizer, read_state_dict, shard_files
from .tables import (CheckpointError, check_shapes, drop_vocab_padding, expected_shapes, hf_to_meta, is_hf_keys,
                     merge_state_dicts, meta_to_hf, split_state_dict)


def _hf_dir_state(src: str) -> dict[str, torch.Tensor]:
    index = sorted(glob.glob(os.path.join(src, "*.safetensors.index.json")))
    if index:
        with open(index[0]) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(src, "*.safetensors")))
        files = files or sorted(os.path.basename(p) for p in glob.glob(os.path.join(src, "pytorch_model*.bin")))
    if not files:
        raise CheckpointError(f"{src}: HF directory has no *.safetensors or pytorch_model*.bin")
    sd: dict = {}
    for name in files:
        sd.update(read_state_dict(os.path.join(src, name)))
    return sd


def load_source(src: str, model_type: Optional[str] = None) -> tuple[dict, ModelArgs]:
    """Full (unsharded, Meta-keyed) state dict and config from any supported source."""
    if not os.path.exists(src):
        raise CheckpointError(f"--ckpt_file {src}: no such file or directory")
    if os.path.isdir(src) and shard_files(src):
        shards = [read_state_dict(p) for p in shard_files(src)]
        args = dir_args(src, model_type, shards[0], len(shards))
        sd = merge_state_dicts(shards, args)
    elif os.path.isdir(src):
        sd = _hf_dir_state(src)
        args = read_args(src, model_type)
    elif src.endswith(".gguf"):  # config, weights and tokenizer all live in the one file
        try:
            sd, args = gguf.read_gguf(src)
        except gguf.GGUFError as e:
            raise CheckpointError(str(e)) from None
        if model_type and family_of(model_type) != args.family:
            raise ConfigError(f"{src} is a {args.family} GGUF but --model_type {model_type} is {family_of(model_type)}")
    else:
        sd = read_state_dict(src)
        args = dir_args(os.path.dirname(os.path.abspath(src)), model_type, sd)
    if is_hf_keys(sd):
        sd = hf_to_meta(sd, args)
    if args.tie_word_embeddings:
        sd.setdefault("output.weight", sd["tok_embeddings.weight"])
    if "reward_head.weight" in sd and not args.reward_head:
        args.reward_head = sd["reward_head.weight"].shape[0]
    check_shapes(sd, expected_shapes(args), src)
    return sd, args


def save_meta(sd: dict, args: ModelArgs, dst: str, n: int, tokenizer_path: Optional[str] = None,
              overwrite: bool = False) -> None:
    """Full state dict -> `n` consolidated shards + params.json + tokenizer, atomically."""
    args.check_tp(n)
    shards = split_state_dict(sd, n)

    def write(tmp: str) -> None:
        for i, shard in enumerate(shards):
            atomic_torch_save(shard, os.path.join(tmp, f"consolidated.{i:02d}.pth"))
        write_params(args, tmp)
        copy_tokenizer(tokenizer_path, tmp)

    commit_dir(write, dst, overwrite)


def special_token_ids(tok: Tokenizer) -> dict[str, Optional[int]]:
    """config.json's bos / eos / pad ids as the tokenizer defines them (Llama-3 and Qwen do not
    use Llama-2's 1 / 2; Qwen has no BOS: null). pad only when the tokenizer has a real one."""
    ids: dict[str, Optional[int]] = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    if tok.real_pad_id is not None:  # `pad_id` falls back to eos, which is no pad token of the model
        ids["pad_token_id"] = tok.real_pad_id
    return ids


def save_hf(sd: dict, args: ModelArgs, dst: str, tokenizer_path: Optional[str] = None,
            overwrite: bool = False) -> None:
    """Full state dict -> an HF directory that `transformers` loads directly."""
    hf = {k: v.contiguous() for k, v in meta_to_hf(drop_vocab_padding(sd, args), args).items()}
    if args.tie_word_embeddings:  # HF keeps one copy of a tied weight (safetensors refuses shared storage)
        hf.pop("lm_head.weight", None)
    tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
    config = hf_config_from_args(args)
    config["torch_dtype"] = str(hf["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    if tok is not None:
        config.update(special_token_ids(tok))

    def write(tmp: str) -> None:
        save_file(hf, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if tok is not None:
            save_tokenizer(tok, tmp)

    commit_dir(write, dst, overwrite)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors in `dtype`; a tensor shared by two keys (tied embeddings) stays shared."""
    done: dict[int, torch.Tensor] = {}
    for t in sd.values():
        if id(t) not in done:
            done[id(t)] = t.to(dtype) if t.is_floating_point() else t
    return {k: done[id(t)] for k, t in sd.items()}


@dataclass
class SplitConfig:
    """`checkpoint_split.py`'s flags."""
    ckpt_file: str = flag(path="any")  # a state dict file, an HF dir, a consolidated dir or a .gguf
    save_path: str = flag()
    num_shards: Optional[int] = None  # default 1
    n: Optional[int] = None  # the old name of --num_shards
    model_type: Optional[str] = None
    to: str = flag("meta", choices=("meta", "hf"))
    tokenizer_file: Optional[str] = flag(None, path="any")  # default: the one beside --ckpt_file
    dtype: Optional[str] = flag(None, choices=tuple(DTYPES))  # default: the source's (a 7B in fp32 is 28 GB)
    overwrite: bool = False


def split(cfg: SplitConfig) -> None:
    split_command(**asdict(cfg))


def split_command(ckpt_file: str, save_path: str, n: Optional[int] = None, model_type: Optional[str] = None,
                  to: str = "meta", tokenizer_file: Optional[str] = None, overwrite: bool = False,
                  num_shards: Optional[int] = None, dtype: Optional[str] = None) -> None:
    """checkpoint_split.py: any source -> `num_shards` Meta shards (`n` is its old name), or ->
    an HF directory, in the source's dtype or `dtype`."""
    if int(os.environ.get("RANK", 0)) != 0:
        return  # torchrun may start several processes; one does the work (no process group needed)
    if to not in ("meta", "hf"):
        raise CheckpointError(f"--to must be 'meta' or 'hf', got {to!r}")
    shards = _shard_count(num_shards, n)
    if model_type:
        family_of(model_type)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    sd, args = load_source(ckpt_file, model_type)
    if dtype is not None:
        sd = cast_state_dict(sd, DTYPES[dtype])
    tok = tokenizer_file or find_tokenizer(ckpt_file)
    if to == "hf":
        save_hf(sd, args, save_path, tok, overwrite)
    else:
        save_meta(sd, args, save_path, shards, tok, overwrite)
    get_logger().info(f"wrote {save_path} ({'HF' if to == 'hf' else f'{shards} shards'}, {args.family}, "
                      f"{parameter_count(sd) / 1e6:.2f}M params)")


def _shard_count(num_shards: Optional[int], n: Optional[int]) -> int:
    """--num_shards, or its alias --n (torchrun >= 2.13 takes `--n` for an ambiguous option of its own)."""
    if num_shards is not None and n is not None and num_shards != n:
        raise CheckpointError(f"--num_shards {num_shards} and --n {n} disagree (--n is an alias: give one)")
    count = num_shards if num_shards is not None else 1 if n is None else n
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise CheckpointError(f"--num_shards must be an integer >= 1, got {count!r}")
    return count
