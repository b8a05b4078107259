"""Evaluate a solver checkpoint on labelled problems (GSM8K) and write log_dir/results.json.

    torchrun --nproc_per_node N solver_evaluate.py --task GSM8K --ckpt_dir DIR --log_dir DIR \
        --label_file test.json --model_type llama-2-7b --max_batch_size 384 [--t 0.7 --num_samples 8]
        [--verifier_ckpt_dir VERIFIER]   # best-of-K reranking beside greedy / majority / pass@K

N = tensor-parallel size (shards in --ckpt_dir) x data-parallel replicas. --t 0 is greedy.
"""
from typing import Optional

import fire

from llama_rlhf.cli import run_cli
from llama_rlhf.evaluation.evaluate import evaluate


def main(ckpt_dir: str, log_dir: str, label_file: str, task: str = "GSM8K", model_type: Optional[str] = None,
         tokenizer_file: Optional[str] = None, max_batch_size: int = 384, max_new_tokens: int = 256,
         max_seq_len: Optional[int] = None, t: float = 0.0, p: float = 1.0, top_k: int = 0, num_samples: int = 1,
         limit: Optional[int] = None, seed: int = 0,
         verifier_ckpt_dir: Optional[str] = None, reduce: str = "last") -> None:
    run_cli(evaluate, ckpt_dir=str(ckpt_dir), label_file=str(label_file), log_dir=str(log_dir), task=str(task),
            model_type=model_type, tokenizer_file=tokenizer_file, max_batch_size=max_batch_size,
            max_new_tokens=max_new_tokens, max_seq_len=max_seq_len, t=float(t), p=float(p), top_k=top_k,
            num_samples=num_samples, limit=limit, seed=seed,
            verifier_ckpt_dir=verifier_ckpt_dir, reduce=reduce)


if __name__ == "__main__":
    fire.Fire(main)
