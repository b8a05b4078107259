"""Prompt formats (data/encoding.py): chat templates rendered by the tokenizer, BOS conventions,
end-of-turn stop ids, the SFT loss mask on the reply, few-shot exemplars, and bad input.

The tokenizers here are word-level with a vocabulary written by hand, so every expected id
below is written by hand too, not computed by the code under test."""
import json
from pathlib import Path

import pytest

from llama_rlhf.data.encoding import (PLAIN, PromptFlags, PromptFormat, encode_prompt, encode_response,
                                      fewshot_exemplars, read_prompt_format)
from llama_rlhf.data.sft import SFTDataset
from llama_rlhf.errors import UsageError
from llama_rlhf.tokenizers import load_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
           "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

# id: token. Words and the whitespace runs between them are tokens of their own.
WORDS = ["<unk>", "\n", "\n\n", " ", "user", "assistant", "system", "What", "is", "2", "+", "3", "?", "It", "5",
         ".", "Be", "brief", "[INST]", "[/INST]", "Q", "A"]
SPECIALS = {"chatml": ["<|im_start|>", "<|im_end|>"],
            "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>"],
            "mistral": ["<s>", "</s>"]}


def word_tokenizer(root: Path, flavour: str, template: str | None) -> str:
    """A tokenizer.json whose ids are WORDS then the flavour's specials, + its config files."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = SPECIALS[flavour]
    vocab = {w: i for i, w in enumerate(WORDS + specials)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n\n|\n| |[A-Za-z\[\]/]+|\d|[^\sA-Za-z\d]"), "isolated")
    tok.decoder = decoders.Fuse()  # whitespace is in the tokens themselves
    tok.add_special_tokens(specials)
    bos = {"chatml": None, "llama3": "<|begin_of_text|>", "mistral": "<s>"}[flavour]
    if bos:  # Llama-3 and Mistral tokenizers prepend BOS themselves
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    out = root / flavour
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    eos = {"chatml": "<|im_end|>", "llama3": "<|end_of_text|>", "mistral": "</s>"}[flavour]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}
    if template:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    if flavour == "llama3":  # Llama-3-Instruct ends a turn with <|eot_id|>, listed beside eos
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [23, 26]}))
    return str(out)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"chatml": load_tokenizer(word_tokenizer(root, "chatml", CHATML)),
            "llama3": load_tokenizer(word_tokenizer(root, "llama3", LLAMA3)),
            "mistral": load_tokenizer(word_tokenizer(root, "mistral", MISTRAL)),
            "none": load_tokenizer(word_tokenizer(root / "none", "chatml", None))}


CHAT = PromptFormat("chat")
QUESTION, REPLY = "What is 2 + 3?", "It is 5."
# ids of QUESTION and REPLY in WORDS
Q_IDS, R_IDS = [7, 3, 8, 3, 9, 3, 10, 3, 11, 12], [13, 3, 8, 3, 14, 15]


def test_chatml_prompt_and_reply_ids(toks):
    tok = toks["chatml"]  # <|im_start|> 22, <|im_end|> 23; no BOS, as SmolLM2 / Qwen
    assert tok.bos_id is None and tok.stop_ids == [23]
    prompt = encode_prompt(tok, QUESTION, CHAT)
    assert prompt == [22, 4, 1, *Q_IDS, 23, 1, 22, 5, 1]
    # the reply and its end-of-turn, not the newline the template renders after it
    assert encode_response(tok, REPLY, CHAT, QUESTION) == [*R_IDS, 23]


def test_llama3_one_bos_and_eot_stops(toks):
    tok = toks["llama3"]  # begin 22, end 23, start_header 24, end_header 25, eot 26
    assert tok.bos_id == 22 and tok.stop_ids == [23, 26]
    prompt = encode_prompt(tok, QUESTION, CHAT)
    assert prompt == [22, 24, 4, 25, 2, *Q_IDS, 26, 24, 5, 25, 2]  # the template's BOS, not a second one
    assert encode_response(tok, REPLY, CHAT, QUESTION) == [*R_IDS, 26]
    assert tok.decode([*R_IDS, 26]) == REPLY


def test_system_prompt_and_plain_format(toks):
    tok = toks["chatml"]
    fmt = PromptFormat("chat", system_prompt="Be brief.")
    assert encode_prompt(tok, QUESTION, fmt)[:7] == [22, 6, 1, 16, 3, 17, 15]
    plain = toks["llama3"]
    assert encode_prompt(plain, QUESTION) == [22, *Q_IDS, 1]  # instruction + newline after the tokenizer's BOS
    assert encode_response(plain, REPLY) == [*R_IDS, 23]  # answer + eos


def test_sft_loss_falls_on_the_reply_and_end_of_turn_only(toks):
    for name, eot in (("chatml", 23), ("llama3", 26)):
        ds = SFTDataset([{"instruction": QUESTION, "output": [REPLY]}], toks[name], 64, fmt=CHAT)
        s = ds.sample(0, 0)
        assert [t for t, m in zip(s.targets, s.mask) if m] == [*R_IDS, eot], name
        prompt = encode_prompt(toks[name], QUESTION, CHAT)
        assert s.tokens[:len(prompt)] == prompt and not any(s.mask[:len(prompt) - 1])


def test_fewshot_turns_and_blocks(toks, tmp_path):
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"instruction": "Q", "output": ["A"], "label": "1"}] * 3))
    shots = fewshot_exemplars(str(train), 2, seed=0)
    assert shots == (("Q", "A"), ("Q", "A"))
    chat = encode_prompt(toks["chatml"], QUESTION, PromptFormat("chat", fewshot=shots))
    turn = [22, 4, 1, 20, 23, 1, 22, 5, 1, 21, 23, 1]  # user Q, assistant A
    assert chat == [*turn, *turn, 22, 4, 1, *Q_IDS, 23, 1, 22, 5, 1]
    plain = encode_prompt(toks["chatml"], QUESTION, PromptFormat(fewshot=shots[:1]))
    assert plain == [20, 1, 21, 2, *Q_IDS, 1]
    with pytest.raises(UsageError, match=r"--fewshot 4 is larger than --fewshot_file .*train.json \(3 records\)"):
        fewshot_exemplars(str(train), 4)


def test_prompt_suffix_is_appended_to_every_question(toks):
    ids = encode_prompt(toks["chatml"], QUESTION, PromptFormat("chat", prompt_suffix=" Be brief."))
    assert ids[3:3 + len(Q_IDS) + 5] == [*Q_IDS, 3, 16, 3, 17, 15]


def test_bad_templates_are_one_line(toks):
    with pytest.raises(UsageError, match="refuses this conversation.*System role not supported"):
        encode_prompt(toks["mistral"], QUESTION, PromptFormat("chat", system_prompt="Be brief."))
    assert encode_prompt(toks["mistral"], QUESTION, CHAT)[0] == 22  # without a system message it renders
    with pytest.raises(UsageError, match="no chat_template"):
        encode_prompt(toks["none"], QUESTION, CHAT)
    with pytest.raises(UsageError, match="--system_prompt needs --template chat"):
        PromptFormat("plain", system_prompt="x")


def test_recorded_format_is_the_default(tmp_path):
    (tmp_path / "prompt.json").write_text(json.dumps({"template": "chat", "system_prompt": "S", "prompt_suffix": "!"}))
    assert PromptFlags().prompt_format(str(tmp_path)) == PromptFormat("chat", "S", "!")
    assert PromptFlags(template="plain").prompt_format(str(tmp_path)) == PromptFormat("plain", None, "!")
    assert PromptFlags(prompt_suffix="").prompt_format(str(tmp_path)) == PromptFormat("chat", "S", "")
    assert PromptFlags().prompt_format(str(tmp_path / "none")) == PLAIN
    assert read_prompt_format(str(tmp_path)) == PromptFormat("chat", "S", "!").recorded()


def test_chat_format_is_recorded_and_later_stages_default_to_it(toks, tmp_path, caplog):
    """solver_train --template chat records prompt.json; evaluation then encodes chat by
    default; bad --fewshot / --template values through the CLI are one line and exit 2."""
    import fire
    import torch

    from llama_rlhf.checkpoint import save_meta
    from llama_rlhf.evaluation.evaluate import EvalConfig, evaluate
    from llama_rlhf.models import build_model, preset_args
    from llama_rlhf.trainers.sft import SFTConfig, train_sft
    from tests.test_cli import _main

    tok_dir = word_tokenizer(tmp_path, "chatml", CHATML)
    args = preset_args("llama-tiny", vocab_size=32, max_seq_len=64)
    save_meta(build_model(args, init_seed=0).state_dict(), args, str(tmp_path / "base"), 1, tokenizer_path=tok_dir)
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"instruction": QUESTION, "output": [REPLY], "label": "5"}] * 4))
    torch.manual_seed(0)
    out = train_sft(SFTConfig(ckpt_dir=str(tmp_path / "base"), save_dir=str(tmp_path / "sft"), train_file=str(data),
                              max_steps=1, max_batch_size=2, template="chat", system_prompt="Be brief.",
                              progress=False))
    assert json.loads(Path(out, "prompt.json").read_text()) == {
        "template": "chat", "system_prompt": "Be brief.", "prompt_suffix": ""}
    res = evaluate(EvalConfig(out, str(data), str(tmp_path / "eval"), max_new_tokens=4, limit=1))
    assert res["config"]["prompt"]["template"] == "chat" and "strict_accuracy" in res
    argv = ["--ckpt_dir", out, "--log_dir", str(tmp_path / "e2"), "--label_file", str(data), "--max_new_tokens", "4"]
    plain_tok = word_tokenizer(tmp_path / "none", "chatml", None)
    for extra, says in ((["--fewshot", "9", "--fewshot_file", str(data)], "--fewshot 9 is larger than --fewshot_file"),
                        (["--tokenizer_file", plain_tok, "--template", "chat"], "has no chat_template")):
        caplog.clear()
        with pytest.raises(SystemExit) as exc:
            fire.Fire(_main("solver_evaluate.py"), command=[*argv, *extra])
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert exc.value.code == 2 and len(errors) == 1 and says in errors[0], errors
