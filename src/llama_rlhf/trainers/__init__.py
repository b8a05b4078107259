"""Trainers: the shared loop (`base`) and the SFT objective / entry (`sft`)."""
from .base import (
    Objective, TrainConfig, Trainer, TrainingError, autocast, build_optimizer, build_scheduler, latest_checkpoint,
    lr_factor, optim_step,
)
from .sft import linear_cross_entropy, setup_sft, sft_objective, train_sft

__all__ = ["Objective", "TrainConfig", "Trainer", "TrainingError", "autocast", "build_optimizer", "build_scheduler",
           "latest_checkpoint", "lr_factor", "optim_step", "linear_cross_entropy", "setup_sft", "sft_objective",
           "train_sft"]
