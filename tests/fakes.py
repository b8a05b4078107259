"""Tiny tokenizers for tests, built in milliseconds from arithmetic word-problem text."""
from __future__ import annotations

import json
from pathlib import Path

from llama_rlhf.data.synthetic import make_problems
from llama_rlhf.tokenizers import train_sentencepiece

# ChatML, as Qwen uses: role markers are special tokens, so templates tokenize predictably.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HF_SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4 in this order


def corpus(n: int = 200, seed: int = 0) -> list[str]:
    """Questions and solutions of synthetic problems, plus GSM8K-like phrasing."""
    problems = make_problems(n, seed)
    extra = ["The answer is 42.", "Natalia sold 48/2 = 24 clips in May.", "#### 72",
             "Weng earns $12 an hour, so she earned 0.2 x 50 = $10.", "Betty needs 100 - 50 = 50 more."]
    return [p["instruction"] for p in problems] + [p["output"][0] for p in problems] + extra


def tiny_sentencepiece(tmp_dir: str | Path, vocab_size: int = 384) -> str:
    """Train a tiny SentencePiece model (ids: unk 0, bos 1, eos 2, pad 3); returns the .model path."""
    return train_sentencepiece(corpus(), str(Path(tmp_dir) / "tiny_sp"), vocab_size)


def tiny_hf_tokenizer(tmp_dir: str | Path, vocab_size: int = 400) -> str:
    """Write a byte-level BPE tokenizer.json + tokenizer_config.json (with a chat template)
    that AutoTokenizer loads; returns the directory. Ids: pad 0, bos 1, eos 2.

    Its post-processor adds <s> like Llama-3's does, so tests see whether callers double it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=HF_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    out = Path(tmp_dir) / "tiny_hf"
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "model_max_length": 4096, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return str(out)
