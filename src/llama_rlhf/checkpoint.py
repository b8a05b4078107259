"""Checkpoints: split / merge / reshard, HF import and export, and loading a
model shard under tensor parallelism.

Two tables drive everything: `SHARD_DIMS` (which dimension each parameter is
split on across TP ranks) and `HF_KEYS` (Meta key <-> HF key). A checkpoint dir
is `consolidated.NN.pth` (one per TP rank) + `params.json` + tokenizer files.
"""
from __future__ import annotations

import filecmp
import glob
import json
import os
import re
import shutil
from typing import Any, Callable, Optional

import torch

from . import parallel
from .errors import UsageError
from . import gguf  # .gguf sources; gguf.py reads this module's CheckpointError at raise time
from .log import get_logger
from .models import ModelArgs, build_model, read_args, write_params
from .models.args import ConfigError, args_from_params, family_of, hf_config_from_args
from .tokenizers import Tokenizer, load_tokenizer, save_tokenizer

# ----------------------------------------------------------------------------- the two tables

# (key regex, dim): 0 = split rows (column-parallel / vocab-parallel), 1 = split
# columns (row-parallel), None = replicated on every rank.
SHARD_DIMS: list[tuple[str, Optional[int]]] = [
    (r"tok_embeddings\.weight", 0),
    (r"output\.weight", 0),
    (r"attention\.w[qkv]\.(weight|bias)", 0),
    (r"attention\.wo\.weight", 1),
    (r"w[13]\.weight", 0),  # dense FFN and every Mixtral expert
    (r"w2\.weight", 1),
    (r"feed_forward\.gate\.weight", None),  # Mixtral router
    (r"(attention_norm|ffn_norm|norm)\.weight", None),
    (r"reward_head\.(weight|bias)", None),
]

# (Meta key, HF key, rope permutation: None | "q" | "k"); {i} layer, {e} expert.
HF_KEYS: list[tuple[str, str, Optional[str]]] = [
    ("tok_embeddings.weight", "model.embed_tokens.weight", None),
    ("norm.weight", "model.norm.weight", None),
    ("output.weight", "lm_head.weight", None),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", "q"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", "k"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", None),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", None),
    ("layers.{i}.attention.wq.bias", "model.layers.{i}.self_attn.q_proj.bias", "q"),
    ("layers.{i}.attention.wk.bias", "model.layers.{i}.self_attn.k_proj.bias", "k"),
    ("layers.{i}.attention.wv.bias", "model.layers.{i}.self_attn.v_proj.bias", None),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", None),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", None),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", None),
    ("layers.{i}.feed_forward.gate.weight", "model.layers.{i}.block_sparse_moe.gate.weight", None),
    ("layers.{i}.feed_forward.experts.{e}.w1.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", None),
    ("layers.{i}.feed_forward.experts.{e}.w2.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", None),
    ("layers.{i}.feed_forward.experts.{e}.w3.weight", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", None),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", None),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", None),
    ("reward_head.weight", "score.weight", None),
    ("reward_head.bias", "score.bias", None),
]


class CheckpointError(UsageError):
    """A checkpoint that cannot be read, or that disagrees with its config (bad input: one line)."""


def shard_dim(key: str) -> Optional[int]:
    for pattern, dim in SHARD_DIMS:
        if re.search(r"(^|\.)" + pattern + "$", key):
            return dim
    raise CheckpointError(f"no shard rule for parameter {key!r}")


# ----------------------------------------------------------------------------- split / merge

def split_state_dict(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict] = [{} for _ in range(n)]
    for key, t in sd.items():
        dim = shard_dim(key)
        if dim is not None and t.shape[dim] % n:
            raise CheckpointError(f"{key} of shape {tuple(t.shape)} cannot be split into {n} on dim {dim}")
        parts = [t] * n if dim is None else torch.chunk(t, n, dim=dim)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def merge_state_dicts(shards: list[dict[str, torch.Tensor]], args: ModelArgs) -> dict[str, torch.Tensor]:
    full = {}
    for key in shards[0]:
        dim = shard_dim(key)
        if key == "tok_embeddings.weight" and len(shards) > 1 and shards[0][key].shape[1] != args.dim:
            dim = 1  # Llama-1/2 Meta shards split the embedding on dim (fairscale ParallelEmbedding)
        full[key] = shards[0][key].clone() if dim is None else torch.cat([s[key] for s in shards], dim=dim)
    return full


# ----------------------------------------------------------------------------- HF <-> Meta keys

def _key_regex(template: str) -> re.Pattern:
    pat = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile("^" + pat + "$")


_META_RE = [(_key_regex(m), h, p) for m, h, p in HF_KEYS]
_HF_RE = [(_key_regex(h), m, p) for m, h, p in HF_KEYS]


def _permute(t: torch.Tensor, heads: int, to_meta: bool) -> torch.Tensor:
    """HF stores each head's rotary pairs as [all reals | all imags]; Meta interleaves them."""
    rest = t.shape[1:]
    if to_meta:
        return t.reshape(heads, 2, -1, *rest).transpose(1, 2).reshape(t.shape)
    return t.reshape(heads, -1, 2, *rest).transpose(1, 2).reshape(t.shape)


def _rename(sd: dict, table: list, args: ModelArgs, to_meta: bool) -> dict:
    out = {}
    for key, t in sd.items():
        for regex, target, perm in table:
            m = regex.match(key)
            if m:
                new = target.format(**m.groupdict())
                if perm:
                    t = _permute(t, args.n_heads if perm == "q" else args.n_kv_heads, to_meta)
                out[new] = t
                break
        else:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise CheckpointError(f"unknown parameter {key!r} (not in the HF key table)")
    return out


def hf_to_meta(sd: dict, args: ModelArgs) -> dict:
    out = _rename(sd, _HF_RE, args, to_meta=True)
    if args.tie_word_embeddings:
        out.setdefault("output.weight", out["tok_embeddings.weight"])
    return out


def meta_to_hf(sd: dict, args: ModelArgs) -> dict:
    out = _rename(sd, _META_RE, args, to_meta=False)
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def is_hf_keys(sd: dict) -> bool:
    return any(k.startswith(("model.", "lm_head.")) for k in sd)


# ----------------------------------------------------------------------------- shapes

def _model_shapes(args: ModelArgs) -> dict[str, tuple]:
    """Parameter shapes of the model as built under the current TP size."""
    from .models.transformer import Transformer
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}


def expected_shapes(args: ModelArgs, n: int = 1) -> dict[str, tuple]:
    """Per-shard parameter shapes for `n` TP shards, from the config alone."""
    if parallel.tp_size() != 1:
        raise CheckpointError("expected_shapes needs the full model: call it outside a TP>1 world")
    out = {}
    for key, shape in _model_shapes(args).items():
        dim = shard_dim(key)
        out[key] = shape if dim is None else tuple(s // n if d == dim else s for d, s in enumerate(shape))
    return out


def check_shapes(sd: dict, expected: dict, source: str) -> None:
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{source}: keys disagree with the config: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(sd[key].shape)} but the config "
                                  f"(params.json / config.json) implies {shape}")


# ----------------------------------------------------------------------------- reading sources

def _load_file(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise CheckpointError(f"{path}: cannot read checkpoint: {e}") from None


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
        sd.update(_load_file(os.path.join(src, name)))
    return sd


def shard_files(ckpt_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))


def _args_for(folder: str, model_type: Optional[str], sd: dict) -> ModelArgs:
    """Config of a source: params.json / config.json beside it, else the --model_type preset."""
    params = os.path.join(folder, "params.json")
    if os.path.exists(params):
        with open(params) as f:
            raw = json.load(f)
        if raw.get("vocab_size", -1) <= 0 and "tok_embeddings.weight" in sd:
            raw["vocab_size"] = sd["tok_embeddings.weight"].shape[0]  # Meta writes -1
        expected = family_of(model_type) if model_type else None
        args = args_from_params(raw, params, family=expected)
        if expected and args.family != expected:
            raise ConfigError(f"{params} describes a {args.family} model but --model_type {model_type} is {expected}")
        return args
    return read_args(folder, model_type)


def load_source(src: str, model_type: Optional[str] = None) -> tuple[dict, ModelArgs]:
    """Full (unsharded, Meta-keyed) state dict and config from any supported source."""
    if not os.path.exists(src):
        raise CheckpointError(f"--ckpt_file {src}: no such file or directory")
    if os.path.isdir(src) and shard_files(src):
        shards = [_load_file(p) for p in shard_files(src)]
        args = _args_for(src, model_type, shards[0])
        sd = merge_state_dicts(shards, args)
    elif os.path.isdir(src):
        sd = _hf_dir_state(src)
        args = read_args(src, model_type)
    elif src.endswith(".gguf"):
        sd, args = gguf.read_gguf(src)  # config, weights and tokenizer all live in the one file
        if model_type and family_of(model_type) != args.family:
            raise ConfigError(f"{src} is a {args.family} GGUF but --model_type {model_type} is {family_of(model_type)}")
    else:
        sd = _load_file(src)
        args = _args_for(os.path.dirname(os.path.abspath(src)), model_type, sd)
    if is_hf_keys(sd):
        sd = hf_to_meta(sd, args)
    if args.tie_word_embeddings:
        sd.setdefault("output.weight", sd["tok_embeddings.weight"])
    if "reward_head.weight" in sd and not args.reward_head:
        args.reward_head = sd["reward_head.weight"].shape[0]
    check_shapes(sd, expected_shapes(args), src)
    return sd, args


# ----------------------------------------------------------------------------- writing

def _copy_tokenizer(tokenizer_src: Optional[str], dst: str) -> None:
    if tokenizer_src:
        save_tokenizer(load_tokenizer(tokenizer_src), dst)


def find_tokenizer(src: str) -> Optional[str]:
    """The tokenizer that travels with a source: in its dir, or beside a single file."""
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name) if name.endswith(".model") else folder
    return None


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


def save_meta(sd: dict, args: ModelArgs, dst: str, n: int, tokenizer_src: Optional[str] = None,
              overwrite: bool = False) -> None:
    """Full state dict -> `n` consolidated shards + params.json + tokenizer, atomically."""
    args.check_tp(n)
    shards = split_state_dict(sd, n)

    def write(tmp: str) -> None:
        for i, shard in enumerate(shards):
            atomic_torch_save(shard, os.path.join(tmp, f"consolidated.{i:02d}.pth"))
        write_params(args, tmp)
        _copy_tokenizer(tokenizer_src, tmp)

    commit_dir(write, dst, overwrite)


def special_token_ids(tok: Tokenizer) -> dict[str, Optional[int]]:
    """config.json's bos / eos / pad ids as the tokenizer defines them (Llama-3 and Qwen do not
    use Llama-2's 1 / 2; Qwen has no BOS: null). pad only when the tokenizer has a real one."""
    ids: dict[str, Optional[int]] = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    if tok._real_pad_id is not None:  # `pad_id` falls back to eos, which is no pad token of the model
        ids["pad_token_id"] = tok._real_pad_id
    return ids


def save_hf(sd: dict, args: ModelArgs, dst: str, tokenizer_src: Optional[str] = None,
            overwrite: bool = False) -> None:
    """Full state dict -> an HF directory that `transformers` loads directly."""
    from safetensors.torch import save_file
    hf = {k: v.contiguous() for k, v in meta_to_hf(sd, args).items()}
    tok = load_tokenizer(tokenizer_src) if tokenizer_src else None
    config = hf_config_from_args(args)
    if tok is not None:
        config.update(special_token_ids(tok))

    def write(tmp: str) -> None:
        save_file(hf, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if tok is not None:
            save_tokenizer(tok, tmp)

    commit_dir(write, dst, overwrite)


# ----------------------------------------------------------------------------- models under TP

def load_model(ckpt_dir: str, model_type: Optional[str] = None, device=None, dtype: torch.dtype = torch.float32,
               role: Optional[str] = None):
    """Build the model of `ckpt_dir` and load this TP rank's shard.

    `role` "solver" / "verifier" refuses the other kind with a clear error.
    """
    files = shard_files(ckpt_dir)
    if not files:
        raise CheckpointError(f"--ckpt_dir {ckpt_dir}: no consolidated.NN.pth files "
                              f"(run checkpoint_split.py first)")
    tp = parallel.tp_size()
    if len(files) != tp:
        raise CheckpointError(f"--ckpt_dir {ckpt_dir} has {len(files)} shards but tensor parallel size is {tp}")
    args = read_args(ckpt_dir, model_type)
    _check_role(args, role, ckpt_dir)
    sd = _load_file(files[parallel.tp_rank()])
    model = build_model(args, device or parallel.device(), dtype)
    check_shapes(sd, {k: tuple(v.shape) for k, v in model.state_dict().items()}, files[parallel.tp_rank()])
    model.load_state_dict(sd, strict=True, assign=False)
    return model


def _check_role(args: ModelArgs, role: Optional[str], ckpt_dir: str) -> None:
    if role == "solver" and args.reward_head:
        raise CheckpointError(f"{ckpt_dir} is a verifier checkpoint (params.json has reward_head); "
                              f"a solver checkpoint is expected here")
    if role == "verifier" and not args.reward_head:
        raise CheckpointError(f"{ckpt_dir} is a solver checkpoint (no reward_head in params.json); "
                              f"a verifier checkpoint is expected here")


def save_model(model: Optional[torch.nn.Module], dst: str, tokenizer_src: Optional[str] = None,
               state: Optional[dict] = None, model_state: Optional[dict] = None,
               writer_replica: Optional[int] = None) -> None:
    """Write the checkpoint dir `dst` atomically; every rank calls it.

    The TP ranks of one DP replica write the shards: `writer_replica` (None: every replica
    holds the model and replica 0 writes; give it when only some replicas hold the model,
    the others may pass `model` None). `model_state` replaces `model.state_dict()` as the
    weights written (e.g. LoRA merged in; read on the writing replica only). `state`, if
    given, goes to `state.RR.pth` of every rank. Files land in `dst.tmp`, which the writer's
    TP rank 0 renames to `dst` once all ranks are done, so a crash leaves `dst` as it was."""
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
        weights = model.state_dict() if model_state is None else model_state
        sd = {k: v.detach().to("cpu").clone() for k, v in weights.items()}
        atomic_torch_save(sd, os.path.join(tmp, f"consolidated.{parallel.tp_rank():02d}.pth"))
    if state is not None:
        atomic_torch_save(state, os.path.join(tmp, f"state.{parallel.rank():02d}.pth"))
    parallel.barrier()  # every rank's files are in before the rename publishes them
    if lead:
        write_params(model.args, tmp)
        _copy_tokenizer(tokenizer_src, tmp)
        _swap_in(tmp, dst)
    parallel.barrier()  # nobody reads or re-saves `dst` before it is in place


def split_command(ckpt_file: str, save_path: str, n: Optional[int] = None, model_type: Optional[str] = None,
                  to: str = "meta", tokenizer_file: Optional[str] = None, overwrite: bool = False,
                  num_shards: Optional[int] = None) -> None:
    """checkpoint_split.py: any source -> `num_shards` Meta shards (`n` is its old name), or ->
    an HF directory."""
    if int(os.environ.get("RANK", 0)) != 0:
        return  # torchrun may start several processes; one does the work (no process group needed)
    if to not in ("meta", "hf"):
        raise CheckpointError(f"--to must be 'meta' or 'hf', got {to!r}")
    shards = _shard_count(num_shards, n)
    if model_type:
        family_of(model_type)
    sd, args = load_source(ckpt_file, model_type)
    tok = tokenizer_file or find_tokenizer(ckpt_file)
    if to == "hf":
        save_hf(sd, args, save_path, tok, overwrite)
    else:
        save_meta(sd, args, save_path, shards, tok, overwrite)
    get_logger().info(f"wrote {save_path} ({'HF' if to == 'hf' else f'{shards} shards'}, {args.family}, "
                      f"{sum(t.numel() for t in sd.values()) / 1e6:.2f}M params)")


def _shard_count(num_shards: Optional[int], n: Optional[int]) -> int:
    """--num_shards, or its alias --n (torchrun >= 2.13 takes `--n` for an ambiguous option of its own)."""
    if num_shards is not None and n is not None and num_shards != n:
        raise CheckpointError(f"--num_shards {num_shards} and --n {n} disagree (--n is an alias: give one)")
    count = num_shards if num_shards is not None else 1 if n is None else n
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise CheckpointError(f"--num_shards must be an integer >= 1, got {count!r}")
    return count
