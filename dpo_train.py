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
import fire

from llama_rlhf.cli import command
from llama_rlhf.trainers.dpo import DPOConfig, train_dpo

main = command(DPOConfig, train_dpo, __doc__)

if __name__ == "__main__":
    fire.Fire(main)
