"""Solver evaluation (`solver_evaluate.py`): generate answers to labelled problems and score them.

    torchrun --nproc_per_node N solver_evaluate.py --task GSM8K --ckpt_dir DIR --log_dir DIR \
        --label_file test.json [--t 0.7 --num_samples 8]

Records are {"instruction", "label", ...}. Data-parallel replicas take every dp_size-th
record, each replica's tensor-parallel ranks generate together, and rank 0 writes
`log_dir/results.json`. Prompts are encoded as the trainers encode them (data/encoding.py:
`--template plain|chat`, `--system_prompt`, `--prompt_suffix`, defaulting to what the
checkpoint records), optionally after `--fewshot K` exemplars drawn with `--seed` from
`--fewshot_file`. Each answer is graded three ways: `accuracy` (the marker "the answer is" /
"####", else the last number), `strict_accuracy` (marker required) and `flexible_accuracy`
(the last number).

Prompts longer than `max_seq_len - max_new_tokens` tokens are truncated from the left
(BOS kept), so every answer gets its full token budget; the count is logged and written
as `truncated` in results.json.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from .. import parallel
from ..checkpoint import load_model, shard_files
from ..config import flag
from ..data.encoding import PLAIN, PromptFlags, PromptFormat, encode_prompt, fewshot_exemplars, left_truncate
from ..errors import MissingPathError, UsageError
from ..records import DataError, load_records, write_json_atomic
from ..generation import generate
from ..log import get_logger
from ..tokenizers import load_tokenizer
from .best_of_n import rerank_with_verifier
from ..tasks.gsm8k import extract_answer, extract_flexible, extract_strict, is_correct, majority_vote

TASKS = ("GSM8K",)
log = get_logger(__name__)


def encode_prompts(tokenizer, instructions: list[str], max_prompt_len: int,
                   fmt: PromptFormat = PLAIN) -> tuple[list[list[int]], int]:
    """Prompt ids of each instruction, left-truncated to `max_prompt_len` (BOS kept); and how many were cut."""
    if max_prompt_len < 1:
        raise UsageError(f"no room for a prompt: max_seq_len - max_new_tokens = {max_prompt_len}")
    full = [encode_prompt(tokenizer, ins, fmt) for ins in instructions]
    prompts = [left_truncate(ids, max_prompt_len, tokenizer.bos_id) for ids in full]
    return prompts, sum(len(a) != len(b) for a, b in zip(full, prompts))


def _generate(model, tokenizer, instructions: list[str], max_new_tokens: int, temperature: float, top_p: float,
              top_k: int, num_samples: int, max_batch_size: int, seed: int, max_seq_len: Optional[int],
              progress: bool, fmt: PromptFormat = PLAIN) -> tuple[list[list[str]], int]:
    if max_batch_size < 1:
        raise UsageError(f"--max_batch_size must be >= 1, got {max_batch_size}")
    if num_samples < 1:
        raise UsageError(f"--num_samples must be >= 1, got {num_samples}")
    limit = max_seq_len or model.args.max_seq_len
    if max_new_tokens >= limit:
        raise UsageError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in --max_seq_len {limit}")
    prompts, truncated = encode_prompts(tokenizer, instructions, limit - max_new_tokens, fmt)
    # Longest prompts first (less padding per prefill block). One continuously batched call:
    # max_batch_size rows at a time, each prompt prefilled once for its K samples.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[list[str]] = [[""] * num_samples for _ in prompts]
    bar = tqdm(total=len(order) * num_samples, desc="generating", unit="seq",
               disable=not (progress and parallel.is_main()))
    out = generate(model, [prompts[i] for i in order], max_new_tokens, tokenizer.stop_ids, temperature=temperature,
                   top_p=top_p, top_k=top_k, seed=seed, max_seq_len=limit, num_samples=num_samples,
                   max_batch=max_batch_size, progress=bar.update)
    for j, toks in enumerate(out.tokens):
        texts[order[j // num_samples]][j % num_samples] = tokenizer.decode(toks)
    bar.close()
    return texts, truncated


def generate_texts(model, tokenizer, instructions: list[str], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, num_samples: int = 1, max_batch_size: int = 64,
                   seed: int = 0, max_seq_len: Optional[int] = None, fmt: PromptFormat = PLAIN) -> list[list[str]]:
    """Per instruction, `num_samples` generated answer texts (EOS dropped), in input order.

    Prompts are encoded in `fmt`; too-long prompts are left-truncated (see the module
    docstring). Every TP rank of a replica must call it with the same input."""
    texts, truncated = _generate(model, tokenizer, instructions, max_new_tokens, temperature, top_p, top_k,
                                 num_samples, max_batch_size, seed, max_seq_len, progress=False, fmt=fmt)
    if truncated and parallel.is_main():
        log.warning(f"{truncated} prompt(s) longer than max_seq_len - max_new_tokens were left-truncated")
    return texts


def score_item(instruction: str, outputs: list[str], label: str) -> dict:
    """One record's scored result; the first output is the one `accuracy` counts."""
    predicts = [extract_answer(t) for t in outputs]
    item = {"instruction": instruction, "output": outputs[0], "predict": predicts[0], "label": label,
            "correct": is_correct(predicts[0], label),
            "strict_correct": is_correct(extract_strict(outputs[0]), label),
            "flexible_correct": is_correct(extract_flexible(outputs[0]), label)}
    if len(outputs) > 1:
        majority = majority_vote(predicts)
        item.update(outputs=outputs, predicts=predicts, majority=majority,
                    majority_correct=is_correct(majority, label),
                    any_correct=any(is_correct(p, label) for p in predicts))
    return item


def summarize(items: list[dict], num_samples: int, truncated: int = 0) -> dict:
    total = len(items)
    correct = sum(it["correct"] for it in items)
    any_ok = sum(it.get("any_correct", it["correct"]) for it in items)
    majority = sum(it.get("majority_correct", it["correct"]) for it in items)
    rate = {k: sum(it.get(f"{k}_correct", it["correct"]) for it in items) / total if total else 0.0
            for k in ("strict", "flexible")}
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "strict_accuracy": rate["strict"], "flexible_accuracy": rate["flexible"],
            "missing": sum(it["predict"] is None for it in items), "num_samples": num_samples,
            "pass@k": any_ok / total if total else 0.0,
            "majority_accuracy": majority / total if total else 0.0,
            "truncated": truncated, "items": items}


@dataclass
class EvalConfig(PromptFlags):
    """`solver_evaluate.py`'s flags (and the prompt flags of data/encoding.py)."""
    ckpt_dir: str = flag(path="dir")
    label_file: str = flag(path="file")
    log_dir: str = flag()
    task: str = "GSM8K"  # one of TASKS, any case (validate)
    model_type: Optional[str] = None
    tokenizer_file: Optional[str] = flag(None, path="any")  # default: the tokenizer in --ckpt_dir
    max_batch_size: int = 384
    max_new_tokens: int = 256
    max_seq_len: Optional[int] = None
    t: float = 0.0  # temperature; 0 is greedy
    p: float = 1.0  # top-p
    top_k: int = 0
    num_samples: int = 1
    limit: Optional[int] = None  # the first N records only
    seed: int = 0
    verifier_ckpt_dir: Optional[str] = flag(None, path="dir")  # rerank the samples: best-of-K
    reduce: str = flag("last", choices=("last", "mean"))
    fewshot: int = 0  # exemplars before each question, drawn with --seed from --fewshot_file
    fewshot_file: Optional[str] = flag(None, path="file")  # e.g. the train split, never the file evaluated

    def validate(self) -> None:
        checks = [(self.task.upper() in TASKS, f"--task {self.task!r} is not supported; expected one of "
                                               f"{', '.join(TASKS)}"),
                  (self.max_batch_size >= 1, f"--max_batch_size must be >= 1, got {self.max_batch_size}"),
                  (self.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {self.max_new_tokens}"),
                  (self.t >= 0, f"--t (temperature) must be >= 0, got {self.t}"),
                  (0 < self.p <= 1, f"--p (top-p) must be in (0, 1], got {self.p}"),
                  (self.top_k >= 0, f"--top_k must be >= 0, got {self.top_k}"),
                  (self.num_samples >= 1, f"--num_samples must be >= 1, got {self.num_samples}"),
                  (self.num_samples == 1 or self.t > 0, f"--num_samples {self.num_samples} with --t 0 (greedy) "
                                                        f"would repeat one answer; set --t > 0 to sample"),
                  (self.limit is None or self.limit >= 1, f"--limit must be >= 1, got {self.limit}"),
                  (self.fewshot >= 0, f"--fewshot must be >= 0, got {self.fewshot}"),
                  (self.fewshot == 0 or self.fewshot_file, "--fewshot needs --fewshot_file (the records to draw from)")]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)


def load_labelled(label_file: str, limit: Optional[int] = None) -> list[dict]:
    """{"instruction": str, "label": str|number} records, checked, the first `limit` of them."""
    records = load_records(label_file, required=("instruction", "label"))
    for i, r in enumerate(records):
        if not isinstance(r["instruction"], str) or not r["instruction"].strip():
            raise DataError(f"{label_file}: record index {i}: 'instruction' must be a non-empty string")
        if not isinstance(r["label"], (str, int, float)) or isinstance(r["label"], bool) or r["label"] == "":
            raise DataError(f"{label_file}: record index {i}: 'label' must be a number or a non-empty string")
    return records[:limit] if limit else records


def _items(model, tokenizer, records: list[dict], temperature: float, top_p: float, num_samples: int,
           max_new_tokens: int, top_k: int, max_batch_size: int, seed: int,
           max_seq_len: Optional[int], fmt: PromptFormat) -> tuple[list[dict], int]:
    """Generate for every record (DP ranks take strided records) and score; identical on all ranks."""
    mine = list(range(parallel.dp_rank(), len(records), parallel.dp_size()))
    texts, truncated = _generate(model, tokenizer, [records[i]["instruction"] for i in mine], max_new_tokens,
                                 temperature, top_p, top_k, num_samples, max_batch_size, seed, max_seq_len,
                                 progress=True, fmt=fmt)
    local = [(i, score_item(records[i]["instruction"], outs, str(records[i]["label"]))) for i, outs in zip(mine, texts)]
    gathered = parallel.all_gather_objects((local, truncated))
    items: list = [None] * len(records)
    for part, _ in gathered:
        for i, item in part:
            items[i] = item
    return items, sum(n for _, n in gathered)


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate a solver checkpoint; returns the results dict (on every rank) that rank 0 writes.

    With `verifier_ckpt_dir`, the K samples of each question are also reranked by the
    verifier: `results["best_of_n"]` has greedy, majority, best-of-K and pass@K accuracy."""
    cfg.validate()
    records = load_labelled(cfg.label_file, cfg.limit)
    if not os.path.isdir(cfg.ckpt_dir):
        raise MissingPathError(f"--ckpt_dir {cfg.ckpt_dir}: no such directory")
    parallel.init(tp=len(shard_files(cfg.ckpt_dir)) or 1)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer_file or cfg.ckpt_dir)
    except FileNotFoundError as e:
        raise MissingPathError(f"{e} (pass --tokenizer_file)" if not cfg.tokenizer_file else str(e)) from None
    shots = fewshot_exemplars(cfg.fewshot_file, cfg.fewshot, cfg.seed) if cfg.fewshot else ()
    return _run(cfg, tokenizer, records, cfg.prompt_format(cfg.ckpt_dir, shots))


def _run(cfg: EvalConfig, tokenizer, records: list[dict], fmt: PromptFormat) -> dict:
    """Load the solver, generate, score, rerank (with a verifier) and write results.json on rank 0."""
    model = load_model(cfg.ckpt_dir, cfg.model_type, role="solver").eval()
    if cfg.max_seq_len is not None and cfg.max_seq_len > model.args.max_seq_len:
        raise UsageError(f"--max_seq_len {cfg.max_seq_len} exceeds the checkpoint's max_seq_len "
                         f"{model.args.max_seq_len}")
    t, p, top_k, num_samples, log_dir = cfg.t, cfg.p, cfg.top_k, cfg.num_samples, cfg.log_dir
    log.info(f"evaluating {cfg.ckpt_dir} on {len(records)} records of {cfg.label_file} "
             f"(TP {parallel.tp_size()}, DP {parallel.dp_size()}, {'greedy' if t == 0 else f't={t} p={p} top_k={top_k}'}, "
             f"{num_samples} sample(s))")
    gen = dict(max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, max_batch_size=cfg.max_batch_size, seed=cfg.seed,
               max_seq_len=cfg.max_seq_len, fmt=fmt)
    items, truncated = _items(model, tokenizer, records, temperature=t, top_p=p, num_samples=num_samples, **gen)
    results = summarize(items, num_samples, truncated)
    if cfg.verifier_ckpt_dir:
        if num_samples > 1:  # greedy beside the samples, so the report compares them side by side
            greedy, _ = _items(model, tokenizer, records, temperature=0.0, top_p=1.0, num_samples=1, **gen)
            for item, g in zip(items, greedy):
                item["greedy"], item["greedy_correct"] = g["output"], g["correct"]
        del model
        results["best_of_n"] = rerank_with_verifier(cfg.verifier_ckpt_dir, items, cfg.max_batch_size, cfg.reduce)
    results["config"] = {"task": cfg.task.upper(), "ckpt_dir": cfg.ckpt_dir, "label_file": cfg.label_file,
                         "t": cfg.t, "p": cfg.p, "top_k": cfg.top_k, "max_new_tokens": cfg.max_new_tokens,
                         "seed": cfg.seed, "prompt": fmt.recorded(), "fewshot": cfg.fewshot}
    if parallel.is_main():
        if results["truncated"]:
            log.warning(f"{results['truncated']} prompt(s) longer than max_seq_len - max_new_tokens "
                        f"were left-truncated")
        path = os.path.join(log_dir, "results.json")
        write_json_atomic(results, path)
        log.info(f"accuracy {results['accuracy']:.4f} ({results['correct']}/{results['total']}, strict "
                 f"{results['strict_accuracy']:.4f}, flexible {results['flexible_accuracy']:.4f}, "
                 f"{results['missing']} without an answer)"
                 + (f", pass@{num_samples} {results['pass@k']:.4f}, majority {results['majority_accuracy']:.4f}"
                    if num_samples > 1 else "") + f" -> {path}")
    parallel.barrier()
    return results
