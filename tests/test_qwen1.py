"""Qwen-1 (QWenLMHeadModel) import: a tiny random Qwen-1 checkpoint written here goes through
checkpoint_split.py; its logits must equal a hand-written Qwen-1 forward (the oracle, reading the
Qwen-1 keys directly) and transformers' Qwen2ForCausalLM on the same weights mapped by hand."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from llama_rlhf.checkpoint import load_model, load_source, save_meta
from llama_rlhf.checkpoint.tables import CheckpointError
from llama_rlhf.models.args import ConfigError
from llama_rlhf.tokenizers import load_tokenizer
from tests.helpers import ROOT, run_script, torchrun
from tests.test_tiktoken import write_bpe

DIM, LAYERS, HEADS, FFN, VOCAB, BASE, EPS = 64, 2, 4, 96, 128, 50000.0, 1e-6
HD = DIM // HEADS


def qwen1_config(**overrides) -> dict:
    """config.json as Qwen-1 writes it; intermediate_size is twice the FFN width (w1 and w2 together)."""
    return {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": DIM,
            "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "intermediate_size": 2 * FFN,
            "kv_channels": HD, "layer_norm_epsilon": EPS, "rotary_emb_base": BASE, "rotary_pct": 1.0,
            "seq_length": 256, "max_position_embeddings": 256, "vocab_size": VOCAB, "no_bias": True,
            "use_dynamic_ntk": True, "use_logn_attn": True, "tie_word_embeddings": False, **overrides}


def qwen1_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every Qwen-1 weight random (norms around 1, not ones, so a swapped norm shows)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    def norm() -> torch.Tensor:
        return 1.0 + torch.randn(DIM, generator=g) * 0.2

    w = {"transformer.wte.weight": r(VOCAB, DIM), "transformer.ln_f.weight": norm(), "lm_head.weight": r(VOCAB, DIM)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        w |= {p + "ln_1.weight": norm(), p + "ln_2.weight": norm(), p + "attn.c_attn.weight": r(3 * DIM, DIM),
              p + "attn.c_attn.bias": r(3 * DIM), p + "attn.c_proj.weight": r(DIM, DIM),
              p + "mlp.w1.weight": r(FFN, DIM), p + "mlp.w2.weight": r(FFN, DIM), p + "mlp.c_proj.weight": r(DIM, FFN)}
    return w


def write_qwen1(folder: Path, weights: dict, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def qwen1_forward(w: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The oracle: Qwen-1's forward written from its modelling code's maths, on Qwen-1's own keys."""
    B, T = tokens.shape
    inv = 1.0 / BASE ** (torch.arange(0, HD, 2, dtype=torch.float64) / HD)
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], dim=-1)  # half-split rotary: the pairs are (j, j + HD/2)
    cos, sin = emb.cos().float(), emb.sin().float()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = w["transformer.wte.weight"][tokens]
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        h = _rms(x, w[p + "ln_1.weight"])
        qkv = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(B, T, HEADS, HD).transpose(1, 2) for t in qkv.split(DIM, dim=-1))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        scores = (q @ k.transpose(-1, -2) / math.sqrt(HD)).masked_fill(~causal, float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, DIM)
        x = x + att @ w[p + "attn.c_proj.weight"].T
        h = _rms(x, w[p + "ln_2.weight"])
        a1, a2 = h @ w[p + "mlp.w1.weight"].T, h @ w[p + "mlp.w2.weight"].T
        x = x + (a1 * F.silu(a2)) @ w[p + "mlp.c_proj.weight"].T
    return _rms(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T


def qwen2_from_qwen1(w: dict):
    """transformers' Qwen2ForCausalLM on the same weights, mapped by hand (Qwen-1 = Qwen2 without GQA)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(hidden_size=DIM, intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                      num_hidden_layers=LAYERS, vocab_size=VOCAB, rms_norm_eps=EPS, max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": BASE}, tie_word_embeddings=False)
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    hf = {"model.embed_tokens.weight": w["transformer.wte.weight"], "model.norm.weight": w["transformer.ln_f.weight"],
          "lm_head.weight": w["lm_head.weight"]}
    for i in range(LAYERS):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            fused = w[p + f"attn.c_attn.{kind}"]
            hf |= {q + f"self_attn.{n}_proj.{kind}": fused[j * DIM:(j + 1) * DIM] for j, n in enumerate("qkv")}
        same = {"self_attn.o_proj": "attn.c_proj", "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
                "mlp.gate_proj": "mlp.w2", "mlp.up_proj": "mlp.w1", "mlp.down_proj": "mlp.c_proj"}  # w2 is silu-gated
        hf |= {q + f"{qwen2}.weight": w[p + f"{qwen1}.weight"] for qwen2, qwen1 in same.items()}
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


@pytest.fixture(scope="module")
def qwen1(tmp_path_factory):
    """The Qwen-1 dir (with a tiny qwen.tiktoken), the oracle's logits, and checkpoint_split.py run on it into tp2/."""
    root = tmp_path_factory.mktemp("qwen1")
    weights = qwen1_weights()
    write_qwen1(root / "src", weights, qwen1_config())
    write_bpe(root / "src" / "qwen.tiktoken")
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, root / "tokens.pt")
    with torch.no_grad():
        ref = qwen1_forward(weights, tokens)
    proc = run_script("checkpoint_split.py", "--ckpt_file", root / "src", "--save_path", root / "tp2",
                      "--num_shards", "2", "--tokenizer_file", root / "src" / "qwen.tiktoken")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, weights, tokens, ref


def test_config_from_qwen1_json(qwen1):
    root, *_ = qwen1
    sd, args = load_source(str(root / "src"))
    assert (args.family, args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim) == \
        ("qwen", DIM, LAYERS, HEADS, HEADS, HD)
    assert (args.hidden_dim, args.vocab_size, args.rope_theta, args.max_seq_len) == (FFN, VOCAB, BASE, 256)
    assert args.qkv_bias and not args.tie_word_embeddings and args.norm_eps == pytest.approx(EPS)
    assert sd["layers.0.attention.wq.bias"].shape == (DIM,)
    assert sd["layers.1.feed_forward.w1.weight"].shape == (FFN, DIM)


def test_oracle_equals_transformers_qwen2(qwen1):
    _, weights, tokens, ref = qwen1
    with torch.no_grad():
        hf = qwen2_from_qwen1(weights)(tokens).logits
    assert (hf - ref).abs().max().item() <= 1e-4


def test_tp1_logits_match_oracle(qwen1, tmp_path):
    root, _, tokens, ref = qwen1
    sd, args = load_source(str(root / "src"))
    save_meta(sd, args, str(tmp_path / "tp1"), n=1)
    with torch.no_grad():
        ours = load_model(str(tmp_path / "tp1")).eval()(tokens)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_tp2_logits_match_oracle(qwen1):
    root, _, _, ref = qwen1
    assert json.loads((root / "tp2/params.json").read_text())["family"] == "qwen"
    tok = load_tokenizer(root / "tp2")
    assert tok.flavour.name == "qwen1" and tok.bos_id is None
    torchrun(ROOT / "tests/dist/logits_worker.py", root / "tp2", root / "tokens.pt", root / "out.pt")
    assert (torch.load(root / "out.pt") - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("override, words", [({"rotary_pct": 0.5}, "rotary_pct"), ({"no_bias": False}, "no_bias"),
                                             ({"intermediate_size": 2 * FFN + 1}, "intermediate_size")])
def test_unsupported_qwen1_config_is_one_line(tmp_path, override, words):
    write_qwen1(tmp_path, qwen1_weights(), qwen1_config(**override))
    with pytest.raises(ConfigError, match=words) as e:
        load_source(str(tmp_path))
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_unknown_qwen1_key_is_one_line(tmp_path):
    weights = qwen1_weights() | {"transformer.h.0.attn.c_proj.bias": torch.zeros(DIM)}
    write_qwen1(tmp_path, weights, qwen1_config())
    with pytest.raises(CheckpointError, match="c_proj.bias") as e:
        load_source(str(tmp_path))
    assert "\n" not in str(e.value)
