"""The shared trainer of SFT, the verifier, DPO (and PPO's optimiser step).

An *objective* is any callable ``objective(model, micro_batch) -> (loss_sum, n_targets, stats)``:

* ``loss_sum``: differentiable scalar, the loss **summed** over the micro-batch's units
  (target tokens for SFT, pairs for a verifier / DPO);
* ``n_targets``: how many units that sum covers (int or tensor);
* ``stats``: dict of floats / 0-d tensors, averaged over micro-batches and DP ranks for
  logging; the key ``"tokens"`` (input tokens processed) is summed instead and drives
  tokens/s and MFU.

The trainer backpropagates every micro-batch's ``loss_sum``, sums gradients and unit counts
over the accumulated micro-batches *and* the DP ranks, and divides by the global count, so
the update is the mean over every unit of the global batch however it is split: DP = 2 with
batch b equals DP = 1 with 2b, and 2 accumulation steps of b equal one step of 2b.

Data: the trainer sees ``num_samples`` and a ``collate(indices, epoch) -> micro_batch``. Each
epoch is a seeded permutation; a step takes ``global_batch = micro_batch_size x
accumulation_steps x dp_size`` consecutive indices (wrapping to the epoch's start for the
last step), DP rank r takes the strided slice ``[r::dp]`` and cuts it into micro-batches.
Data order is a pure function of (seed, epoch, step), so ``--resume`` needs only the step.

Checkpoints (``save_dir/epoch-N`` after each epoch, ``save_dir/step-N`` every ``save_steps``
and at the end) are written by ``checkpoint.save_model`` into a temp dir renamed when
complete, with ``state.RR.pth`` per rank (optimizer, scheduler, RNG, step, epoch, LoRA
adapters) beside the weights. A non-finite loss or gradient norm raises ``TrainingError``
before the optimizer step, so no bad state is ever written.
"""
from __future__ import annotations

import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.nn as nn

from .. import parallel
from ..checkpoint import save_model, shard_files
from ..log import get_logger
from ..metrics import MetricsLogger, measure_matmul_peak, mfu


class TrainingError(ValueError):
    """Training cannot go on (non-finite loss, unusable resume state); reported in one line."""


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, "int | torch.Tensor", dict]: ...


# ----------------------------------------------------------------------------- optimiser & schedule

def build_optimizer(params, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. `params`: parameters or (name, parameter) pairs.
    Weight decay applies to matrices only (not norms, biases or other vectors)."""
    params = [p for p in params]
    named = params and isinstance(params[0], tuple)
    plist = [p for _, p in params] if named else params
    seen, decay, no_decay = set(), [], []
    for p in plist:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise TrainingError("no trainable parameters")
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    try:  # fused AdamW (one kernel for all tensors) on CUDA and, in recent torch, CPU
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=True)


SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str = "cosine",
              min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based): linear warmup over
    `warmup_steps` (the first step already has lr/warmup), then cosine / linear decay to
    `min_ratio` at `total_steps`, or constant."""
    if kind not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    kind: str = "cosine", min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, warmup_steps, total_steps, kind, min_ratio)  # validates `kind`
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, kind, min_ratio))


def optim_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
               max_grad_norm: Optional[float] = 1.0, reduce: bool = True, grad_scale: float = 1.0) -> float:
    """DP all-reduce (sum) of the gradients, optional scaling, TP-aware clipping, AdamW step,
    schedule step, zero_grad. Returns the pre-clip global gradient norm; when it is not finite
    nothing is stepped and the gradients are dropped (the caller decides what to do)."""
    if reduce:
        parallel.all_reduce_grads(model)
    if grad_scale != 1.0:
        parallel.scale_grads(model, grad_scale)
    norm = parallel.clip_grad_norm(model, max_grad_norm)
    if math.isfinite(norm):
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def autocast(device: Optional[torch.device] = None):
    """bf16 autocast on CUDA; a no-op context (fp32) on CPU."""
    device = device or parallel.device()
    dtype = parallel.autocast_dtype()
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


# ----------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    save_dir: str
    micro_batch_size: int = 1  # samples per micro-batch per DP rank (--max_batch_size)
    accumulation_steps: int = 1
    epochs: int = 1
    max_steps: int = -1  # > 0: exactly this many optimizer steps (epochs cycle as needed)
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_steps: int = 0  # 0: only after each epoch and at the end
    log_steps: int = 1
    resume: bool = False
    gradient_checkpointing: bool = False
    tokenizer_src: Optional[str] = None  # copied into every checkpoint
    peak_flops: Optional[float] = None  # per device; None measures a matmul peak at start
    progress: bool = True  # tqdm bar on rank 0
    plot_keys: tuple[str, ...] = ("loss",)  # curves written to save_dir/loss.png at the end
    extra_state: dict = field(default_factory=dict)  # stored in state files (e.g. script args)

    def __post_init__(self) -> None:
        for name, flag in (("micro_batch_size", "max_batch_size"), ("accumulation_steps", "accumulation_steps")):
            if getattr(self, name) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1 (or give --max_steps), got {self.epochs}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.log_steps < 1:
            raise ValueError(f"--log_steps must be >= 1, got {self.log_steps}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        lr_factor(0, self.warmup_steps, 1, self.schedule)


def train_config(flags: dict, tokenizer_src: Optional[str], extra_state: dict,
                 plot_keys: tuple[str, ...] = ("loss",)) -> TrainConfig:
    """The TrainConfig of a `setup_*` function from its flags (its `locals()` on entry): every
    field of the same name, `max_batch_size` as the micro-batch, and in the state files the
    absolute train file and checkpoint followed by `extra_state`."""
    same = {k: v for k, v in flags.items() if k in {f.name for f in fields(TrainConfig)}}
    state = {"train_file": os.path.abspath(flags["train_file"]), "ckpt_dir": os.path.abspath(flags["ckpt_dir"]),
             **extra_state}
    return TrainConfig(**same, micro_batch_size=flags["max_batch_size"], tokenizer_src=tokenizer_src,
                       plot_keys=plot_keys, extra_state=state)


_CKPT_RE = re.compile(r"^(epoch|step)-(\d+)$")


def load_for_training(ckpt_dir: str, model_type: Optional[str], tokenizer_path: Optional[str], seed: int,
                      role: str = "solver", flag: str = "--ckpt_dir"):
    """Initialise the TP x DP world from `ckpt_dir`'s shard count; (model, tokenizer, tokenizer source)."""
    from ..checkpoint import find_tokenizer, load_model, shard_files
    from ..tokenizers import load_tokenizer
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{flag} {ckpt_dir}: no such directory")
    n_shards = len(shard_files(ckpt_dir))
    if n_shards == 0:
        raise ValueError(f"{flag} {ckpt_dir}: no consolidated.NN.pth files (run checkpoint_split.py first)")
    parallel.init(tp=n_shards)
    tok_src = tokenizer_path or find_tokenizer(ckpt_dir)
    if tok_src is None:
        raise FileNotFoundError(f"{flag} {ckpt_dir}: no tokenizer.model / tokenizer.json (pass --tokenizer_path)")
    tokenizer = load_tokenizer(tok_src)
    torch.manual_seed(seed)
    model = load_model(ckpt_dir, model_type, parallel.device(), torch.float32, role=role)
    if model.args.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"tokenizer {tok_src} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{model.args.vocab_size}")
    return model, tokenizer, tok_src


def latest_checkpoint(save_dir: str) -> Optional[tuple[str, dict]]:
    """(path, rank-0 state) of the complete checkpoint in `save_dir` with the highest step.
    Only fully renamed dirs count: half-written ones live under a `.tmp` name."""
    best: Optional[tuple[int, str, dict]] = None
    if not os.path.isdir(save_dir):
        return None
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if not _CKPT_RE.match(name) or not os.path.exists(os.path.join(path, "state.00.pth")):
            continue
        try:
            state = torch.load(os.path.join(path, "state.00.pth"), map_location="cpu", weights_only=False,
                               mmap=True)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is skipped, not fatal
            continue
        step = int(state.get("step", -1))
        if best is None or step > best[0]:
            best = (step, path, {k: v for k, v in state.items() if k in ("step", "epoch", "layout", "config")})
    return None if best is None else (best[1], best[2])


def _state_file(rank: int) -> str:
    return f"state.{rank:02d}.pth"


def _rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        st["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "numpy" in st:
        import numpy as np
        np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _num(v) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


# ----------------------------------------------------------------------------- trainer

class Trainer:
    """Generic data-parallel x tensor-parallel trainer around one `objective`.

    `collate(indices, epoch)` builds one micro-batch from global sample indices. `lora_base`:
    when the model carries LoRA adapters, checkpoints hold the merged weights and `--resume`
    restores the adapters from the state files onto the (frozen) base already loaded.
    """

    def __init__(self, model: nn.Module, objective: Objective, num_samples: int,
                 collate: Callable[[list[int], int], Any], config: TrainConfig,
                 optimizer: Optional[torch.optim.Optimizer] = None, n_params: Optional[int] = None):
        from .. import lora
        self.model, self.objective, self.collate, self.cfg = model, objective, collate, config
        self.log = get_logger()
        self.num_samples = int(num_samples)
        if self.num_samples <= 0:
            raise TrainingError("no training samples")
        self.dp, self.dp_rank = parallel.dp_size(), parallel.dp_rank()
        self.global_batch = config.micro_batch_size * config.accumulation_steps * self.dp
        self.steps_per_epoch = math.ceil(self.num_samples / self.global_batch)
        self.total_steps = config.max_steps if config.max_steps > 0 else config.epochs * self.steps_per_epoch
        self.is_lora = lora.has_lora(model)
        model.gradient_checkpointing = config.gradient_checkpointing
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = optimizer or build_optimizer(trainable, config.lr, config.weight_decay, config.betas)
        self.scheduler = build_scheduler(self.optimizer, config.warmup_steps, self.total_steps, config.schedule,
                                         config.min_lr_ratio)
        tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
        self.n_params = n_params or parallel.param_count(model, exclude=() if tied else ("tok_embeddings",))
        self.step = 0
        self.last_checkpoint: Optional[str] = None
        self._last_saved_step = -1
        self.history: list[dict] = []  # every step's reduced stats (loss, grad_norm, lr, ...)
        # Optional held-out evaluation `eval_fn(trainer) -> dict`, called on every rank after each
        # epoch's checkpoint and at the end of `fit`; its dict is logged to metrics.jsonl.
        self.eval_fn: Optional[Callable[["Trainer"], dict]] = None
        self.eval_history: list[dict] = []
        self._last_eval_step = -1

    # ------------------------------------------------------------------ data
    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def step_indices(self, step: int) -> list[int]:
        """The global batch of optimizer step `step` (0-based), all DP ranks together."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        start = pos * self.global_batch
        return [order[(start + k) % self.num_samples] for k in range(self.global_batch)]

    def micro_batches(self, step: int) -> list:
        """This DP rank's micro-batches of step `step`."""
        epoch = step // self.steps_per_epoch
        mine = self.step_indices(step)[self.dp_rank::self.dp]
        b = self.cfg.micro_batch_size
        return [self.collate(mine[j * b:(j + 1) * b], epoch) for j in range(self.cfg.accumulation_steps)]

    # ------------------------------------------------------------------ one step
    def compute_grads(self, micro_batches: Sequence) -> dict:
        """Forward + backward of every micro-batch, then gradients and statistics summed over
        DP and divided by the global number of targets. Returns the step's statistics."""
        self.model.train()
        dev = parallel.device()
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        n_targets = torch.zeros((), dtype=torch.float32, device=dev)
        tokens = 0.0
        stat_sums: dict[str, float] = {}
        for mb in micro_batches:
            with autocast(dev):
                loss, n, stats = self.objective(self.model, mb)
            loss.backward()
            loss_sum += loss.detach().float()
            n_targets += torch.as_tensor(n, dtype=torch.float32, device=dev)
            for k, v in stats.items():
                if k == "tokens":
                    tokens += _num(v)
                else:
                    stat_sums[k] = stat_sums.get(k, 0.0) + _num(v)
        keys = sorted(stat_sums)
        vec = torch.tensor([0.0, 0.0, tokens, float(len(micro_batches))] + [stat_sums[k] for k in keys],
                           dtype=torch.float64, device=dev)
        vec[0], vec[1] = loss_sum.double(), n_targets.double()
        parallel.dp_all_reduce(vec)
        vec = vec.tolist()
        n_global = vec[1]
        parallel.all_reduce_grads(self.model)
        parallel.scale_grads(self.model, 1.0 / max(n_global, 1.0))
        out = {"loss": vec[0] / max(n_global, 1.0), "n_targets": n_global, "tokens": vec[2]}
        out.update({k: v / vec[3] for k, v in zip(keys, vec[4:])})
        return out

    def apply_grads(self) -> float:
        """Clip, AdamW step, schedule step, zero_grad (gradients already reduced and scaled)."""
        norm = parallel.clip_grad_norm(self.model, self.cfg.max_grad_norm)
        if not math.isfinite(norm):
            self._nonfinite("gradient norm", norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train_step(self, micro_batches: Sequence) -> dict:
        lr = self.optimizer.param_groups[0]["lr"]
        stats = self.compute_grads(micro_batches)
        if not math.isfinite(stats["loss"]):
            self._nonfinite("loss", stats["loss"])
        stats["grad_norm"] = self.apply_grads()
        stats["lr"] = lr
        self.step += 1
        return stats

    def _nonfinite(self, what: str, value: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        last = self.last_checkpoint or "none (no checkpoint was saved yet)"
        raise TrainingError(f"non-finite {what} ({value}) at step {self.step + 1} "
                            f"(epoch {self.step // self.steps_per_epoch + 1}); stopped without saving, "
                            f"last good checkpoint: {last}")

    # ------------------------------------------------------------------ checkpoints
    def _layout(self) -> dict:
        return {"world": parallel.world_size(), "tp": parallel.tp_size(), "dp": self.dp,
                "micro_batch_size": self.cfg.micro_batch_size, "accumulation_steps": self.cfg.accumulation_steps,
                "num_samples": self.num_samples, "seed": self.cfg.seed, "total_steps": self.total_steps,
                "lora": self.is_lora}

    def state_dict(self) -> dict:
        from .. import lora
        st = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
              "data": {"epoch": self.step // self.steps_per_epoch, "step_in_epoch": self.step % self.steps_per_epoch},
              "scheduler": self.scheduler.state_dict(), "rng": _rng_state(), "layout": self._layout(),
              "config": {**asdict(self.cfg), "extra_state": None}, "extra": self.cfg.extra_state}
        if self.dp_rank == 0:
            st["optimizer"] = self.optimizer.state_dict()
        else:  # DP replicas hold identical optimizer states: write it once per TP rank, not once per GPU
            st["optimizer_in"] = _state_file(parallel.tp_rank())
        if self.is_lora:
            st["lora"] = lora.lora_state_dict(self.model)
        return st

    def save(self, name: str) -> str:
        from .. import lora
        dst = os.path.join(self.cfg.save_dir, name)
        weights = lora.merged_state_dict(self.model) if self.is_lora else None
        save_model(self.model, dst, self.cfg.tokenizer_src, self.state_dict(), model_state=weights)
        self.last_checkpoint, self._last_saved_step = dst, self.step
        self.log.info(f"saved {dst} (step {self.step})")
        return dst

    def load(self, path: str) -> None:
        """Restore model (or adapters), optimizer, scheduler, RNG and step from a checkpoint dir."""
        from .. import lora
        f = os.path.join(path, _state_file(parallel.rank()))
        if not os.path.exists(f):
            raise TrainingError(f"--resume: {f} is missing (was the run started with a different number of "
                                f"processes?)")
        st = torch.load(f, map_location="cpu", weights_only=False)
        mine, theirs = self._layout(), st.get("layout", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if k != "total_steps" and theirs.get(k) != v}
        if diff:
            raise TrainingError(f"--resume: {path} was written by a run with a different layout "
                                + ", ".join(f"{k}={a} (now {b})" for k, (a, b) in diff.items()))
        if self.is_lora:
            lora.load_lora_state_dict(self.model, st["lora"])
        else:
            shards = shard_files(path)
            sd = torch.load(shards[parallel.tp_rank()], map_location="cpu", weights_only=True)
            self.model.load_state_dict(sd, strict=True)
        if "optimizer" in st:
            self.optimizer.load_state_dict(st["optimizer"])
        else:
            other = torch.load(os.path.join(path, st["optimizer_in"]), map_location="cpu", weights_only=False,
                               mmap=True)
            self.optimizer.load_state_dict(other["optimizer"])
            del other
        self.scheduler.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng"])
        self.step = int(st["step"])
        self.last_checkpoint, self._last_saved_step = path, self.step

    def maybe_resume(self) -> None:
        if not self.cfg.resume:
            return
        found = latest_checkpoint(self.cfg.save_dir)
        if found is None:
            self.log.warning(f"--resume: no complete checkpoint in {self.cfg.save_dir}; starting from scratch")
            return
        self.load(found[0])
        self.log.info(f"resumed from {found[0]} at step {self.step} (epoch {self.step / self.steps_per_epoch:.2f})")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Optional[str]:
        """Train to `total_steps` (resuming first when asked); returns the last checkpoint dir."""
        cfg = self.cfg
        self.maybe_resume()
        start = self.step
        metrics = MetricsLogger(cfg.save_dir, resume_step=start + 1 if cfg.resume else None)
        peak = cfg.peak_flops
        if peak is None and parallel.is_main():
            peak = measure_matmul_peak(parallel.device(), parallel.autocast_dtype(),
                                       n=None if parallel.device().type == "cuda" else 1536, repeats=2)
        self.log.info(f"training {self.total_steps} steps from step {start}: {self.num_samples} samples, "
                      f"global batch {self.global_batch} (micro {cfg.micro_batch_size} x accumulation "
                      f"{cfg.accumulation_steps} x DP {self.dp}), TP {parallel.tp_size()}, "
                      f"{self.steps_per_epoch} steps/epoch, {self.n_params / 1e6:.2f}M params")
        bar = None
        if cfg.progress and parallel.is_main():
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
        window: list[dict] = []
        t_window = time.perf_counter()
        try:
            while self.step < self.total_steps:
                stats = self.train_step(self.micro_batches(self.step))
                stats["epoch"] = self.step / self.steps_per_epoch
                self.history.append(stats)
                window.append(stats)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", refresh=False)
                if self.step % cfg.log_steps == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - t_window
                    row = self._log_row(window, elapsed, peak)
                    metrics.log(self.step, row)
                    if bar is None:
                        self.log.info(f"step {self.step}/{self.total_steps} " +
                                      " ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
                    window, t_window = [], time.perf_counter()
                if self.step % self.steps_per_epoch == 0:
                    self.save(f"epoch-{self.step // self.steps_per_epoch}")
                    self.run_eval(metrics)
                elif cfg.save_steps and self.step % cfg.save_steps == 0:
                    self.save(f"step-{self.step}")
            if self._last_saved_step != self.step:
                self.save(f"step-{self.step}")
            if self._last_eval_step != self.step:
                self.run_eval(metrics)
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
        if parallel.is_main():
            metrics.plot(list(cfg.plot_keys), os.path.join(cfg.save_dir, "loss.png"))
        self.log.info(f"done: {self.step} steps, final checkpoint {self.last_checkpoint}")
        return self.last_checkpoint

    def run_eval(self, metrics: Optional[MetricsLogger] = None) -> Optional[dict]:
        """Run `eval_fn` (if set) now and log its result under the current step."""
        if self.eval_fn is None:
            return None
        row = {**self.eval_fn(self), "epoch": self.step / self.steps_per_epoch}
        self._last_eval_step = self.step
        self.eval_history.append({"step": self.step, **row})
        if metrics is not None:
            metrics.log(self.step, row)
        self.log.info(f"eval at step {self.step}: " +
                      " ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, (int, float))))
        return row

    def _log_row(self, window: list[dict], elapsed: float, peak: Optional[float]) -> dict:
        last = window[-1]
        row: dict = {"loss": sum(s["loss"] for s in window) / len(window), "lr": last["lr"],
                     "grad_norm": last["grad_norm"], "epoch": last["epoch"]}
        tokens = sum(s["tokens"] for s in window)
        if tokens and elapsed > 0:
            row["tokens_per_s"] = tokens / elapsed
            if peak:
                row["mfu"] = mfu(row["tokens_per_s"], self.n_params, peak * parallel.world_size())
        skip = {"loss", "lr", "grad_norm", "epoch", "tokens", "n_targets"}
        for k in last:
            if k not in skip:
                row[k] = sum(s.get(k, 0.0) for s in window) / len(window)
        return row
