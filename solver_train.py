"""Supervised fine-tuning of a solver (full or LoRA), tensor x data parallel.

    torchrun --nproc_per_node N solver_train.py --ckpt_dir DIR --save_dir DIR --train_file train.json \\
        --model_type llama-1-7b --max_batch_size 6 --lora_rank -1 [--epochs 1 --lr 1e-5 ...]

TP size = number of consolidated.NN.pth shards in --ckpt_dir; the rest of the world is DP.
--max_batch_size is the micro-batch per DP rank; the global batch is
max_batch_size x accumulation_steps x DP. Checkpoints: save_dir/epoch-N, save_dir/step-N;
--resume continues from the latest one. Metrics: save_dir/metrics.jsonl, save_dir/tb,
save_dir/loss.png.
"""
from typing import Optional

import fire

from llama_rlhf.cli import run_cli
from llama_rlhf.trainers.sft import train_sft


def _typed(flag: str, value, kind: type):
    if value is None:
        return None
    try:
        return kind(value) if kind is not bool else bool(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{flag} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def main(ckpt_dir: str, save_dir: str, train_file: str, model_type: Optional[str] = None,
         max_batch_size: int = 6, lora_rank: int = -1, lora_alpha: Optional[float] = None, epochs: int = 1,
         lr: float = 1e-5, max_seq_len: int = 512, accumulation_steps: int = 1, seed: int = 0,
         save_steps: int = 0, resume: bool = False, packing: bool = False, warmup_steps: int = 0,
         max_steps: int = -1, log_steps: int = 1, gradient_checkpointing: bool = False, schedule: str = "cosine",
         weight_decay: float = 0.0, max_grad_norm: float = 1.0, tokenizer_path: Optional[str] = None) -> None:
    kinds = {"max_batch_size": int, "lora_rank": int, "lora_alpha": float, "epochs": int, "lr": float,
             "max_seq_len": int, "accumulation_steps": int, "seed": int, "save_steps": int, "resume": bool,
             "packing": bool, "warmup_steps": int, "max_steps": int, "log_steps": int,
             "gradient_checkpointing": bool, "weight_decay": float, "max_grad_norm": float}
    given = dict(locals())
    given.pop("kinds")

    def run() -> None:  # conversions inside run_cli, so `--lr abc` is a one-line error too
        kw = {k: _typed(k, v, kinds[k]) if k in kinds else (None if v is None else str(v)) for k, v in given.items()}
        train_sft(**kw)

    run_cli(run)


if __name__ == "__main__":
    fire.Fire(main)
