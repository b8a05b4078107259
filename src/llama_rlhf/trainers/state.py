"""What a training checkpoint holds besides the weights: RNG state and the step, per rank,
in `state.RR.pth`; and which checkpoint dir of a run is the latest complete one."""
from __future__ import annotations

import os
import random
import re
from typing import Optional

import numpy as np
import torch

_CKPT_RE = re.compile(r"^(epoch|step|round)-(\d+)$")


def state_file(rank: int) -> str:
    return f"state.{rank:02d}.pth"


def rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "numpy" in st:
        np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def latest_checkpoint(save_dir: str) -> Optional[tuple[str, dict]]:
    """(path, rank-0 state) of the complete checkpoint (`epoch-N`, `step-N` or PPO's
    `round-N`) in `save_dir` with the highest step. Only fully renamed dirs count:
    half-written ones live under a `.tmp` name."""
    best: Optional[tuple[int, str, dict]] = None
    if not os.path.isdir(save_dir):
        return None
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        m = _CKPT_RE.match(name)
        if not m or not os.path.exists(os.path.join(path, state_file(0))):
            continue
        try:
            state = torch.load(os.path.join(path, state_file(0)), map_location="cpu", weights_only=False,
                               mmap=True)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is skipped, not fatal
            continue
        step = int(state.get("step", state.get("round", -1)))
        if best is None or step > best[0]:
            best = (step, path, {k: v for k, v in state.items() if k in ("step", "round", "epoch", "layout", "config")})
    return None if best is None else (best[1], best[2])
