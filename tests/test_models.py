"""Every family's logits equal HF transformers' on the same random weights, at TP=1 and TP=2 (and an
explicit config.json head_dim is read)."""
import pytest
import torch

from llama_rlhf.checkpoint import load_model, load_source, save_meta
from tests.helpers import ROOT, tiny_hf_model, torchrun

CASES = {
    "llama-gqa": ("llama-tiny", {}),
    "llama3-rope-scaling": ("llama-tiny", {"rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 16},
                                           "rope_theta": 500000.0}),
    "llama-explicit-head-dim": ("llama-tiny", {"head_dim": 24}),  # config.json's head_dim != dim / n_heads
    "mistral-window": ("mistral-tiny", {}),
    "mixtral": ("mixtral-tiny", {}),
    "qwen-bias-tied": ("qwen-tiny", {}),
    "qwen-bias-untied": ("qwen-tiny", {"tie_word_embeddings": False}),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    preset, overrides = CASES[request.param]
    hf, args = tiny_hf_model(preset, **overrides)
    root = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(root / "hf")
    tokens = torch.randint(0, args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.save(tokens, root / "tokens.pt")
    return root, tokens, ref


def test_tp1_logits_match_hf(case):
    root, tokens, ref = case
    sd, args = load_source(str(root / "hf"))
    save_meta(sd, args, str(root / "tp1"), n=1)
    model = load_model(str(root / "tp1")).eval()
    with torch.no_grad():
        ours = model(tokens)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_tp2_logits_match_hf(case):
    root, tokens, ref = case
    sd, args = load_source(str(root / "hf"))
    save_meta(sd, args, str(root / "tp2"), n=2)
    torchrun(ROOT / "tests/dist/logits_worker.py", root / "tp2", root / "tokens.pt", root / "out.pt")
    ours = torch.load(root / "out.pt")
    assert (ours - ref).abs().max().item() <= 1e-4
