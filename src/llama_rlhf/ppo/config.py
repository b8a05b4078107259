"""All PPO settings in one place; `ppo_train.py` only fills this in from flags."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..config import flag
from ..data.encoding import PromptFlags, PromptFormat
from ..errors import UsageError
from .losses import KL_ESTIMATORS
from .placement import STRATEGIES as PLACEMENTS
from .rewards import REWARDS

ESTIMATORS = ("gae", "grpo", "rloo")


@dataclass
class PPOConfig(PromptFlags):
    actor_ckpt_dir: str = flag(path="dir")
    actor_save_dir: str = flag()
    train_file: str = flag(path="file")
    critic_ckpt_dir: Optional[str] = flag(None, path="dir")
    critic_save_dir: Optional[str] = None
    reward_model_ckpt_dir: Optional[str] = flag(None, path="dir")
    reference_ckpt_dir: Optional[str] = flag(None, path="dir")  # default: the actor's initial weights
    label_file: Optional[str] = flag(None, path="file")  # held-out accuracy; default: dev.json beside --train_file
    model_type: Optional[str] = None
    reward: str = flag("rm", choices=REWARDS)
    reduce: str = flag("last", choices=("last", "mean"))  # how the reward model scores a response
    estimator: str = flag("gae", choices=ESTIMATORS)
    num_samples: int = 1  # responses per prompt (group size for grpo / rloo)
    max_batch_size: int = 6  # rollouts per actor / critic forward / backward (micro-batch)
    accumulation_steps: int = 1  # micro-batches per optimizer step
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
    kl_estimator: str = flag("k1", choices=KL_ESTIMATORS)
    kl_in: str = flag("reward", choices=("reward", "loss"))
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
    lora_alpha: Optional[float] = None  # default: lora_rank (scale 1)
    offload: Optional[bool] = None  # default: on when CUDA is present
    seed: int = 0
    resume: bool = False
    save_rounds: int = 0  # > 0: also a round-N checkpoint every this many rounds
    save_buffer: bool = False
    eval_max_batch_size: int = 64
    log_samples: int = 2
    placement: str = flag("flattening", choices=PLACEMENTS)  # which replicas hold which model (ppo/placement.py)
    placement_file: Optional[str] = flag(None, path="file")  # JSON replica sets, for --placement separation

    @property
    def prompt(self) -> PromptFormat:
        """The actor's prompt format: the flags, else what --actor_ckpt_dir records."""
        return self.prompt_format(self.actor_ckpt_dir)

    @property
    def heldout_file(self) -> Optional[str]:
        """--label_file, else the converter's dev split beside --train_file (the test split is
        for final numbers only), else None (no held-out accuracy)."""
        if self.label_file:
            return self.label_file
        dev = os.path.join(os.path.dirname(os.path.abspath(self.train_file)), "dev.json")
        return dev if os.path.isfile(dev) and not os.path.samefile(dev, self.train_file) else None

    @property
    def forward_batch_size(self) -> int:
        return self.rollout_batch_size or self.max_batch_size

    def validate(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise UsageError(f"--estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        # The buffer counts prompts, a minibatch counts rollouts (num_samples per prompt).
        if self.max_buffer_size * self.num_samples < self.max_batch_size:
            raise UsageError(f"--max_buffer_size {self.max_buffer_size} x --num_samples {self.num_samples} "
                             f"rollouts is smaller than --max_batch_size {self.max_batch_size}")
        if self.rollout_batch_size is not None and self.rollout_batch_size < 1:
            raise UsageError(f"--rollout_batch_size must be >= 1, got {self.rollout_batch_size}")
        if self.max_batch_size < 1:
            raise UsageError(f"--max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.accumulation_steps < 1:
            raise UsageError(f"--accumulation_steps must be >= 1, got {self.accumulation_steps}")
        if self.estimator == "gae" and not self.critic_ckpt_dir:
            raise UsageError("--estimator gae needs --critic_ckpt_dir (grpo / rloo need no critic)")
        if self.estimator != "gae" and self.num_samples < 2:
            raise UsageError(f"--estimator {self.estimator} needs --num_samples >= 2")
        if "rm" in self.reward and not self.reward_model_ckpt_dir:
            raise UsageError(f"--reward {self.reward} needs --reward_model_ckpt_dir")
        if self.placement not in PLACEMENTS:
            raise UsageError(f"--placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.placement == "separation" and not self.placement_file:
            raise UsageError("--placement separation needs --placement_file (JSON: model -> replica list)")
        if self.placement_file and self.placement != "separation":
            raise UsageError(f"--placement_file is only read by --placement separation, "
                             f"got --placement {self.placement}")
        if self.save_rounds < 0:
            raise UsageError(f"--save_rounds must be >= 0, got {self.save_rounds}")
        if self.kl_in not in ("reward", "loss"):
            raise UsageError(f"--kl_in must be 'reward' or 'loss', got {self.kl_in!r}")
