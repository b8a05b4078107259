"""Evaluate a solver checkpoint on labelled problems (GSM8K) and write log_dir/results.json.

    torchrun --nproc_per_node N solver_evaluate.py --task GSM8K --ckpt_dir DIR --log_dir DIR \
        --label_file test.json --model_type llama-2-7b --max_batch_size 384 [--t 0.7 --num_samples 8]
        [--verifier_ckpt_dir VERIFIER]   # best-of-K reranking beside greedy / majority / pass@K

N = tensor-parallel size (shards in --ckpt_dir) x data-parallel replicas. --t 0 is greedy.
"""
import fire

from llama_rlhf.cli import command
from llama_rlhf.evaluation.evaluate import EvalConfig, evaluate

main = command(EvalConfig, evaluate, __doc__)

if __name__ == "__main__":
    fire.Fire(main)
