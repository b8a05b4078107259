"""Train a verifier (outcome reward model) from a solver checkpoint, tensor x data parallel.

    torchrun --nproc_per_node N verifier_train.py --ckpt_dir SOLVER_DIR --save_dir DIR \\
        --train_file pairs.json --model_type llama-1-7b --max_batch_size 6 --lora_rank -1 \\
        [--loss pairwise|logexpwithlm|pointwise --lm_coef 0.1 --reduce last|mean --packing \\
         --label_file held_out_pairs.json --epochs 1 --lr 1e-5 ...]

--ckpt_dir must be a SOLVER checkpoint (a verifier dir is refused); a scalar head is attached
(seeded by --seed) and every checkpoint written (save_dir/epoch-N, save_dir/step-N) is a
verifier (params.json has reward_head). --resume continues from the latest checkpoint in
--save_dir; pass the same solver --ckpt_dir as the first run. --max_batch_size counts pairs
per micro-batch per DP rank. Records: pairwise {"instruction", "chosen": [...], "rejected":
[...], "margin"?} (dataset/make_pairs.py builds them) or, for --loss pointwise, also
{"instruction", "output", "label": 0|1}. --label_file: held-out pairs scored after each epoch
(eval/accuracy, eval/margin, eval/reward_mean, eval/reward_std in save_dir/metrics.jsonl).
"""
from typing import Optional

import fire

from llama_rlhf.cli import run_cli
from llama_rlhf.trainers.verifier import train_verifier


def main(ckpt_dir: str, save_dir: str, train_file: str, model_type: Optional[str] = None,
         max_batch_size: int = 6, loss: str = "pairwise", lm_coef: float = 0.0, reduce: str = "last",
         packing: bool = False, label_file: Optional[str] = None, lora_rank: int = -1,
         lora_alpha: Optional[float] = None, epochs: int = 1, lr: float = 1e-5, max_seq_len: int = 512,
         accumulation_steps: int = 1, seed: int = 0, save_steps: int = 0, resume: bool = False,
         warmup_steps: int = 0, max_steps: int = -1, log_steps: int = 1, gradient_checkpointing: bool = False,
         schedule: str = "cosine", weight_decay: float = 0.0, max_grad_norm: float = 1.0,
         tokenizer_path: Optional[str] = None, eval_batch_size: Optional[int] = None) -> None:
    run_cli(train_verifier, ckpt_dir=str(ckpt_dir), save_dir=str(save_dir), train_file=str(train_file),
            model_type=model_type, max_batch_size=int(max_batch_size), loss=str(loss), lm_coef=float(lm_coef),
            reduce=str(reduce), packing=bool(packing), label_file=None if label_file is None else str(label_file),
            lora_rank=int(lora_rank), lora_alpha=lora_alpha, epochs=int(epochs), lr=float(lr),
            max_seq_len=int(max_seq_len), accumulation_steps=int(accumulation_steps), seed=int(seed),
            save_steps=int(save_steps), resume=bool(resume), warmup_steps=int(warmup_steps),
            max_steps=int(max_steps), log_steps=int(log_steps), gradient_checkpointing=bool(gradient_checkpointing),
            schedule=str(schedule), weight_decay=float(weight_decay), max_grad_norm=float(max_grad_norm),
            tokenizer_path=tokenizer_path, eval_batch_size=eval_batch_size)


if __name__ == "__main__":
    fire.Fire(main)
