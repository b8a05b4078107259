"""The generation engine: greedy equals HF `generate` (TP=1 and TP=2), batching is invisible,
log-probs equal a fresh forward pass, sampling is seeded, and rows finish for the right reason."""
import json

import pytest
import torch

from llama_rlhf.checkpoint import load_model, load_source, save_meta
from llama_rlhf.errors import UsageError
from llama_rlhf import generation
from llama_rlhf.generation import _row_key, _uniforms, cpu_linears, generate, sample_next
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


# ---------------------------------------------------------------- continuous batching

MANY = (3, 5, 8, 11, 13, 15, 17, 19, 20, 22)  # 10 prompt lengths
SEQ = 24  # budgets min(NEW, SEQ - len): 12 ... 2 tokens, so rows also end at different steps


def _many_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in MANY]


def _common_token(outs: list[list[int]]) -> int:
    """The token that starts the most rows' tails: as EOS it ends rows at different steps."""
    firsts = [t for toks in outs for t in dict.fromkeys(toks[:8])]
    return max(set(firsts), key=firsts.count)


def _assert_fresh_logprobs(model, prompts, out, num_samples: int = 1) -> None:
    for j, (toks, lps) in enumerate(zip(out.tokens, out.logprobs)):
        p = prompts[j // num_samples]
        if not toks:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([p + toks]))[0, len(p) - 1:-1]
        ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(toks)[:, None])[:, 0]
        assert (ref - torch.tensor(lps)).abs().max().item() <= 1e-4


def test_three_slots_serving_ten_prompts_equal_each_prompt_alone(cases):
    c = cases["llama"]
    m = c["model"]
    prompts = _many_prompts(m.args.vocab_size)
    eos = _common_token(generate(m, prompts, NEW, eos_id=-1, max_seq_len=SEQ).tokens)
    alone = [generate(m, [p], NEW, eos_id=eos, max_seq_len=SEQ, max_batch=1) for p in prompts]
    out = generate(m, prompts, NEW, eos_id=eos, max_seq_len=SEQ, max_batch=3)
    assert out.tokens == [a.tokens[0] for a in alone]
    assert out.finish_reasons == [a.finish_reasons[0] for a in alone]
    # The rows really do finish at different steps, both on EOS and on their budgets.
    assert len({len(t) for t in out.tokens}) >= 5
    assert {"eos", "length"} <= set(out.finish_reasons)
    assert all(t[-1] == eos for t, r in zip(out.tokens, out.finish_reasons) if r == "eos")
    _assert_fresh_logprobs(m, prompts, out)


def test_chunked_attention_and_resorted_slots_are_invisible(cases, monkeypatch):
    """Decode attention in chunks of 2 slots, each over its own columns, and slots re-sorted by
    column whenever that reads fewer keys: every row is still the row of a one-slot run."""
    import llama_rlhf.generation as generation

    c = cases["llama"]
    m = c["model"]
    prompts = _many_prompts(m.args.vocab_size)
    kw = dict(temperature=1.0, seed=6, max_seq_len=SEQ, num_samples=2)
    eos = _common_token(generate(m, prompts, NEW, eos_id=-1, **kw).tokens)
    ref = generate(m, prompts, NEW, eos_id=eos, max_batch=1, **kw)
    extents, moves = [], []
    set_decode, move = generation.SlotCache.set_decode, generation._Slots.move
    monkeypatch.setattr(generation.SlotCache, "set_decode",
                        lambda self, pos, ext: (extents.append(ext), set_decode(self, pos, ext))[1])
    monkeypatch.setattr(generation._Slots, "move", lambda self, src, nb: (moves.append(nb), move(self, src, nb))[1])
    monkeypatch.setattr(generation, "_ATTN_CHUNK", 2)
    monkeypatch.setattr(generation, "_RESORT", 1.0)
    out = generate(m, prompts, NEW, eos_id=eos, max_batch=7, **kw)
    assert (out.tokens, out.finish_reasons) == (ref.tokens, ref.finish_reasons)
    assert max(abs(a - b) for x, y in zip(out.logprobs, ref.logprobs) for a, b in zip(x, y)) <= 1e-5
    assert any(len(set(e)) > 1 for e in extents)  # chunks really attend different column counts
    assert any(nb == 7 for nb in moves)  # and slots were re-sorted while rows still waited


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("max_batch", [1, 2])
def test_greedy_matches_hf_whatever_max_batch_and_order(cases, family, max_batch):
    c = cases[family]
    order = [2, 0, 1]
    out = generate(c["model"], [c["prompts"][i] for i in order], NEW, eos_id=-1, max_batch=max_batch)
    assert out.tokens == [c["refs"][i] for i in order]


def test_samples_do_not_depend_on_the_batch_layout(cases):
    c = cases["llama"]
    m = c["model"]
    prompts = _many_prompts(m.args.vocab_size)
    kw = dict(temperature=1.0, top_p=0.9, seed=4, max_seq_len=SEQ)
    eos = _common_token(generate(m, prompts, NEW, eos_id=-1, **kw).tokens)
    runs = [generate(m, prompts, NEW, eos_id=eos, max_batch=b, **kw) for b in (1, 3, len(prompts))]
    assert runs[0].tokens == runs[1].tokens == runs[2].tokens
    assert runs[0].finish_reasons == runs[1].finish_reasons == runs[2].finish_reasons
    assert len({len(t) for t in runs[0].tokens}) >= 5
    # Prompt i's samples depend on (seed, i), not on the other prompts of the call.
    assert generate(m, prompts[4:7], NEW, eos_id=eos, **kw).tokens != runs[0].tokens[4:7]  # other indices
    other = generate(m, prompts, NEW, eos_id=eos, max_batch=3, **{**kw, "seed": 5})
    assert other.tokens != runs[0].tokens
    _assert_fresh_logprobs(m, prompts, runs[1])


@pytest.mark.parametrize("max_batch", [1, 2, 4, None])
def test_num_samples_prefill_once_and_sample_per_row(cases, max_batch, monkeypatch):
    import llama_rlhf.generation as generation

    c = cases["llama"]
    m, prompts, K = c["model"], c["prompts"], 3
    kw = dict(temperature=1.0, seed=2, num_samples=K)
    prefilled: list[int] = []
    block = generation._Engine._prefill_block
    monkeypatch.setattr(generation._Engine, "_prefill_block",
                        lambda self, todo, *a: (prefilled.extend(todo), block(self, todo, *a))[1])
    out = generate(m, prompts, NEW, eos_id=-1, max_batch=max_batch, **kw)
    assert prefilled == [0, 1, 2]  # each prompt once, even when its samples enter at different steps
    assert len(out.tokens) == len(prompts) * K
    assert out.tokens == generate(m, prompts, NEW, eos_id=-1, max_batch=len(prompts) * K, **kw).tokens
    for i in range(len(prompts)):  # the K samples of one prompt differ from each other
        assert len({tuple(t) for t in out.tokens[i * K:(i + 1) * K]}) == K
    _assert_fresh_logprobs(m, prompts, out, K)
    greedy = generate(m, prompts, NEW, eos_id=-1, num_samples=2, max_batch=max_batch)
    assert greedy.tokens == [r for r in c["refs"] for _ in range(2)]  # copies of one prefill continue alike


def test_eos_id_may_be_a_list_and_stop_strings_still_work_with_slots(cases):
    c = cases["llama"]
    m, prompts, refs = c["model"], c["prompts"], c["refs"]
    a, b = refs[0][5], refs[2][2]
    out = generate(m, prompts, NEW, eos_id=[a, b], max_batch=2)
    for toks, ref, reason in zip(out.tokens, refs, out.finish_reasons):
        ends = [k for k, t in enumerate(ref) if t in (a, b)]
        assert (toks, reason) == ((ref[:ends[0] + 1], "eos") if ends else (ref, "length"))
    for off in ([], [-1], -1):
        assert generate(m, prompts, NEW, eos_id=off, max_batch=2).tokens == refs
    stop = f"<{refs[1][4]}>"
    out = generate(m, prompts, NEW, eos_id=-1, stop_strings=[stop], tokenizer=_Tok(), max_batch=1)
    assert out.tokens == generate(m, prompts, NEW, eos_id=-1, stop_strings=[stop], tokenizer=_Tok()).tokens
    assert "stop" in out.finish_reasons


def test_progress_counts_every_row_and_bad_arguments_are_usage_errors(cases):
    c = cases["llama"]
    m, prompts = c["model"], c["prompts"]
    seen: list[int] = []
    generate(m, prompts + [prompts[2]], NEW, eos_id=-1, max_seq_len=17, num_samples=2, max_batch=3,
             progress=seen.append)  # the two 17-token prompts have no room: empty rows, counted too
    assert sum(seen) == 8
    with pytest.raises(UsageError, match="num_samples"):
        generate(m, prompts, NEW, eos_id=-1, num_samples=0)
    with pytest.raises(UsageError, match="max_batch"):
        generate(m, prompts, NEW, eos_id=-1, max_batch=0)


def test_row_uniforms_are_uniform_and_sampling_follows_the_distribution():
    keys = torch.tensor([_row_key(7, i, k) for i in range(2000) for k in range(5)])
    for t in (0, 1, 50):
        u = _uniforms(keys, torch.full_like(keys, t))
        counts = torch.histc(u, bins=10, min=0.0, max=1.0)
        assert ((counts - 1000).abs() < 150).all(), counts
        assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert _row_key(7, 1, 0) != _row_key(7, 0, 1) != _row_key(8, 0, 1)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    u = _uniforms(keys, torch.zeros_like(keys))
    picked = sample_next(torch.log(probs).repeat(len(keys), 1), 1.0, 1.0, 0, u)
    freq = torch.bincount(picked, minlength=4).float() / len(keys)
    assert (freq - probs).abs().max().item() < 0.02


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    hf, args = tiny_hf_model("mistral-tiny", sliding_window=6)
    root = tmp_path_factory.mktemp("mistral")
    hf.save_pretrained(root / "hf")
    sd, args = load_source(str(root / "hf"))
    save_meta(sd, args, str(root / "tp1"), n=1)
    return load_model(str(root / "tp1")).eval()


def test_sliding_window_slots_equal_a_fresh_forward(windowed):
    m = windowed
    assert m.args.sliding_window == 6
    prompts = _many_prompts(m.args.vocab_size)[:5]
    out = generate(m, prompts, NEW, eos_id=-1, max_batch=2)
    assert out.tokens == generate(m, prompts, NEW, eos_id=-1, max_batch=1).tokens
    for p, toks in zip(prompts, out.tokens):  # greedy: every token is the argmax of a fresh forward
        with torch.no_grad():
            logits = m(torch.tensor([p + toks]))[0, len(p) - 1:-1]
        assert logits.argmax(-1).tolist() == toks
    _assert_fresh_logprobs(m, prompts, out)


def test_finish_codes_read_every_few_steps_give_the_same_rows(cases, monkeypatch):
    """The accelerator schedule (finished rows seen only every k-th step, idling meanwhile) on CPU."""
    import llama_rlhf.generation as generation

    c = cases["llama"]
    m = c["model"]
    prompts = _many_prompts(m.args.vocab_size)
    kw = dict(temperature=1.0, seed=3, max_seq_len=SEQ, num_samples=2)
    eos = _common_token(generate(m, prompts, NEW, eos_id=-1, **kw).tokens)
    every_step = [generate(m, prompts, NEW, eos_id=eos, max_batch=b, **kw) for b in (3, None)]
    monkeypatch.setattr(generation, "_CPU_SYNC_EVERY", 5)
    for b, ref in zip((3, None), every_step):
        out = generate(m, prompts, NEW, eos_id=eos, max_batch=b, **kw)
        assert (out.tokens, out.finish_reasons) == (ref.tokens, ref.finish_reasons)
        # Log-probs agree to rounding: the batch each step runs differs (idle rows), not the math.
        assert max(abs(a - b) for x, y in zip(out.logprobs, ref.logprobs) for a, b in zip(x, y)) <= 1e-5
    assert "eos" in every_step[0].finish_reasons


@pytest.mark.parametrize("pack_limit", [generation._PACK_MAX_BYTES, 0], ids=["packed", "unpacked"])
def test_cpu_linears_compute_each_linear_as_its_own_forward(monkeypatch, pack_limit):
    """The oneDNN GEMMs that generation swaps in (weights pre-packed for 16 rows, or not) give the
    modules' own F.linear outputs at any row count, with and without a bias, and are undone after."""
    monkeypatch.setattr(generation, "_PACK_MAX_BYTES", pack_limit)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 8, bias=False))
    xs = [torch.randn(n, 24) for n in (1, 5, 64, 300)] + [torch.randn(3, 1, 24)]
    with torch.no_grad():
        want = [net(x) for x in xs]
        with cpu_linears(net, torch.device("cpu"), rows=16):
            if not generation._onednn_works():
                pytest.skip("this torch has no oneDNN linear")
            assert all("forward" in m.__dict__ for m in net)
            got = [net(x) for x in xs]
    assert not any("forward" in m.__dict__ for m in net)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
