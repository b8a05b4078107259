"""Direct Preference Optimization of a solver on pairwise data, tensor x data parallel.

    torchrun --nproc_per_node N dpo_train.py --ckpt_dir SOLVER_DIR --save_dir DIR \\
        --train_file pairs.json --model_type llama-1-7b --max_batch_size 6 --lora_rank -1 \\
        [--beta 0.1 --loss sigmoid|ipo --label_smoothing 0.0 --reference_ckpt_dir DIR \\
         --label_file held_out_pairs.json --epochs 1 --lr 1e-6 ...]

The reference (default: the initial policy --ckpt_dir; else --reference_ckpt_dir, same TP
size) scores every pair once before training; its log-probs are cached and the reference is
freed. Metrics per step: loss, rewards/chosen, rewards/rejected, rewards/accuracy,
rewards/margin; with --label_file, after each epoch eval/logp_margin, eval/logp_accuracy,
eval/reward_margin, eval/reward_accuracy on the held-out pairs. Checkpoints are solvers.
"""
from typing import Optional

import fire

from llama_rlhf.cli import run_cli
from llama_rlhf.trainers.dpo import train_dpo


def main(ckpt_dir: str, save_dir: str, train_file: str, model_type: Optional[str] = None,
         reference_ckpt_dir: Optional[str] = None, label_file: Optional[str] = None, beta: float = 0.1,
         loss: str = "sigmoid", label_smoothing: float = 0.0, max_batch_size: int = 6, lora_rank: int = -1,
         lora_alpha: Optional[float] = None, epochs: int = 1, lr: float = 1e-6, max_seq_len: int = 512,
         accumulation_steps: int = 1, seed: int = 0, save_steps: int = 0, resume: bool = False,
         warmup_steps: int = 0, max_steps: int = -1, log_steps: int = 1, gradient_checkpointing: bool = False,
         schedule: str = "cosine", weight_decay: float = 0.0, max_grad_norm: float = 1.0,
         tokenizer_path: Optional[str] = None, eval_batch_size: Optional[int] = None) -> None:
    run_cli(train_dpo, ckpt_dir=str(ckpt_dir), save_dir=str(save_dir), train_file=str(train_file),
            model_type=model_type, reference_ckpt_dir=None if reference_ckpt_dir is None else str(reference_ckpt_dir),
            label_file=None if label_file is None else str(label_file), beta=float(beta), loss=str(loss),
            label_smoothing=float(label_smoothing), max_batch_size=int(max_batch_size), lora_rank=int(lora_rank),
            lora_alpha=lora_alpha, epochs=int(epochs), lr=float(lr), max_seq_len=int(max_seq_len),
            accumulation_steps=int(accumulation_steps), seed=int(seed), save_steps=int(save_steps),
            resume=bool(resume), warmup_steps=int(warmup_steps), max_steps=int(max_steps), log_steps=int(log_steps),
            gradient_checkpointing=bool(gradient_checkpointing), schedule=str(schedule),
            weight_decay=float(weight_decay), max_grad_norm=float(max_grad_norm), tokenizer_path=tokenizer_path,
            eval_batch_size=eval_batch_size)


if __name__ == "__main__":
    fire.Fire(main)
