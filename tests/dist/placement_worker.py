"""torchrun worker for tests/test_placement.py: the same PPO run under several placements.

    placement_worker.py ROOT OUT TP NAME=STRATEGY[:PLACEMENT_FILE] ...

For each case, two rounds of `train_ppo` (same seed, same data, an adaptive KL coefficient) with
`--save_buffer`, into OUT/NAME/{actor,critic}. The test compares the buffers and checkpoints with
flattening's: round 2's KL-shaped rewards use the coefficient adapted with round 1's KL over all
replicas, which flattening pools over DP and placed rounds over their shards.
"""
import sys

from llama_rlhf.ppo.config import PPOConfig
from llama_rlhf.ppo.run import train_ppo


def config(root: str, out: str, tp: int, strategy: str, placement_file: str | None) -> PPOConfig:
    return PPOConfig(actor_ckpt_dir=f"{root}/actor-tp{tp}", actor_save_dir=f"{out}/actor",
                     critic_ckpt_dir=f"{root}/critic-tp{tp}", critic_save_dir=f"{out}/critic",
                     reward_model_ckpt_dir=f"{root}/critic-tp{tp}", train_file=f"{root}/prompts.json",
                     reward="rm+rule", max_batch_size=2, max_buffer_size=8, max_rounds=2, max_new_tokens=6,
                     actor_lr=1e-4, critic_lr=1e-4, save_buffer=True, placement=strategy,
                     kl_target=0.01, kl_horizon=20,  # one adaptive KL coefficient, fed by every shard's KL
                     placement_file=placement_file)


def main(root: str, out: str, tp: str, *cases: str) -> None:
    for case in cases:
        name, spec = case.split("=", 1)
        strategy, _, placement_file = spec.partition(":")
        train_ppo(config(root, f"{out}/{name}", int(tp), strategy, placement_file or None))


if __name__ == "__main__":
    main(*sys.argv[1:])
