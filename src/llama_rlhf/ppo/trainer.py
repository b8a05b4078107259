"""The buffer-based PPO phase trainer.

One round: actor generates -> reference log-probs -> rewards -> critic values ->
advantages -> actor updates -> critic updates. Each phase needs one model; with
offloading only that model sits on the accelerator, the others wait on the CPU.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional

import torch

from .. import parallel
from ..generation import generate
from ..losses import masked_mean, masked_whiten
from ..scoring import action_logprobs, action_values, sequence_scores
from ..trainers.base import autocast, optim_step
from .advantages import AdaptiveKLController, FixedKLController, gae, grpo_advantages, kl_penalized_rewards, rloo_advantages
from .buffer import RolloutBuffer
from .config import PPOConfig
from .losses import policy_loss, value_loss
from .rewards import combine_rewards, rule_rewards


class PPOModels:
    """The four models and the two optimizers; `phase(model)` puts one on the accelerator."""

    def __init__(self, actor, reference, critic, reward, actor_opt, critic_opt, offload: bool):
        self.actor, self.reference, self.critic, self.reward = actor, reference, critic, reward
        self.actor_opt, self.critic_opt = actor_opt, critic_opt
        self.offload = offload
        self.device = parallel.device()

    @contextlib.contextmanager
    def phase(self, model, optimizer=None) -> Iterator:
        if self.offload:
            _move(model, optimizer, self.device)
        try:
            yield model
        finally:
            if self.offload:
                _move(model, optimizer, torch.device("cpu"))


def _move(model, optimizer, device: torch.device) -> None:
    model.to(device)
    if optimizer is not None:
        for state in optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    state[k] = v.to(device)
    if device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()


class PPOTrainer:
    def __init__(self, cfg: PPOConfig, models: PPOModels, tokenizer, actor_scheduler=None, critic_scheduler=None):
        self.cfg, self.m, self.tok = cfg, models, tokenizer
        self.actor_sched, self.critic_sched = actor_scheduler, critic_scheduler
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                       else FixedKLController(cfg.kl_coef))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.round = 0

    # ------------------------------------------------------------------ phases

    @torch.no_grad()
    def rollout(self, records: list[dict], prompts: list[list[int]]) -> RolloutBuffer:
        """Actor samples `num_samples` responses per prompt (tokens + sampler log-probs)."""
        cfg, k = self.cfg, self.cfg.num_samples
        rep_prompts = [p for p in prompts for _ in range(k)]
        labels = [r.get("label") for r in records for _ in range(k)]
        tokens, logps, finished = [], [], []
        with self.m.phase(self.m.actor) as actor:
            actor.eval()
            for s in range(0, len(rep_prompts), cfg.max_batch_size):
                out = generate(actor, rep_prompts[s:s + cfg.max_batch_size], cfg.max_new_tokens,
                               eos_id=self.tok.eos_id, temperature=cfg.t, top_p=cfg.p, top_k=cfg.top_k,
                               seed=cfg.seed * 100003 + self.round * 1009 + s, max_seq_len=cfg.max_seq_len)
                tokens += out.tokens
                logps += out.logprobs
                finished += [r != "length" for r in out.finish_reasons]
        # An empty response has no action to score: give it one EOS token (it did stop at once).
        for i, t in enumerate(tokens):
            if not t:
                tokens[i], logps[i] = [self.tok.eos_id], [0.0]
        texts = [self.tok.decode(t) for t in tokens]
        return RolloutBuffer(rep_prompts, tokens, labels, torch.tensor(finished), logps, texts)

    @torch.no_grad()
    def score(self, buf: RolloutBuffer) -> None:
        """Reference log-probs, reward-model scores and critic values, one model at a time."""
        cfg = self.cfg
        buf.logprobs = buf.generation_logprobs()
        buf.ref_logprobs = self._per_token(self.m.reference, buf, lambda m, b: action_logprobs(m, b))
        rm = None
        if "rm" in cfg.reward:
            rm = self._per_row(self.m.reward, buf, lambda m, b: sequence_scores(m, b, cfg.reduce))
        rule = rule_rewards(buf.texts, buf.labels) if "rule" in cfg.reward else None
        buf.scores = combine_rewards(cfg.reward, rm, rule, buf.finished, cfg.unfinished_penalty)
        if cfg.estimator == "gae":
            buf.values = self._per_token(self.m.critic, buf, action_values)

    def _batches(self, buf: RolloutBuffer) -> Iterator[tuple[list[int], object]]:
        dev = self.m.device
        for s in range(0, len(buf), self.cfg.max_batch_size):
            idx = list(range(s, min(s + self.cfg.max_batch_size, len(buf))))
            yield idx, buf.batch(idx, self.tok.pad_id).to(dev)

    def _per_token(self, model, buf: RolloutBuffer, fn) -> torch.Tensor:
        out = torch.zeros(len(buf), buf.width())
        with self.m.phase(model) as mdl:
            mdl.eval()
            for idx, batch in self._batches(buf):
                with autocast():
                    vals = fn(mdl, batch).float().cpu()
                out[idx, :vals.shape[1]] = vals
        return out

    def _per_row(self, model, buf: RolloutBuffer, fn) -> torch.Tensor:
        out = torch.zeros(len(buf))
        with self.m.phase(model) as mdl:
            mdl.eval()
            for idx, batch in self._batches(buf):
                with autocast():
                    out[idx] = fn(mdl, batch).float().cpu()
        return out

    def advantages(self, buf: RolloutBuffer) -> dict:
        """KL-shaped rewards and GAE (or group-relative advantages), on action positions."""
        cfg = self.cfg
        mask = buf.batch(list(range(len(buf))), self.tok.pad_id).action_mask
        kl_coef = self.kl_ctl.value if cfg.kl_in == "reward" else 0.0
        buf.rewards, kl_stats = kl_penalized_rewards(buf.scores, buf.logprobs, buf.ref_logprobs, mask,
                                                  kl_coef, cfg.kl_estimator)
        if cfg.estimator == "gae":
            buf.advantages, buf.returns = gae(buf.rewards, buf.values, mask, cfg.gamma, cfg.lam)
        else:
            fn = grpo_advantages if cfg.estimator == "grpo" else rloo_advantages
            seq_adv = fn(buf.rewards.sum(1), cfg.num_samples)  # [N]: score minus KL of each response
            buf.advantages = seq_adv[:, None] * mask
        if cfg.whiten_advantages:
            buf.advantages = masked_whiten(buf.advantages, mask)
        # KL per response (summed over its tokens), averaged over the buffer.
        return {"kl": kl_stats["kl"].item(), "kl_coef": self.kl_ctl.value}

    # ------------------------------------------------------------------ updates

    def train_actor(self, buf: RolloutBuffer) -> dict:
        cfg, stats, first = self.cfg, {}, None
        with self.m.phase(self.m.actor, self.m.actor_opt) as actor:
            actor.train()
            for _ in range(cfg.inner_epochs):
                for idx in buf.minibatches(cfg.max_batch_size, self.generator):
                    batch = buf.batch(idx, self.tok.pad_id).to(self.m.device)
                    w = batch.action_mask.shape[1]
                    with autocast():
                        logps, ent = action_logprobs(actor, batch, with_entropy=True)
                    dev = self.m.device
                    loss, s = policy_loss(
                        logps, buf.logprobs[idx, :w].to(dev), buf.advantages[idx, :w].to(dev), batch.action_mask,
                        cfg.clip_range, entropy=ent, entropy_coef=cfg.entropy_coef,
                        ref_logprobs=buf.ref_logprobs[idx, :w].to(dev) if cfg.kl_in == "loss" else None,
                        kl_coef=self.kl_ctl.value if cfg.kl_in == "loss" else 0.0, kl_estimator=cfg.kl_estimator)
                    loss.backward()
                    s["grad_norm"] = optim_step(actor, self.m.actor_opt, self.actor_sched, cfg.max_grad_norm,
                                                 grad_scale=1.0 / parallel.dp_size())
                    s["entropy"] = masked_mean(ent.detach(), batch.action_mask)
                    first = first or {f"first/{k}": _f(v) for k, v in s.items() if k.startswith("ratio")}
                    _accumulate(stats, s)
        return {**_mean(stats, "actor/"), **first}

    def train_critic(self, buf: RolloutBuffer) -> dict:
        cfg, stats = self.cfg, {}
        if cfg.estimator != "gae":
            return {}
        with self.m.phase(self.m.critic, self.m.critic_opt) as critic:
            critic.train()
            for _ in range(cfg.inner_epochs):
                for idx in buf.minibatches(cfg.max_batch_size, self.generator):
                    batch = buf.batch(idx, self.tok.pad_id).to(self.m.device)
                    w, dev = batch.action_mask.shape[1], self.m.device
                    with autocast():
                        values = action_values(critic, batch)
                    loss, s = value_loss(values, buf.values[idx, :w].to(dev), buf.returns[idx, :w].to(dev),
                                         batch.action_mask, cfg.clip_range_value)
                    loss.backward()
                    s["grad_norm"] = optim_step(critic, self.m.critic_opt, self.critic_sched, cfg.max_grad_norm,
                                                 grad_scale=1.0 / parallel.dp_size())
                    _accumulate(stats, s)
        return _mean(stats, "critic/")

    def run_round(self, records: list[dict], prompts: list[list[int]]) -> tuple[RolloutBuffer, dict]:
        times, t0 = {}, time.perf_counter()
        buf = self.rollout(records, prompts)
        times["time/rollout"], t0 = time.perf_counter() - t0, time.perf_counter()
        self.score(buf)
        times["time/score"], t0 = time.perf_counter() - t0, time.perf_counter()
        stats = self.advantages(buf)
        stats.update(self.train_actor(buf))
        times["time/actor"], t0 = time.perf_counter() - t0, time.perf_counter()
        stats.update(self.train_critic(buf))
        times["time/critic"] = time.perf_counter() - t0
        self.kl_ctl.update(stats["kl"], len(buf))
        self.round += 1
        lengths = torch.tensor([len(r) for r in buf.responses], dtype=torch.float)
        stats.update(times, **{"reward/mean": buf.scores.mean().item(), "reward/std": buf.scores.std().item(),
                               "response_length": lengths.mean().item(),
                               "finished": buf.finished.float().mean().item()})
        return buf, stats


def _f(v) -> float:
    return v.item() if torch.is_tensor(v) else float(v)


def _accumulate(acc: dict, stats: dict) -> None:
    for k, v in stats.items():
        acc.setdefault(k, []).append(_f(v))


def _mean(acc: dict, prefix: str) -> dict:
    return {prefix + k: sum(v) / len(v) for k, v in acc.items()}
