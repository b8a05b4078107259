"""The generation engine: greedy equals HF `generate` (TP=1 and TP=2), batching is invisible,
log-probs equal a fresh forward pass, sampling is seeded, and rows finish for the right reason."""
import json

import pytest
import torch

from llama_rlhf.checkpoint import load_model, load_source, save_meta
from llama_rlhf.generation import generate, sample_next
from tests.helpers import ROOT, tiny_hf_model, torchrun

FAMILIES = {"llama": "llama-tiny", "qwen": "qwen-tiny"}
LENGTHS = (5, 11, 17)
NEW = 12


def _hf_greedy(hf, prompt: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Per family: checkpoint dirs (1 and 2 shards), the TP=1 model, prompts and HF's greedy tokens."""
    out = {}
    for name, preset in FAMILIES.items():
        hf, args = tiny_hf_model(preset)
        root = tmp_path_factory.mktemp(name)
        hf.save_pretrained(root / "hf")
        sd, args = load_source(str(root / "hf"))
        save_meta(sd, args, str(root / "tp1"), n=1)
        save_meta(sd, args, str(root / "tp2"), n=2)
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(0, args.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
        (root / "prompts.json").write_text(json.dumps({"prompts": prompts, "max_new_tokens": NEW}))
        refs = [_hf_greedy(hf, p, NEW) for p in prompts]
        out[name] = dict(root=root, model=load_model(str(root / "tp1")).eval(), prompts=prompts, refs=refs)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_hf_and_batching_is_invisible(cases, family):
    c = cases[family]
    batch = generate(c["model"], c["prompts"], NEW, eos_id=-1)
    assert batch.tokens == c["refs"]  # each HF reference was generated alone
    assert batch.finish_reasons == ["length"] * len(LENGTHS)
    for p, ref in zip(c["prompts"], c["refs"]):
        assert generate(c["model"], [p], NEW, eos_id=-1).tokens == [ref]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logprobs_equal_fresh_forward(cases, family):
    c = cases[family]
    out = generate(c["model"], c["prompts"], NEW, eos_id=-1, temperature=1.0, seed=1)
    for p, toks, lps in zip(c["prompts"], out.tokens, out.logprobs):
        with torch.no_grad():
            logits = c["model"](torch.tensor([p + toks]))[0, len(p) - 1:-1]
        ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(toks)[:, None])[:, 0]
        assert (ref - torch.tensor(lps)).abs().max().item() <= 1e-4


def test_greedy_matches_hf_tp2(cases, tmp_path):
    argv = [tmp_path / "out.json"]
    for c in cases.values():
        argv += [c["root"] / "tp2", c["root"] / "prompts.json"]
    torchrun(ROOT / "tests/dist/generate_worker.py", *argv)
    results = json.loads((tmp_path / "out.json").read_text())
    for c in cases.values():
        got = results[str(c["root"] / "tp2")]
        assert got["greedy"] == c["refs"]
        ours = generate(c["model"], c["prompts"], NEW, eos_id=-1)
        diff = max(abs(a - b) for x, y in zip(got["logprobs"], ours.logprobs) for a, b in zip(x, y))
        assert diff <= 1e-4
        # The same seed gives the same samples whatever the TP size (logits agree to ~1e-6).
        sampled = generate(c["model"], c["prompts"], NEW, eos_id=-1, temperature=1.0, top_p=0.9, seed=7).tokens
        assert got["sampled"] == sampled


def test_sampling_is_seeded_and_degenerates_to_greedy(cases):
    c = cases["llama"]
    m, prompts = c["model"], c["prompts"]
    a = generate(m, prompts, NEW, eos_id=-1, temperature=1.0, top_p=0.95, top_k=50, seed=5)
    b = generate(m, prompts, NEW, eos_id=-1, temperature=1.0, top_p=0.95, top_k=50, seed=5)
    other = generate(m, prompts, NEW, eos_id=-1, temperature=1.0, seed=6)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert other.tokens != a.tokens
    assert generate(m, prompts, NEW, eos_id=-1, temperature=0.8, top_k=1, seed=9).tokens == c["refs"]
    assert generate(m, prompts, NEW, eos_id=-1, temperature=0.8, top_p=1e-6, seed=9).tokens == c["refs"]


def test_sample_next_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, 1.0, 2, g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, 0.7, 0, g).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample_next(logits, 1.0, 1.0, 0, g).tolist()) == {0, 1, 2, 3}


class _Tok:
    """Decodes id i as "<i>", so a stop string names exactly one token."""

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_finish_on_eos_stop_string_and_length(cases):
    c = cases["llama"]
    m, prompts, refs = c["model"], c["prompts"], c["refs"]
    eos = refs[0][3]
    out = generate(m, prompts, NEW, eos_id=eos)
    for toks, ref, reason in zip(out.tokens, refs, out.finish_reasons):
        if eos in ref:
            assert toks == ref[:ref.index(eos) + 1] and reason == "eos"
        else:
            assert toks == ref and reason == "length"
    stop = f"<{refs[1][4]}>"
    out = generate(m, prompts, NEW, eos_id=-1, stop_strings=[stop], tokenizer=_Tok())
    for toks, ref, reason in zip(out.tokens, refs, out.finish_reasons):
        if stop in _Tok().decode(ref):
            k = [f"<{t}>" for t in ref].index(stop)
            assert toks == ref[:k + 1] and reason == "stop"
        else:
            assert toks == ref and reason == "length"
    with pytest.raises(ValueError, match="tokenizer"):
        generate(m, prompts, NEW, eos_id=-1, stop_strings=["x"])


def test_max_seq_len_caps_rows_and_finished_rows_leave_the_batch(cases):
    c = cases["llama"]
    m, prompts, refs = c["model"], c["prompts"], c["refs"]
    # Rows 2 and 3 (17 tokens) may only grow to 23 positions: 6 new tokens, then they leave the
    # batch and the cache is compacted; rows 0 and 1 (5 and 11 tokens) carry on unchanged.
    out = generate(m, prompts + [prompts[2]], NEW, eos_id=-1, max_seq_len=23)
    assert out.tokens[:2] == refs[:2]
    assert out.tokens[2] == out.tokens[3] == refs[2][:6]
    assert out.finish_reasons == ["length"] * 4
    with pytest.raises(ValueError, match="prompt 2 has 17 tokens"):
        generate(m, prompts, NEW, eos_id=-1, max_seq_len=16)
    full = generate(m, [prompts[2]], NEW, eos_id=-1, max_seq_len=17)
    assert full.tokens == [[]] and full.finish_reasons == ["length"]
    assert generate(m, [], NEW, eos_id=-1).tokens == []
