"""Tokenizer interface: both backends, the loader, save/load round trips, the SP trainer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from llama_rlhf.tokenizers import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, HFTokenizer, SentencePieceTokenizer,
                                   load_tokenizer, save_tokenizer, train_sentencepiece)
from tests.fakes import corpus, tiny_hf_tokenizer, tiny_sentencepiece

TEXT = "Tom has 3 bags with 4 apples each, so he has 3 * 4 = 12 apples.\nTherefore, the answer is 12."
ODD = "  Über  spaces\n\ttab ☃ $1,000.50 "


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory) -> str:
    return tiny_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    return tiny_hf_tokenizer(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module", params=["sp", "hf"])
def tok(request, sp_path, hf_dir):
    return load_tokenizer(sp_path if request.param == "sp" else hf_dir)


def test_special_ids_are_distinct_and_valid(tok):
    ids = [tok.bos_id, tok.eos_id, tok.pad_id]
    assert len(set(ids)) == 3 and all(0 <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize("text", [TEXT, ODD, "", "#### -72"])
def test_round_trip(tok, text):
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text


def test_encode_flags(tok):
    plain = tok.encode(TEXT, bos=False)
    assert tok.encode(TEXT) == [tok.bos_id, *plain]
    assert tok.encode(TEXT, bos=False, eos=True) == [*plain, tok.eos_id]
    assert tok.bos_id not in plain and tok.eos_id not in plain


def test_decode_drops_specials_and_out_of_range_ids(tok):
    ids = tok.encode(TEXT, bos=False)
    noisy = [tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id, tok.vocab_size + 5]
    assert tok.decode(noisy) == TEXT


def test_sp_layout_and_digits(sp_path):
    tok = SentencePieceTokenizer(sp_path)
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("1234567890", bos=False)]
    assert [p.lstrip("▁") for p in pieces if p.lstrip("▁")] == list("1234567890")
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_train_is_deterministic_and_checks_vocab(tmp_path):
    texts = corpus(50)
    a = Path(train_sentencepiece(texts, str(tmp_path / "a"), 320)).read_bytes()
    b = Path(train_sentencepiece(texts, str(tmp_path / "sub/b"), 320)).read_bytes()
    assert a == b
    with pytest.raises(ValueError, match="vocab_size 270 too small"):
        train_sentencepiece(texts, str(tmp_path / "c"), 270)


def test_llama_style_model_without_pad_falls_back_to_eos(tmp_path):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(20)), model_prefix=str(tmp_path / "llama"),
                                   vocab_size=400, byte_fallback=True, pad_id=-1, minloglevel=2,
                                   hard_vocab_limit=False)
    tok = load_tokenizer(tmp_path / "llama.model")
    assert tok.sp.pad_id() == -1 and tok.pad_id == tok.eos_id == 2


def test_hf_chat_template_and_no_double_bos(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    chat = tok.apply_chat_template(msgs)
    assert chat == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant\n")
    ids = tok.encode(chat)
    assert ids.count(tok.bos_id) == 1 and tok.encode(tok.decode(ids)) == ids
    assert tok.encode("<s> hi").count(tok.bos_id) == 1


def test_hf_without_bos_or_pad(tmp_path, hf_dir):
    """Qwen-like: no bos token (encode adds none) and no pad token (pad falls back to eos)."""
    d = tmp_path / "qwenish"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(bos_token=None, pad_token=None, chat_template=None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.bos_id is None and tok.pad_id == tok.eos_id == 2
    assert tok.encode("hi", bos=True) == tok.encode("hi", bos=False)
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_loader_paths(tmp_path, sp_path, hf_dir):
    assert isinstance(load_tokenizer(sp_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(Path(hf_dir) / "tokenizer.json"), HFTokenizer)
    shutil.copy(sp_path, tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model: not a valid SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_save_then_load(tmp_path, kind, sp_path, hf_dir):
    tok = load_tokenizer(sp_path if kind == "sp" else hf_dir)
    ckpt = tmp_path / "ckpt"
    written = save_tokenizer(tok, ckpt)
    assert {p.name for p in written} == ({"tokenizer.model"} if kind == "sp"
                                         else {"tokenizer.json", "tokenizer_config.json"})
    back = load_tokenizer(ckpt)
    assert type(back) is type(tok) and back.encode(ODD, eos=True) == tok.encode(ODD, eos=True)
    save_tokenizer(back, ckpt)  # saving onto its own files is a no-op, not an error
    if kind == "hf":
        assert back.apply_chat_template([{"role": "user", "content": "x"}]).startswith("<|im_start|>")


def test_save_refuses_to_mix_tokenizers(tmp_path, sp_path, hf_dir):
    save_tokenizer(load_tokenizer(hf_dir), tmp_path)
    with pytest.raises(ValueError, match="already holds a tokenizer.json"):
        save_tokenizer(load_tokenizer(sp_path), tmp_path)
