"""Training metrics: a JSON-lines log + TensorBoard scalars + PNG curves (rank 0 only),
and model-FLOPs utilisation against a matmul peak measured on the machine itself."""
from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Optional

import torch

from . import parallel


class MetricsLogger:
    """`log(step, metrics)` appends `{"step": step, **metrics}` to `save_dir/metrics.jsonl` and
    writes TensorBoard scalars under `save_dir/tb`; every method is a no-op off rank 0.

    When resuming, lines with a step >= `resume_step` are dropped first, so the file never
    holds two values for one step."""

    def __init__(self, save_dir: str, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.save_dir = save_dir
        self.path = os.path.join(save_dir, "metrics.jsonl")
        self.enabled = parallel.is_main()
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(save_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) < resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(self.path + ".tmp", self.path)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run starts a fresh log
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(save_dir, "tb"), purge_step=resume_step)
            except ImportError:  # tensorboard is optional at runtime
                self._tb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))

    def plot(self, keys: list[str], path: str) -> None:
        """One PNG with a curve per key (one panel each), read back from metrics.jsonl."""
        if not self.enabled or not os.path.exists(self.path):
            return
        plot_metrics(self.path, keys, path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line after a crash
    return rows


def plot_metrics(metrics_file: str, keys: list[str], path: str) -> None:
    # The object-oriented Agg API: no pyplot (global state, GUI backends, a second of import).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    rows = read_metrics(metrics_file)
    keys = list(keys)
    fig = Figure(figsize=(7, 3 * len(keys)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan / inf
    return v


def mfu(tokens_per_s: float, n_params: int, peak_flops: float) -> float:
    """Model-FLOPs utilisation: 6·N FLOPs per trained token (forward 2N + backward 4N)
    over the peak. `peak_flops` must cover the same devices that produced `tokens_per_s`."""
    if not peak_flops or peak_flops <= 0:
        return float("nan")
    return 6.0 * n_params * tokens_per_s / peak_flops


def measure_matmul_peak(device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32,
                        n: Optional[int] = None, repeats: int = 5) -> float:
    """FLOP/s of a few large square matmuls on `device` in `dtype` (best of `repeats`)."""
    device = torch.device(device) if device is not None else parallel.device()
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b, out=out)  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2.0 * n ** 3 / best


@functools.lru_cache(maxsize=None)
def device_peak_flops(device_type: str, dtype: torch.dtype) -> float:
    """The matmul peak of this process's device, measured once per process (not once per
    run): the denominator of the logged `mfu` when `--peak_flops` is not given."""
    return measure_matmul_peak(parallel.device(), dtype, n=None if device_type == "cuda" else 1536, repeats=2)
