"""tiktoken BPE files (Llama-3's tokenizer.model, Qwen-1's qwen.tiktoken) behind the Tokenizer
interface: tiny files written here (the 256 bytes plus a few merges), ids worked out by hand and
checked against a tiktoken.Encoding built here, special ids, BOS, save / load, bad files."""
import base64
import json
from pathlib import Path

import pytest
import tiktoken

from llama_rlhf.errors import UsageError
from llama_rlhf.tokenizers import TiktokenTokenizer, load_tokenizer, save_tokenizer

# Byte b has rank b; the merges follow in this order (rank 256, 257, ...).
MERGES = [b"he", b"ll", b"hell", b" w", b"or", b" wor", b"ld", b" world", b"12"]
N = 256 + len(MERGES)  # the first special id
HELL, WORLD, TWELVE = 258, 263, 264
# The split regexes as the two model cards give them (written out here, not taken from the library).
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = ["hello world", "hello  world\n\nhell 1234 héllo 世界!", "x=12;\ty'll", ""]


def ranks() -> dict[bytes, int]:
    return {bytes([b]): b for b in range(256)} | {m: 256 + i for i, m in enumerate(MERGES)}


def write_bpe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks().items()))
    return path


def llama3_specials() -> dict[str, int]:
    names = ["<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(4)),
             "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
             *(f"<|reserved_special_token_{i}|>" for i in range(5, 251))]
    return {name: N + i for i, name in enumerate(names)}


def qwen_specials() -> dict[str, int]:
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205))]
    return {name: N + i for i, name in enumerate(names)}


def reference(pat: str, specials: dict[str, int]) -> tiktoken.Encoding:
    return tiktoken.Encoding("test", pat_str=pat, mergeable_ranks=ranks(), special_tokens=specials)


def test_llama3_tokenizer_model(tmp_path):
    tok = load_tokenizer(write_bpe(tmp_path / "tokenizer.model"))
    assert isinstance(tok, TiktokenTokenizer) and tok.flavour.name == "llama3"
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.pad_id) == (N, N + 1, N + 256, N + 1)
    assert tok.encode("hello world") == [N, HELL, ord("o"), WORLD]  # hell + o, then " world" merged whole
    assert tok.encode("hello world", bos=False, eos=True) == [HELL, ord("o"), WORLD, N + 1]
    assert tok.encode("1234", bos=False) == [TWELVE, ord("3"), ord("4")]  # digits grouped by 3: "123" "4"
    assert tok.encode("<|begin_of_text|>hi") == [N, ord("h"), ord("i")]  # a BOS in the text is not doubled
    assert tok.encode("<|eot_id|>", bos=False) == [N + 9] and N + 9 in tok.stop_ids
    assert llama3_specials()["<|reserved_special_token_250|>"] == tok.vocab_size - 1
    ref = reference(LLAMA3_PAT, llama3_specials())
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        assert ids == ref.encode(text, allowed_special="all") and tok.decode(tok.encode(text)) == text


def test_qwen1_tiktoken(tmp_path):
    path = write_bpe(tmp_path / "qwen.tiktoken")
    for tok in (load_tokenizer(path), load_tokenizer(tmp_path)):
        assert isinstance(tok, TiktokenTokenizer) and tok.flavour.name == "qwen1"
        assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (None, N, N + 208)
        assert tok.encode("hello world") == [HELL, ord("o"), WORLD]  # no BOS
        assert tok.encode("1234") == [ord(c) for c in "1234"]  # Qwen-1 splits every digit
        assert tok.encode("<|im_start|>a<|im_end|>") == [N + 1, ord("a"), N + 2] and N + 2 in tok.stop_ids
        assert tok.encode("<|extra_204|>") == [N + 207]
    ref = reference(QWEN_PAT, qwen_specials())
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, allowed_special="all") and tok.decode(tok.encode(text)) == text


def test_flavour_from_the_config_beside(tmp_path):
    write_bpe(tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen"}))
    assert load_tokenizer(tmp_path).flavour.name == "qwen1"


@pytest.mark.parametrize("name", ["tokenizer.model", "qwen.tiktoken"])
def test_save_and_load_round_trip(tmp_path, name):
    tok = load_tokenizer(write_bpe(tmp_path / "src" / name))
    written = save_tokenizer(tok, tmp_path / "ckpt")
    assert [p.name for p in written] == [name]
    back = load_tokenizer(tmp_path / "ckpt")
    assert isinstance(back, TiktokenTokenizer) and back.flavour == tok.flavour
    assert (back.bos_id, back.eos_id, back.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)
    assert all(back.encode(t) == tok.encode(t) for t in TEXTS)


def test_chat_template_only_from_a_tokenizer_config(tmp_path):
    tok = load_tokenizer(write_bpe(tmp_path / "qwen.tiktoken"))
    with pytest.raises(UsageError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(chat)[:1] == [N + 1] and set(tok.files) == {"qwen.tiktoken", "tokenizer_config.json"}
    save_tokenizer(tok, tmp_path / "ckpt")
    assert load_tokenizer(tmp_path / "ckpt").apply_chat_template([{"role": "user", "content": "hi"}]) == chat


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize("corrupt, words", [
    (lambda lines: [b"\x0a\x05\x00garbage\xff\xfe\n"], "SentencePiece"),  # a .model that is neither format
    (lambda lines: lines[:5] + [b"aGVsbG8=\n"] + lines[5:], ":6: not a tiktoken BPE line"),
    (lambda lines: lines[:-1] + [b"aGVsbG8= 9999\n"], "ranks must be"),
    (lambda lines: [b"aGk= 0\n"] + lines[1:], "single-byte"),  # "hi" in byte 0's place
])
def test_bad_file_is_one_line(tmp_path, corrupt, words):
    path = write_bpe(tmp_path / "tokenizer.model")
    path.write_bytes(b"".join(corrupt(_lines(path))))
    with pytest.raises(UsageError, match=words) as e:
        load_tokenizer(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
