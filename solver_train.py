"""Supervised fine-tuning of a solver (full or LoRA), tensor x data parallel.

    torchrun --nproc_per_node N solver_train.py --ckpt_dir DIR --save_dir DIR --train_file train.json \\
        --model_type llama-1-7b --max_batch_size 6 --lora_rank -1 [--epochs 1 --lr 1e-5 ...]

TP size = number of consolidated.NN.pth shards in --ckpt_dir; the rest of the world is DP.
--max_batch_size is the micro-batch per DP rank; the global batch is
max_batch_size x accumulation_steps x DP. Checkpoints: save_dir/epoch-N, save_dir/step-N;
--resume continues from the latest one. Metrics: save_dir/metrics.jsonl, save_dir/tb,
save_dir/loss.png.
"""
import fire

from llama_rlhf.cli import command
from llama_rlhf.trainers.sft import SFTConfig, train_sft

main = command(SFTConfig, train_sft, __doc__)

if __name__ == "__main__":
    fire.Fire(main)
