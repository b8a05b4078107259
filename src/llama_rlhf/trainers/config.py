"""The flags every trainer shares (SFT, verifier, DPO); each objective's config adds its own.

A field is a flag: `solver_train.py --lr 3e-5` sets `SFTConfig.lr`. Conversion and the
checks below run once, in `config.from_flags`, inside the one-line-error wrapper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..config import flag
from ..data.encoding import PromptFlags
from ..errors import UsageError
from .optim import SCHEDULES


@dataclass
class TrainConfig(PromptFlags):
    ckpt_dir: str = flag(path="dir")
    save_dir: str = flag()
    train_file: str = flag(path="file")
    model_type: Optional[str] = None
    tokenizer_path: Optional[str] = flag(None, path="any")  # default: the tokenizer in --ckpt_dir
    max_batch_size: int = 6  # samples (pairs for verifier / DPO) per micro-batch per DP rank
    accumulation_steps: int = 1
    max_seq_len: int = 512
    epochs: int = 1
    max_steps: int = -1  # > 0: exactly this many optimizer steps (epochs cycle as needed)
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = flag("cosine", choices=SCHEDULES)
    max_grad_norm: float = 1.0
    lora_rank: int = -1  # > 0: LoRA adapters of this rank; -1: full fine-tuning
    lora_alpha: Optional[float] = None  # default: lora_rank (scale 1)
    seed: int = 0
    save_steps: int = 0  # 0: only after each epoch and at the end
    log_steps: int = 1
    resume: bool = False
    gradient_checkpointing: bool = False
    peak_flops: Optional[float] = None  # per-device FLOP/s behind `mfu`; default: a matmul timed once
    progress: bool = True  # tqdm bar on rank 0

    def validate(self) -> None:
        for name in ("max_batch_size", "accumulation_steps", "log_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.epochs < 1:
            raise UsageError(f"--epochs must be >= 1 (or give --max_steps), got {self.epochs}")
        for name in ("warmup_steps", "save_steps", "weight_decay"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if self.max_seq_len < 2:
            raise UsageError(f"--max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.lora_rank == 0 or self.lora_rank < -1:
            raise UsageError(f"--lora_rank must be > 0 (LoRA) or -1 (full fine-tuning), got {self.lora_rank}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0
