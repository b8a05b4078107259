"""Vocabularies TP does not divide (32001 is common; 515 here, divisible by neither 2 nor 4): the shards
pad the embedding / output rows to `parallel.padded_vocab`, and nothing outside them sees a pad id:
logits, log-probs, the fused loss and greedy generation cover the real vocabulary only, and split ->
merge / --to hf is bit-exact.

This file is also the torchrun worker: `python -m torch.distributed.run tests/test_vocab_pad.py OUT DIR...`.
"""
import json
import shutil
import sys
from pathlib import Path

if __name__ == "__main__":  # run by torchrun as its own worker: the repo root is not on sys.path then
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
from safetensors.torch import load_file

from llama_rlhf import parallel
from llama_rlhf.checkpoint import load_model, load_source, shard_files, split_command
from llama_rlhf.generation import generate
from llama_rlhf.scoring import linear_cross_entropy, linear_logprobs
from tests.helpers import tiny_hf_model, torchrun

VOCAB = 515
PROMPTS = [[1, 5, 9, 300, 514], [1, 514, 2]]


def _inputs() -> dict:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=g)
    tokens[0, :3] = torch.tensor([VOCAB - 1, 0, 257])  # the last real id, and ids on both sides of a shard edge
    targets = torch.randint(0, VOCAB, (tokens.numel(),), generator=g)
    targets[:3] = torch.tensor([VOCAB - 1, 258, 0])
    return {"tokens": tokens, "targets": targets}


def measure(model, tokens: torch.Tensor, targets: torch.Tensor) -> dict:
    """Everything that reads the vocabulary: logits, fused loss (+ its gradient), log-probs and
    entropy, greedy tokens, and the parameter count."""
    with torch.no_grad():
        logits = model(tokens)
        h = model.hidden(tokens).reshape(-1, model.args.dim)
    hr = h.clone().requires_grad_()
    loss = linear_cross_entropy(hr, model.output, targets)
    loss.backward()
    with torch.no_grad():
        logp, ent = linear_logprobs(h, model.output, targets)
    greedy = generate(model, PROMPTS, 6, eos_id=-1).tokens
    return {"logits": logits, "loss": loss.detach(), "grad_h": hr.grad, "logp": logp, "ent": ent,
            "greedy": greedy, "params": parallel.param_count(model)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_pad")
    refs = {}
    for name, preset in (("llama", "llama-tiny"), ("tied", "qwen-tiny")):
        hf, args = tiny_hf_model(preset, vocab_size=VOCAB, n_kv_heads=4)
        hf.save_pretrained(root / f"{name}-hf")
        refs[name] = hf
        for n in (1, 2, 4):
            split_command(str(root / f"{name}-hf"), str(root / f"{name}-tp{n}"), num_shards=n)
    inputs = _inputs()
    torch.save(inputs, root / "inputs.pt")
    tp1 = {name: measure(load_model(str(root / f"{name}-tp1")).eval(), **inputs) for name in refs}
    hack = _hack_pad_row(root, tp1["llama"]["greedy"][0][0])
    torchrun(__file__, root / "out.pt", root / "inputs.pt", root / "llama-tp2", root / "tied-tp2", hack)
    return {"root": root, "hf": refs, "tp1": tp1, "tp2": torch.load(root / "out.pt"), "hack": hack, **inputs}


def _hack_pad_row(root: Path, first_token: int) -> str:
    """llama-tp2 with its one pad row of output.weight (row 515, the last of shard 1) set to 1000x
    the row of the token greedy picks first: a pad logit that would beat every real one."""
    dst = root / "llama-tp2-hacked"
    shutil.copytree(root / "llama-tp2", dst)
    shards = [torch.load(p) for p in shard_files(str(dst))]
    w = torch.cat([s["output.weight"] for s in shards])
    assert w.shape[0] == 516 and w[VOCAB:].eq(0).all()  # split pads with zeros
    shards[1]["output.weight"][-1] = 1000.0 * w[first_token]
    torch.save(shards[1], shard_files(str(dst))[1])
    return str(dst)


def test_shards_are_padded_and_params_keep_the_real_size(ckpts):
    root = ckpts["root"]
    for n, rows in ((2, 258), (4, 129)):
        shards = [torch.load(p) for p in shard_files(str(root / f"llama-tp{n}"))]
        for key in ("tok_embeddings.weight", "output.weight"):
            assert all(s[key].shape == (rows, 64) for s in shards), (n, key)
            assert torch.cat([s[key] for s in shards])[VOCAB:].eq(0).all()
        assert json.loads((root / f"llama-tp{n}/params.json").read_text())["vocab_size"] == VOCAB
        tied = torch.load(shard_files(str(root / f"tied-tp{n}"))[0])  # tied: one tensor, stored once
        ptrs = {tied[k].untyped_storage().data_ptr() for k in ("output.weight", "tok_embeddings.weight")}
        assert len(ptrs) == 1


def test_split_merge_and_hf_export_round_trip_bit_exactly(ckpts):
    root = ckpts["root"]
    for name in ("llama", "tied"):
        original = load_file(root / f"{name}-hf/model.safetensors")
        for n in (2, 4):
            split_command(str(root / f"{name}-tp{n}"), str(root / f"{name}-back{n}"), to="hf")
            back = load_file(root / f"{name}-back{n}/model.safetensors")
            assert original.keys() == back.keys(), (name, n)
            assert all(torch.equal(original[k], back[k]) for k in original), (name, n)
        split_command(str(root / f"{name}-tp4"), str(root / f"{name}-4to2"), num_shards=2)  # padded -> padded
        for a, b in zip(shard_files(str(root / f"{name}-4to2")), shard_files(str(root / f"{name}-tp2"))):
            sa, sb = torch.load(a), torch.load(b)
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        full, args = load_source(str(root / f"{name}-tp4"))
        assert args.vocab_size == VOCAB and full["output.weight"].shape[0] == VOCAB


def test_tp1_logits_match_transformers(ckpts):
    for name, hf in ckpts["hf"].items():
        with torch.no_grad():
            ref = hf(ckpts["tokens"]).logits
        assert ckpts["tp1"][name]["logits"].shape == ref.shape == (2, 12, VOCAB)
        assert (ckpts["tp1"][name]["logits"] - ref).abs().max().item() <= 1e-4, name


def test_tp2_equals_tp1(ckpts):
    for name in ("llama", "tied"):
        one, two = ckpts["tp1"][name], ckpts["tp2"][str(ckpts["root"] / f"{name}-tp2")]
        assert two["logits"].shape == (2, 12, VOCAB)
        for key in ("logits", "loss", "grad_h", "logp", "ent"):  # the summed loss (~150) is within 1e-6 relative
            torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-6, msg=f"{name} {key}")
        assert two["greedy"] == one["greedy"], name
        assert two["params"] == one["params"], name  # pad rows are not parameters


def test_generation_never_emits_a_pad_id(ckpts):
    # Precondition: the hacked pad row would win the first greedy step if the logits were not cut.
    model = load_model(str(ckpts["root"] / "llama-tp1")).eval()
    first = ckpts["tp1"]["llama"]["greedy"][0][0]
    with torch.no_grad():
        real = model(torch.tensor([PROMPTS[0]]))[0, -1]
    assert 1000.0 * real[first] > real.max()
    hacked = ckpts["tp2"][ckpts["hack"]]
    assert hacked["greedy"] == ckpts["tp1"]["llama"]["greedy"]
    assert all(t < VOCAB for row in hacked["greedy"] for t in row)
    assert hacked["logits"].shape[-1] == VOCAB


def _worker(out_file: str, inputs_file: str, *ckpt_dirs: str) -> None:
    inputs, out = torch.load(inputs_file), {}
    for ckpt_dir in ckpt_dirs:
        parallel.init(tp=len(shard_files(ckpt_dir)))
        out[ckpt_dir] = measure(load_model(ckpt_dir).eval(), **inputs)
    if parallel.is_main():
        torch.save(out, out_file)
    parallel.barrier()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
