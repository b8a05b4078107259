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
from typing import Optional

import fire

from llama_rlhf.cli import run_cli
from llama_rlhf.ppo.config import PPOConfig
from llama_rlhf.ppo.run import train_ppo


def main(actor_ckpt_dir: str, actor_save_dir: str, train_file: str, critic_ckpt_dir: Optional[str] = None,
         critic_save_dir: Optional[str] = None, reward_model_ckpt_dir: Optional[str] = None,
         reference_ckpt_dir: Optional[str] = None, label_file: Optional[str] = None,
         model_type: Optional[str] = None, reward: str = "rm", reduce: str = "last", estimator: str = "gae",
         num_samples: int = 1, max_batch_size: int = 6, rollout_batch_size: Optional[int] = None,
         max_buffer_size: int = 96, epochs: int = 1,
         max_rounds: Optional[int] = None, inner_epochs: int = 1, actor_lr: float = 1e-6,
         critic_lr: float = 1e-5, clip_range: float = 0.2, clip_range_value: float = 0.2, kl_coef: float = 0.05,
         kl_estimator: str = "k1", kl_in: str = "reward", kl_target: Optional[float] = None,
         gamma: float = 1.0, lam: float = 0.95, whiten_advantages: bool = True, entropy_coef: float = 0.0,
         unfinished_penalty: float = 0.0, t: float = 1.0, p: float = 1.0, top_k: int = 0,
         max_new_tokens: int = 128, max_seq_len: Optional[int] = None, lora_rank: int = -1,
         lora_alpha: float = 16.0, offload: Optional[bool] = None, seed: int = 1, resume: bool = False,
         save_buffer: bool = False, eval_max_batch_size: int = 64, placement: str = "flattening",
         placement_file: Optional[str] = None) -> None:
    cfg = PPOConfig(**{k: v for k, v in locals().items()})
    run_cli(train_ppo, cfg=cfg)


if __name__ == "__main__":
    fire.Fire(main)
