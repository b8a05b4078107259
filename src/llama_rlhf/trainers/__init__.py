"""Trainers: the shared config (`config`), optimizer step (`optim`), checkpoint state
(`state`) and loop (`base`), and one file per objective (`sft`, `verifier`, `dpo`)."""
from .base import Objective, Trainer, autocast, load_for_training
from .config import TrainConfig
from .optim import NonFiniteError, TrainingError, build_optimizer, build_scheduler, lr_factor, optimizer_step
from .sft import SFTConfig, setup_sft, sft_objective, train_sft
from .state import latest_checkpoint

__all__ = ["Objective", "SFTConfig", "TrainConfig", "Trainer", "TrainingError", "NonFiniteError", "autocast",
           "build_optimizer", "build_scheduler", "latest_checkpoint", "load_for_training", "lr_factor",
           "optimizer_step", "setup_sft", "sft_objective", "train_sft"]
