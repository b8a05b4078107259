"""PPO with actor, critic, reference and reward model, buffer-based phases.

    torchrun --nproc_per_node N ppo_train.py --actor_ckpt_dir DIR --actor_save_dir DIR \
        --critic_ckpt_dir DIR --critic_save_dir DIR --reward_model_ckpt_dir DIR \
        --train_file prompts.json --label_file test.json --max_batch_size 6 --max_buffer_size 96 \
        [--placement flattening|interleaving|separation|auto] [--placement_file placement.json]

--placement decides which data-parallel replicas (TP groups) hold which model:
flattening (default) puts every model everywhere; interleaving splits the reference and
reward model over the two halves of the replicas; separation reads the replica sets from
--placement_file, e.g. {"actor": [0, 1], "critic": [2, 3], "reference": [2], "reward": [3],
"generator": []}; auto picks one from the model sizes and the memory per device. Every
placement computes the same updates; timeline.json / timeline.png in --actor_save_dir show
which phases ran where and when.
"""
import fire

from llama_rlhf.cli import command
from llama_rlhf.ppo.config import PPOConfig
from llama_rlhf.ppo.run import train_ppo

main = command(PPOConfig, train_ppo, __doc__)

if __name__ == "__main__":
    fire.Fire(main)
