"""The shared trainer of SFT, the verifier and DPO.

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
epoch is a seeded permutation; a step takes ``global_batch = max_batch_size x
accumulation_steps x dp_size`` consecutive indices (wrapping to the epoch's start for the
last step), DP rank r takes the strided slice ``[r::dp]`` and cuts it into micro-batches.
Data order is a pure function of (seed, epoch, step), so ``--resume`` needs only the step.

Checkpoints (``save_dir/epoch-N`` after each epoch, ``save_dir/step-N`` every ``save_steps``
and at the end) are written by ``checkpoint.save_model`` into a temp dir renamed when
complete, with ``state.RR.pth`` per rank (optimizer, scheduler, RNG, step, config, LoRA
adapters and a fingerprint of their base) beside the weights. A non-finite loss or gradient
norm raises ``TrainingError`` before the optimizer step, so no bad state is ever written.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from .. import lora, parallel
from ..checkpoint import find_tokenizer, load_model, save_model, shard_files
from ..errors import MissingPathError, UsageError
from ..log import get_logger
from ..metrics import MetricsLogger, device_peak_flops, mfu
from ..tokenizers import load_tokenizer
from .config import TrainConfig
from .optim import NonFiniteError, TrainingError, build_optimizer, build_scheduler, optimizer_step
from .state import latest_checkpoint, rng_state, set_rng_state, state_file

__all__ = ["Objective", "Trainer", "TrainingError", "autocast", "latest_checkpoint", "load_for_training"]


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, "int | torch.Tensor", dict]: ...


def autocast(device: Optional[torch.device] = None):
    """bf16 autocast on CUDA; a no-op context (fp32) on CPU."""
    device = device or parallel.device()
    dtype = parallel.autocast_dtype()
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def load_for_training(cfg: TrainConfig, role: str = "solver", flag: str = "--ckpt_dir"):
    """Initialise the TP x DP world from `cfg.ckpt_dir`'s shard count; (model, tokenizer, tokenizer path)."""
    ckpt_dir = cfg.ckpt_dir
    if not os.path.isdir(ckpt_dir):
        raise MissingPathError(f"{flag} {ckpt_dir}: no such directory")
    n_shards = len(shard_files(ckpt_dir))
    if n_shards == 0:
        raise UsageError(f"{flag} {ckpt_dir}: no consolidated.NN.pth files (run checkpoint_split.py first)")
    parallel.init(tp=n_shards)
    tok_path = cfg.tokenizer_path or find_tokenizer(ckpt_dir)
    if tok_path is None:
        raise MissingPathError(f"{flag} {ckpt_dir}: no tokenizer.model / tokenizer.json (pass --tokenizer_path)")
    tokenizer = load_tokenizer(tok_path)
    torch.manual_seed(cfg.seed)
    model = load_model(ckpt_dir, cfg.model_type, parallel.device(), torch.float32, role=role)
    if model.args.vocab_size < tokenizer.vocab_size:
        raise UsageError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{model.args.vocab_size}")
    return model, tokenizer, tok_path


def _num(v) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


class Trainer:
    """Generic data-parallel x tensor-parallel trainer around one `objective`.

    `collate(indices, epoch)` builds one micro-batch from global sample indices. When the
    model carries LoRA adapters, checkpoints hold the merged weights and `--resume` restores
    the adapters from the state files onto the (frozen) base already loaded, after checking
    that base is the one they were trained on. `tokenizer_path` is copied into every checkpoint.
    """

    def __init__(self, model: nn.Module, objective: Objective, num_samples: int,
                 collate: Callable[[list[int], int], Any], config: TrainConfig, tokenizer_path: Optional[str] = None,
                 plot_keys: tuple[str, ...] = ("loss",), n_params: Optional[int] = None):
        self.model, self.objective, self.collate, self.cfg = model, objective, collate, config
        self.tokenizer_path, self.plot_keys = tokenizer_path, plot_keys
        self.log = get_logger()
        self.num_samples = int(num_samples)
        if self.num_samples <= 0:
            raise TrainingError("no training samples")
        self.dp, self.dp_rank = parallel.dp_size(), parallel.dp_rank()
        self.global_batch = config.max_batch_size * config.accumulation_steps * self.dp
        self.steps_per_epoch = math.ceil(self.num_samples / self.global_batch)
        self.total_steps = config.max_steps if config.max_steps > 0 else config.epochs * self.steps_per_epoch
        self.is_lora = lora.has_lora(model)
        model.gradient_checkpointing = config.gradient_checkpointing
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(trainable, config.lr, config.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, config.warmup_steps, self.total_steps, config.schedule)
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
        b = self.cfg.max_batch_size
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
        """The shared optimizer step on the reduced, scaled gradients."""
        try:
            return optimizer_step(self.model, self.optimizer, self.scheduler, self.cfg.max_grad_norm)
        except NonFiniteError as e:
            raise self._stopped(str(e)) from None

    def train_step(self, micro_batches: Sequence) -> dict:
        lr = self.optimizer.param_groups[0]["lr"]
        stats = self.compute_grads(micro_batches)
        if not math.isfinite(stats["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._stopped(f"non-finite loss ({stats['loss']})")
        stats["grad_norm"] = self.apply_grads()
        stats["lr"] = lr
        self.step += 1
        return stats

    def _stopped(self, why: str) -> TrainingError:
        last = self.last_checkpoint or "none (no checkpoint was saved yet)"
        return TrainingError(f"{why} at step {self.step + 1} (epoch {self.step // self.steps_per_epoch + 1}); "
                             f"stopped without saving, last good checkpoint: {last}")

    # ------------------------------------------------------------------ checkpoints
    def _layout(self) -> dict:
        return {"world": parallel.world_size(), "tp": parallel.tp_size(), "dp": self.dp,
                "micro_batch_size": self.cfg.max_batch_size, "accumulation_steps": self.cfg.accumulation_steps,
                "num_samples": self.num_samples, "seed": self.cfg.seed, "total_steps": self.total_steps,
                "lora": self.is_lora}

    def state_dict(self) -> dict:
        st = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
              "data": {"epoch": self.step // self.steps_per_epoch, "step_in_epoch": self.step % self.steps_per_epoch},
              "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "layout": self._layout(),
              "config": asdict(self.cfg)}
        if self.dp_rank == 0:
            st["optimizer"] = self.optimizer.state_dict()
        else:  # DP replicas hold identical optimizer states: write it once per TP rank, not once per GPU
            st["optimizer_in"] = state_file(parallel.tp_rank())
        if self.is_lora:
            st["lora"] = lora.lora_state_dict(self.model)
            st["lora_base"] = {"ckpt_dir": os.path.abspath(self.cfg.ckpt_dir),
                               "fingerprint": lora.base_fingerprint(self.model)}
        return st

    def save(self, name: str) -> str:
        dst = os.path.join(self.cfg.save_dir, name)
        weights = (lambda: lora.merged_state_dict(self.model)) if self.is_lora else None
        save_model(self.model, dst, self.tokenizer_path, self.state_dict(), model_state=weights,
                   prompt=self.cfg.prompt_format(self.cfg.ckpt_dir).recorded())
        self.last_checkpoint, self._last_saved_step = dst, self.step
        self.log.info(f"saved {dst} (step {self.step})")
        return dst

    def _check_resume(self, path: str, st: dict) -> None:
        mine, theirs = self._layout(), st.get("layout", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if k != "total_steps" and theirs.get(k) != v}
        if diff:
            raise TrainingError(f"--resume: {path} was written by a run with a different layout "
                                + ", ".join(f"{k}={a} (now {b})" for k, (a, b) in diff.items()))
        base = st.get("lora_base")
        if self.is_lora and base is not None and base["fingerprint"] != lora.base_fingerprint(self.model):
            raise TrainingError(f"--resume: the LoRA adapters in {path} were trained on the base "
                                f"{base['ckpt_dir']}, not on --ckpt_dir {os.path.abspath(self.cfg.ckpt_dir)} "
                                f"(its weights differ)")

    def load(self, path: str) -> None:
        """Restore model (or adapters), optimizer, scheduler, RNG and step from a checkpoint dir."""
        f = os.path.join(path, state_file(parallel.rank()))
        if not os.path.exists(f):
            raise TrainingError(f"--resume: {f} is missing (was the run started with a different number of "
                                f"processes?)")
        st = torch.load(f, map_location="cpu", weights_only=False)
        self._check_resume(path, st)
        if self.is_lora:
            lora.load_lora_state_dict(self.model, st["lora"])
        else:
            sd = torch.load(shard_files(path)[parallel.tp_rank()], map_location="cpu", weights_only=True)
            self.model.load_state_dict(sd, strict=True)
        if "optimizer" in st:
            self.optimizer.load_state_dict(st["optimizer"])
        else:
            other = torch.load(os.path.join(path, st["optimizer_in"]), map_location="cpu", weights_only=False,
                               mmap=True)
            self.optimizer.load_state_dict(other["optimizer"])
            del other
        self.scheduler.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
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
        self.log.info(f"training {self.total_steps} steps from step {start}: {self.num_samples} samples, "
                      f"global batch {self.global_batch} (micro {cfg.max_batch_size} x accumulation "
                      f"{cfg.accumulation_steps} x DP {self.dp}), TP {parallel.tp_size()}, "
                      f"{self.steps_per_epoch} steps/epoch, {self.n_params / 1e6:.2f}M params")
        bar = tqdm(total=self.total_steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0,
                   disable=not (cfg.progress and parallel.is_main()))
        window: list[dict] = []
        t_window = time.perf_counter()
        try:
            while self.step < self.total_steps:
                stats = self.train_step(self.micro_batches(self.step))
                stats["epoch"] = self.step / self.steps_per_epoch
                self.history.append(stats)
                window.append(stats)
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", refresh=False)
                if self.step % cfg.log_steps == 0 or self.step == self.total_steps:
                    self._log_window(metrics, window, time.perf_counter() - t_window, bar.disable)
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
            bar.close()
            metrics.close()
        metrics.plot(list(self.plot_keys), os.path.join(cfg.save_dir, "loss.png"))
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

    def _log_window(self, metrics: MetricsLogger, window: list[dict], elapsed: float, echo: bool) -> None:
        """One metrics row for the steps since the last one (and a log line when no bar shows)."""
        last = window[-1]
        row: dict = {"loss": sum(s["loss"] for s in window) / len(window), "lr": last["lr"],
                     "grad_norm": last["grad_norm"], "epoch": last["epoch"]}
        tokens = sum(s["tokens"] for s in window)
        if tokens and elapsed > 0 and parallel.is_main():  # only rank 0 writes the row
            row["tokens_per_s"] = tokens / elapsed
            peak = self.cfg.peak_flops or device_peak_flops(parallel.device().type, parallel.autocast_dtype())
            row["mfu"] = mfu(row["tokens_per_s"], self.n_params, peak * parallel.world_size())
        skip = {"loss", "lr", "grad_norm", "epoch", "tokens", "n_targets"}
        for k in last:
            if k not in skip:
                row[k] = sum(s.get(k, 0.0) for s in window) / len(window)
        metrics.log(self.step, row)
        if echo:
            self.log.info(f"step {self.step}/{self.total_steps} " +
                          " ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
