"""Model architecture: `ModelArgs`, the named presets, and reading/writing the
checkpoint's own config (`params.json`, Meta style, or `config.json`, HF style).

Families differ only by config fields (bias, experts, tying, rope), never by
code paths in separate files.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import UsageError

FAMILIES = ("llama", "mistral", "mixtral", "qwen")


class ConfigError(UsageError):
    """A checkpoint config that is missing, unknown or contradicts itself."""


@dataclass
class ModelArgs:
    family: str = "llama"
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # FFN width; derived Meta-style when None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama-3.1 style: factor, low/high_freq_factor, original_max_position_embeddings
    max_seq_len: int = 4096
    qkv_bias: bool = False  # Qwen
    tie_word_embeddings: bool = False  # some Qwen sizes
    n_experts: int = 0  # Mixtral: 8
    n_experts_per_tok: int = 2
    sliding_window: Optional[int] = None  # Mistral v0.1
    reward_head: int = 0  # >0: a verifier / critic with a scalar head of this many outputs
    head_dim: Optional[int] = None  # explicit in some config.json files; default dim // n_heads

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = meta_ffn_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if (self.head_dim is None and self.dim % self.n_heads) or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"dim {self.dim}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads} do not divide")
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def check_tp(self, tp: int) -> None:
        """Tensor parallelism splits heads, KV heads and FFN width, which it must divide. The
        vocabulary is split too, at any TP: the shards pad it (`parallel.padded_vocab`), and
        `vocab_size` stays the real size."""
        for name, value in (("n_heads", self.n_heads), ("n_kv_heads", self.n_kv_heads),
                            ("hidden_dim", self.hidden_dim)):
            if value % tp:
                raise ConfigError(f"tensor parallel size {tp} does not divide {name}={value}")


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """The FFN width rule of Meta's llama reference (2/3 of 4*dim, rounded up)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _preset(family: str, **kw: Any) -> dict:
    return {"family": family, **kw}


_LLAMA1 = dict(vocab_size=32000, norm_eps=1e-6, multiple_of=256, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, multiple_of=256, max_seq_len=4096)
_MISTRAL = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000,
                norm_eps=1e-5, rope_theta=1e6, max_seq_len=32768)
_QWEN = dict(norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, max_seq_len=32768)
_TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=512, max_seq_len=256)

# Sizes users know the models by. Used only when a checkpoint carries no config;
# otherwise the checkpoint's own params.json / config.json decides every size.
PRESETS: dict[str, dict] = {
    "llama-1-7b": _preset("llama", dim=4096, n_layers=32, n_heads=32, **_LLAMA1),
    "llama-1-13b": _preset("llama", dim=5120, n_layers=40, n_heads=40, **_LLAMA1),
    "llama-1-33b": _preset("llama", dim=6656, n_layers=60, n_heads=52, **_LLAMA1),
    "llama-2-7b": _preset("llama", dim=4096, n_layers=32, n_heads=32, **_LLAMA2),
    "llama-2-13b": _preset("llama", dim=5120, n_layers=40, n_heads=40, **_LLAMA2),
    "llama-2-70b": _preset("llama", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                           **{**_LLAMA2, "multiple_of": 4096}, ffn_dim_multiplier=1.3),
    "llama-3-8b": _preset("llama", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                          multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                          max_seq_len=8192),
    "mistral-7b-instruct-v0.2": _preset("mistral", **_MISTRAL),
    "mixtral-8x7b-instruct-v0.1": _preset("mixtral", **_MISTRAL, n_experts=8, n_experts_per_tok=2),
    "qwen-7b": _preset("qwen", dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=151936, **_QWEN),
    "qwen-14b": _preset("qwen", dim=5120, n_layers=40, n_heads=40, hidden_dim=13696, vocab_size=152064, **_QWEN),
    "qwen-72b": _preset("qwen", dim=8192, n_layers=80, n_heads=64, hidden_dim=24576, vocab_size=152064, **_QWEN),
    "llama-tiny": _preset("llama", **_TINY),
    "mistral-tiny": _preset("mistral", **_TINY, sliding_window=32),
    "mixtral-tiny": _preset("mixtral", **_TINY, n_experts=4, n_experts_per_tok=2),
    "qwen-tiny": _preset("qwen", **{**_TINY, "norm_eps": 1e-6}, qkv_bias=True, tie_word_embeddings=True),
}


def family_of(model_type: str) -> str:
    if model_type not in PRESETS:
        raise ConfigError(f"unknown --model_type {model_type!r}; known: {', '.join(PRESETS)}")
    return PRESETS[model_type]["family"]


def preset_args(model_type: str, **overrides: Any) -> ModelArgs:
    family_of(model_type)
    return ModelArgs(**{**PRESETS[model_type], **overrides})


# --------------------------------------------------------------------------- HF config.json

_HF_FAMILY = {"llama": "llama", "mistral": "mistral", "mixtral": "mixtral", "qwen2": "qwen"}
_FAMILY_HF = {"llama": ("llama", "LlamaForCausalLM"), "mistral": ("mistral", "MistralForCausalLM"),
              "mixtral": ("mixtral", "MixtralForCausalLM"), "qwen": ("qwen2", "Qwen2ForCausalLM")}


def args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    hf_type = cfg.get("model_type")
    if hf_type == "qwen":  # Qwen-1 (QWenLMHeadModel): its own config field names
        return _args_from_qwen1_config(cfg, source)
    if hf_type not in _HF_FAMILY:
        raise ConfigError(f"{source}: unsupported model_type {hf_type!r}; supported: {[*_HF_FAMILY, 'qwen']}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")}
    family = _HF_FAMILY[hf_type]
    return ModelArgs(
        family=family, dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
        vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=scaling, max_seq_len=cfg.get("max_position_embeddings", 4096),
        qkv_bias=family == "qwen", tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        n_experts=cfg.get("num_local_experts", 0) if family == "mixtral" else 0,
        n_experts_per_tok=cfg.get("num_experts_per_tok", 2),
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", family in ("mistral", "mixtral")) else None,
        head_dim=cfg.get("head_dim"),
    )


_QWEN1_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def _args_from_qwen1_config(cfg: dict, source: str) -> ModelArgs:
    """Qwen-1 is a Qwen2 without GQA: the same model here (family "qwen", q/k/v bias), only named
    differently. Its `intermediate_size` counts both MLP inputs (w1 and w2), so the FFN width is
    half of it. Past `seq_length` Qwen-1 switches on dynamic NTK rope and log-n attention scaling,
    which this model does not have, so `seq_length` is the longest sequence it is exact for."""
    missing = [k for k in _QWEN1_REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"{source}: Qwen-1 config lacks {', '.join(missing)}")
    heads, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    if cfg.get("rotary_pct", 1.0) != 1.0:
        raise ConfigError(f"{source}: rotary_pct {cfg['rotary_pct']} (partial rotary) is not supported")
    if not cfg.get("no_bias", True):
        raise ConfigError(f"{source}: no_bias false (biased c_proj and MLP) is not supported")
    if cfg["intermediate_size"] % 2 or cfg.get("kv_channels", dim // heads) * heads != dim:
        # c_attn is split into thirds of hidden_size and the MLP into halves: anything else is no Qwen-1
        raise ConfigError(f"{source}: intermediate_size {cfg['intermediate_size']} must be even and kv_channels "
                          f"x num_attention_heads must equal hidden_size {dim}")
    return ModelArgs(
        family="qwen", dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=heads, vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"] // 2, norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        rope_theta=float(cfg.get("rotary_emb_base", 10000.0)), max_seq_len=cfg.get("seq_length", 2048),
        qkv_bias=True, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def hf_config_from_args(args: ModelArgs) -> dict:
    hf_type, arch = _FAMILY_HF[args.family]
    cfg = {
        "architectures": [arch], "model_type": hf_type, "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
        "head_dim": args.head_dim,
    }
    if args.rope_scaling:
        cfg["rope_scaling"] = {"rope_type": "llama3", **args.rope_scaling}
    if args.family == "mixtral":
        cfg.update(num_local_experts=args.n_experts, num_experts_per_tok=args.n_experts_per_tok)
    if args.family in ("mistral", "mixtral", "qwen"):
        cfg["sliding_window"] = args.sliding_window
        cfg["use_sliding_window"] = args.sliding_window is not None
    return cfg


# --------------------------------------------------------------------------- params.json

_META_KEYS = {f.name for f in dataclasses.fields(ModelArgs)}


def args_from_params(params: dict, source: str = "params.json", family: Optional[str] = None) -> ModelArgs:
    """Meta params.json; unknown keys are ignored, a missing family comes from `family`."""
    known = {k: v for k, v in params.items() if k in _META_KEYS}
    if "family" not in known:
        known["family"] = family or "llama"
    if known.get("vocab_size", -1) <= 0:
        raise ConfigError(f"{source}: vocab_size must be set (Meta writes -1; give it from the tokenizer)")
    try:
        return ModelArgs(**known)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_args(ckpt_dir: str, model_type: Optional[str] = None) -> ModelArgs:
    """The architecture of a checkpoint dir, from its own config file.

    `model_type` picks the preset only when the dir has no config, and must agree
    with the config's family when it has one.
    """
    params, config = os.path.join(ckpt_dir, "params.json"), os.path.join(ckpt_dir, "config.json")
    expected = family_of(model_type) if model_type else None
    if os.path.exists(params):
        args = args_from_params(_read_json(params), params, family=expected)
        source = params
    elif os.path.exists(config):
        args, source = args_from_hf_config(_read_json(config), config), config
    elif model_type:
        return preset_args(model_type)
    else:
        raise ConfigError(f"{ckpt_dir}: no params.json or config.json, and no --model_type to fall back on")
    if expected and args.family != expected:
        raise ConfigError(f"{source} describes a {args.family} model but --model_type {model_type} is {expected}")
    return args


def write_params(args: ModelArgs, ckpt_dir: str) -> None:
    with open(os.path.join(ckpt_dir, "params.json"), "w") as f:
        json.dump(args.to_json(), f, indent=2)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
