"""Runtime checkpoint I/O: load a model shard under tensor parallelism, and THE writer.

A checkpoint dir is `consolidated.NN.pth` (one per TP rank) + `params.json` + tokenizer files
(+ `state.RR.pth` per rank for training state). Every dir is written into `dst.tmp` and swapped
in when complete (`commit_dir` for one process, `save_model` for every rank of a run), and every
file through `atomic_torch_save`, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import filecmp
import glob
import json
import os
import shutil
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file

from .. import parallel
from ..models import ModelArgs, build_model, read_args, write_params
from ..models.args import ConfigError, args_from_params, family_of
from ..records import write_json_atomic
from ..tokenizers import load_tokenizer, save_tokenizer
from .tables import CheckpointError, check_shapes, is_meta_embedding_shard, split_tensor


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise CheckpointError(f"{path}: cannot read checkpoint: {e}") from None


def shard_files(ckpt_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))


def copy_tokenizer(tokenizer_path: Optional[str], dst: str) -> None:
    if tokenizer_path:
        save_tokenizer(load_tokenizer(tokenizer_path), dst)


def find_tokenizer(src: str) -> Optional[str]:
    """The tokenizer that travels with a source: a GGUF's own, in its dir, or beside a single file."""
    if src.endswith(".gguf") and os.path.isfile(src):
        return src
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name) if name.endswith(".model") else folder
    tiktoken = sorted(glob.glob(os.path.join(folder, "*.tiktoken")))  # Qwen-1's qwen.tiktoken
    return tiktoken[0] if len(tiktoken) == 1 else None


def _same_dir(a: str, b: str) -> bool:
    names = sorted(os.listdir(a))
    if names != sorted(os.listdir(b)):
        return False
    return all(os.path.isdir(os.path.join(a, n)) or filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False)
               for n in names)


def atomic_torch_save(obj: Any, path: str) -> None:
    """`torch.save` to `path.tmp`, then rename: a reader sees the old file or the whole new one,
    never a torn one, even when the writer is killed mid-write (the stale `.tmp` is simply
    overwritten next time)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    os.replace(tmp, path)


def _begin_dir(dst: str) -> str:
    """An empty `dst.tmp` to write a checkpoint into; what a killed writer left is dropped."""
    tmp, old = dst + ".tmp", dst + ".old"
    if not os.path.exists(dst) and os.path.isdir(old):
        os.replace(old, dst)  # killed between the two renames of _swap_in: the old one is still whole
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _swap_in(tmp: str, dst: str) -> None:
    """Publish the complete `tmp` as `dst`; a previous `dst` stays whole until the last moment."""
    old = dst + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(dst) and not os.listdir(dst):
        os.rmdir(dst)
    if os.path.exists(dst):
        os.replace(dst, old)  # a directory cannot be renamed over a non-empty one
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def commit_dir(write: Callable[[str], None], dst: str, overwrite: bool = False) -> None:
    """One process writes a whole directory via `write(tmp)`, then it replaces `dst`, so a
    crash never leaves a half-written checkpoint and never touches the last good one."""
    tmp = _begin_dir(dst)
    try:
        write(tmp)
        if os.path.exists(dst) and os.listdir(dst):
            if _same_dir(tmp, dst):
                return
            if not overwrite:
                raise CheckpointError(f"--save_path {dst} already holds a different checkpoint (pass --overwrite)")
        _swap_in(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dir_args(folder: str, model_type: Optional[str], sd: dict, n: int = 1) -> ModelArgs:
    """The config of the checkpoint in `folder`: its params.json, else config.json / the
    `model_type` preset. Meta's params.json says vocab_size -1: the size is then read off
    tok_embeddings.weight in `sd`, one of the `n` shards (Meta's split the embedding on the
    model dim, so each holds every vocabulary row; a vocabulary-split one holds 1/n of them)."""
    params = os.path.join(folder, "params.json")
    if not os.path.exists(params):
        return read_args(folder, model_type)
    try:
        with open(params) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{params}: cannot read config: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{params}: expected a JSON object, got {type(raw).__name__}")
    emb = sd.get("tok_embeddings.weight")
    if raw.get("vocab_size", -1) <= 0 and emb is not None and emb.dim() == 2:
        split_on_vocab = n > 1 and emb.shape[1] == raw.get("dim")
        raw = {**raw, "vocab_size": emb.shape[0] * (n if split_on_vocab else 1)}
    expected = family_of(model_type) if model_type else None
    args = args_from_params(raw, params, family=expected)
    if expected and args.family != expected:
        raise ConfigError(f"{params} describes a {args.family} model but --model_type {model_type} is {expected}")
    return args


def ckpt_args(ckpt_dir: str, model_type: Optional[str] = None) -> ModelArgs:
    """The config of a shard dir without building its model: `dir_args` on the first shard
    (memory-mapped, so a Meta params.json with vocab_size -1 costs one embedding shape)."""
    files = shard_files(ckpt_dir)
    if not files:
        return read_args(ckpt_dir, model_type)
    return dir_args(ckpt_dir, model_type, read_state_dict(files[0]), len(files))


def load_model(ckpt_dir: str, model_type: Optional[str] = None, device=None, dtype: torch.dtype = torch.float32,
               role: Optional[str] = None):
    """Build the model of `ckpt_dir` and load this TP rank's shard.

    Meta's own Llama-1/2 shards load directly at their TP (see `_vocab_split_embedding`).
    `role` "solver" / "verifier" refuses the other kind with a clear error.
    """
    files = shard_files(ckpt_dir)
    if not files:
        raise CheckpointError(f"--ckpt_dir {ckpt_dir}: no consolidated.NN.pth files "
                              f"(run checkpoint_split.py first)")
    tp, rank = parallel.tp_size(), parallel.tp_rank()
    if len(files) != tp:
        raise CheckpointError(f"--ckpt_dir {ckpt_dir} has {len(files)} shards but tensor parallel size is {tp}")
    sd = read_state_dict(files[rank])
    args = dir_args(ckpt_dir, model_type, sd, tp)
    _check_role(args, role, ckpt_dir)
    emb = sd.get("tok_embeddings.weight")
    if emb is not None and emb.dim() == 2 and is_meta_embedding_shard(emb, args, tp):
        sd = _vocab_split_embedding(sd, files, args, rank)
    model = build_model(args, device or parallel.device(), dtype)
    check_shapes(sd, {k: tuple(v.shape) for k, v in model.state_dict().items()}, files[rank])
    model.load_state_dict(sd, strict=True, assign=False)
    return model


def _vocab_split_embedding(sd: dict, files: list[str], args: ModelArgs, rank: int) -> dict:
    """`sd` with Meta's model-dim embedding shard replaced by this rank's vocabulary slice.

    Meta's shards split tok_embeddings on the model dim (fairscale ParallelEmbedding); ours split
    it on the vocabulary, which tying needs. Rather than a second embedding layout in the model,
    each rank reads the embedding columns of every shard (memory-mapped, so only those bytes:
    vocab x dim values, small beside the rank's share of the layers) and keeps its vocabulary
    rows, padded exactly as a split pads them. No process group is involved."""
    key = "tok_embeddings.weight"
    cols = []
    for i, path in enumerate(files):
        part = sd[key] if i == rank else read_state_dict(path).get(key)
        if part is None or part.dim() != 2 or part.shape[0] != sd[key].shape[0]:
            shape = None if part is None else tuple(part.shape)
            raise CheckpointError(f"{path}: {key} of shape {shape} does not match {files[rank]}'s "
                                  f"{tuple(sd[key].shape)} (Meta layout: every shard holds all vocabulary rows)")
        cols.append(part)
    out = dict(sd)
    out[key] = split_tensor(key, torch.cat(cols, dim=1), len(files))[rank].clone()
    if args.tie_word_embeddings:
        out["output.weight"] = out[key]
    return out


def _check_role(args: ModelArgs, role: Optional[str], ckpt_dir: str) -> None:
    if role == "solver" and args.reward_head:
        raise CheckpointError(f"{ckpt_dir} is a verifier checkpoint (params.json has reward_head); "
                              f"a solver checkpoint is expected here")
    if role == "verifier" and not args.reward_head:
        raise CheckpointError(f"{ckpt_dir} is a solver checkpoint (no reward_head in params.json); "
                              f"a verifier checkpoint is expected here")


def save_model(model: Optional[torch.nn.Module], dst: str, tokenizer_path: Optional[str] = None,
               state: Optional[dict] = None, model_state: Optional[Callable[[], dict]] = None,
               writer_replica: Optional[int] = None, prompt: Optional[dict] = None) -> None:
    """Write the checkpoint dir `dst` atomically; every rank calls it.

    The TP ranks of one DP replica write the shards: `writer_replica` (None: every replica
    holds the model and replica 0 writes; give it when only some replicas hold the model,
    the others may pass `model` None). `model_state()` replaces `model.state_dict()` as the
    weights written (e.g. LoRA merged in); it is called on the writing replica only. `state`, if
    given, goes to `state.RR.pth` of every rank; `prompt` (a recorded prompt format) to
    prompt.json. Files land in `dst.tmp`, which the writer's TP rank 0 renames to `dst` once
    all ranks are done, so a crash leaves `dst` as it was."""
    writer = 0 if writer_replica is None else writer_replica
    if not 0 <= writer < parallel.dp_size():
        raise ValueError(f"save_model: writer_replica {writer} is not a replica (DP size {parallel.dp_size()})")
    writes = parallel.dp_rank() == writer
    lead = writes and parallel.tp_rank() == 0
    if writes and model is None:
        raise ValueError(f"save_model {dst}: replica {writer} writes the shards but holds no model")
    tmp = dst + ".tmp"
    if lead:
        _begin_dir(dst)
    parallel.barrier()  # the temp dir exists before anyone writes into it
    if writes:
        weights = model.state_dict() if model_state is None else model_state()
        sd = {k: v.detach().to("cpu").clone() for k, v in weights.items()}
        atomic_torch_save(sd, os.path.join(tmp, f"consolidated.{parallel.tp_rank():02d}.pth"))
    if state is not None:
        atomic_torch_save(state, os.path.join(tmp, f"state.{parallel.rank():02d}.pth"))
    parallel.barrier()  # every rank's files are in before the rename publishes them
    if lead:
        write_params(model.args, tmp)
        copy_tokenizer(tokenizer_path, tmp)
        if prompt is not None:  # the prompt format trained with: later stages' default
            write_json_atomic(prompt, os.path.join(tmp, "prompt.json"))
        _swap_in(tmp, dst)
    parallel.barrier()  # nobody reads or re-saves `dst` before it is in place
