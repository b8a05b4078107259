"""All PPO settings in one place; `ppo_train.py` only fills this in from flags."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .placement import STRATEGIES as PLACEMENTS

ESTIMATORS = ("gae", "grpo", "rloo")


@dataclass
class PPOConfig:
    actor_ckpt_dir: str
    actor_save_dir: str
    train_file: str
    critic_ckpt_dir: Optional[str] = None
    critic_save_dir: Optional[str] = None
    reward_model_ckpt_dir: Optional[str] = None
    reference_ckpt_dir: Optional[str] = None  # default: the actor's initial weights
    label_file: Optional[str] = None
    model_type: Optional[str] = None
    reward: str = "rm"  # rm | rule | rm+rule
    reduce: str = "last"  # how the reward model scores a response
    estimator: str = "gae"  # gae | grpo | rloo
    num_samples: int = 1  # responses per prompt (group size for grpo / rloo)
    max_batch_size: int = 6  # rollouts per actor / critic minibatch (one optimizer step)
    rollout_batch_size: Optional[int] = None  # generation and no-grad scoring batch; default max_batch_size
    max_buffer_size: int = 96  # prompts per round, over all data-parallel replicas
    epochs: int = 1
    max_rounds: Optional[int] = None  # stop after this many rounds (fixed-budget runs)
    inner_epochs: int = 1
    actor_lr: float = 1e-6
    critic_lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # k1 | k3
    kl_in: str = "reward"  # reward | loss
    kl_target: Optional[float] = None  # set for an adaptive coefficient
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # GAE only: group estimators are already normalised
    entropy_coef: float = 0.0
    unfinished_penalty: float = 0.0
    t: float = 1.0
    p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    max_seq_len: Optional[int] = None
    lora_rank: int = -1
    lora_alpha: float = 16.0
    offload: Optional[bool] = None  # default: on when CUDA is present
    seed: int = 1
    resume: bool = False
    save_buffer: bool = False
    eval_max_batch_size: int = 64
    log_samples: int = 2
    placement: str = "flattening"  # which replicas hold which model (ppo/placement.py)
    placement_file: Optional[str] = None  # JSON replica sets, for --placement separation

    @property
    def forward_batch_size(self) -> int:
        return self.rollout_batch_size or self.max_batch_size

    def validate(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"--estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        # The buffer counts prompts, a minibatch counts rollouts (num_samples per prompt).
        if self.max_buffer_size * self.num_samples < self.max_batch_size:
            raise ValueError(f"--max_buffer_size {self.max_buffer_size} x --num_samples {self.num_samples} "
                             f"rollouts is smaller than --max_batch_size {self.max_batch_size}")
        if self.rollout_batch_size is not None and self.rollout_batch_size < 1:
            raise ValueError(f"--rollout_batch_size must be >= 1, got {self.rollout_batch_size}")
        if self.max_batch_size < 1:
            raise ValueError(f"--max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.estimator == "gae" and not self.critic_ckpt_dir:
            raise ValueError("--estimator gae needs --critic_ckpt_dir (grpo / rloo need no critic)")
        if self.estimator != "gae" and self.num_samples < 2:
            raise ValueError(f"--estimator {self.estimator} needs --num_samples >= 2")
        if "rm" in self.reward and not self.reward_model_ckpt_dir:
            raise ValueError(f"--reward {self.reward} needs --reward_model_ckpt_dir")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"--placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.placement == "separation" and not self.placement_file:
            raise ValueError("--placement separation needs --placement_file (JSON: model -> replica list)")
        if self.placement_file and self.placement != "separation":
            raise ValueError(f"--placement_file is only read by --placement separation, "
                             f"got --placement {self.placement}")
        if self.kl_in not in ("reward", "loss"):
            raise ValueError(f"--kl_in must be 'reward' or 'loss', got {self.kl_in!r}")
