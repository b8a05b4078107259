"""The buffer-based PPO phase trainer.

One round: actor generates -> reference log-probs -> rewards -> critic values ->
advantages -> actor updates -> critic updates. Each phase needs one model; with
offloading only that model sits on the accelerator, the others wait on the CPU.

`run_round` is flattening (every model on every replica, this replica's slice of the
prompts). `run_placed_round` runs the same phases under a `Placement`: the round's data is
cut into one shard per replica exactly as flattening cuts it, each phase runs on the shards
its replica set owns (`placement.shards`), and `parallel` moves rollouts and scores between
replica sets, so every shard is computed exactly as flattening computes it.
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
from ..trainers.base import autocast
from ..trainers.optim import optimizer_step
from .advantages import AdaptiveKLController, FixedKLController, gae, grpo_advantages, kl_penalized_rewards, rloo_advantages
from .buffer import RolloutBuffer
from .config import PPOConfig
from .losses import policy_loss, value_loss
from .placement import Placement
from .rewards import combine_rewards, rule_rewards
from .stats import pool_stats
from .timeline import Timeline


class PPOModels:
    """The four models and the two optimizers; `phase(model)` puts one on the accelerator."""

    def __init__(self, actor, reference, critic, reward, actor_opt, critic_opt, offload: bool, generator_model=None):
        # A model not placed on this replica is None; `generator_model` is a sampling-only
        # copy of the actor on a generator replica (separation).
        self.actor, self.reference, self.critic, self.reward = actor, reference, critic, reward
        self.generator_model = generator_model
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
    def __init__(self, cfg: PPOConfig, models: PPOModels, tokenizer, placement: Optional[Placement] = None,
                 groups=None):
        self.cfg, self.m, self.tok = cfg, models, tokenizer
        self.placement, self.groups = placement, groups
        # Per-shard minibatch order a flattening replica carries between rounds. Flattening has
        # one shard per replica; placed rounds keep every shard's copy on every replica, so any
        # replica can run any shard exactly.
        n = 1 if placement is None or placement.is_flat else placement.num_replicas
        self.batch_orders = [torch.Generator().manual_seed(cfg.seed) for _ in range(n)]
        self.batch_order = self.batch_orders[parallel.dp_rank() if n > 1 else 0]
        # One KL coefficient for the whole run, updated with the KL over every replica.
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                       else FixedKLController(cfg.kl_coef))
        self.timeline = Timeline()
        self.round = 0

    # ------------------------------------------------------------------ phases

    @torch.no_grad()
    def rollout(self, records: list[dict], prompts: list[list[int]], model=None) -> RolloutBuffer:
        """Actor (or its generator copy) samples `num_samples` responses per prompt."""
        cfg, k = self.cfg, self.cfg.num_samples
        rep_prompts = [p for p in prompts for _ in range(k)]
        labels = [r.get("label") for r in records for _ in range(k)]
        with self.m.phase(model or self.m.actor) as actor:
            actor.eval()
            # The seed depends on the round only and a row's samples on its index in the shard,
            # so a shard samples the same tokens on whichever replica generates it.
            out = generate(actor, prompts, cfg.max_new_tokens, eos_id=self.tok.stop_ids, temperature=cfg.t,
                           top_p=cfg.p, top_k=cfg.top_k, seed=cfg.seed * 100003 + self.round * 1009,
                           max_seq_len=cfg.max_seq_len, num_samples=k, max_batch=cfg.forward_batch_size)
        tokens, logps = out.tokens, out.logprobs
        finished = [r != "length" for r in out.finish_reasons]
        # An empty response has no action to score: give it one EOS token (it did stop at once).
        for i, t in enumerate(tokens):
            if not t:
                tokens[i], logps[i] = [self.tok.eos_id], [0.0]
        texts = [self.tok.decode(t) for t in tokens]
        return RolloutBuffer(rep_prompts, tokens, labels, torch.tensor(finished), logps, texts)

    @torch.no_grad()
    def score(self, buf: RolloutBuffer) -> None:
        """Reference log-probs, reward-model scores and critic values, one model at a time."""
        tl = self.timeline
        buf.logprobs = buf.generation_logprobs()
        with tl.span("reference"):
            buf.ref_logprobs = self.reference_logprobs(buf)
        rm = None
        if "rm" in self.cfg.reward:
            with tl.span("reward"):
                rm = self.reward_scores(buf)
        buf.scores = self.combine_scores(buf, rm)
        if self.cfg.estimator == "gae":
            with tl.span("values"):
                buf.values = self.critic_values(buf)

    @torch.no_grad()
    def reference_logprobs(self, buf: RolloutBuffer) -> torch.Tensor:
        return self._per_token(self.m.reference, buf, lambda m, b: action_logprobs(m, b))

    @torch.no_grad()
    def reward_scores(self, buf: RolloutBuffer) -> torch.Tensor:
        return self._per_row(self.m.reward, buf, lambda m, b: sequence_scores(m, b, self.cfg.reduce))

    @torch.no_grad()
    def critic_values(self, buf: RolloutBuffer) -> torch.Tensor:
        return self._per_token(self.m.critic, buf, action_values)

    def combine_scores(self, buf: RolloutBuffer, rm: Optional[torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        rule = rule_rewards(buf.texts, buf.labels) if "rule" in cfg.reward else None
        return combine_rewards(cfg.reward, rm, rule, buf.finished, cfg.unfinished_penalty)

    def _batches(self, buf: RolloutBuffer) -> Iterator[tuple[list[int], object]]:
        dev, size = self.m.device, self.cfg.forward_batch_size
        for s in range(0, len(buf), size):
            idx = list(range(s, min(s + size, len(buf))))
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
        cfg, kl_ctl = self.cfg, self.kl_ctl
        mask = buf.batch(list(range(len(buf))), self.tok.pad_id).action_mask
        kl_coef = kl_ctl.value if cfg.kl_in == "reward" else 0.0
        buf.rewards, kl_stats = kl_penalized_rewards(buf.scores, buf.logprobs, buf.ref_logprobs, mask,
                                                  kl_coef, cfg.kl_estimator)
        if cfg.estimator == "gae":
            buf.advantages, buf.returns = gae(buf.rewards, buf.values, mask, cfg.gamma, cfg.lam)
        else:
            fn = grpo_advantages if cfg.estimator == "grpo" else rloo_advantages
            seq_adv = fn(buf.rewards.sum(1), cfg.num_samples)  # [N]: score minus KL of each response
            buf.advantages = seq_adv[:, None] * mask
        # Group estimators are already baseline-relative; whitening them would shift the zero
        # advantage of groups whose samples all agree and train on pure noise.
        if cfg.whiten_advantages and cfg.estimator == "gae":
            buf.advantages = masked_whiten(buf.advantages, mask)
        # KL per response (summed over its tokens), averaged over the buffer.
        return {"kl": kl_stats["kl"].item(), "kl_coef": kl_ctl.value}

    # ------------------------------------------------------------------ updates

    def _orders(self, generator: torch.Generator, n: int) -> list[list[list[int]]]:
        """Every optimizer step of every inner epoch, drawn up front (the same draws, in the
        same order, as drawing each epoch's permutation when it starts), each step cut into its
        micro-batches. Accumulating, a step's rows go in buffer order, so the samples of one
        prompt share micro-batches and their packed rows (`RolloutBuffer.batch`)."""
        micro, accum, out = self.cfg.max_batch_size, self.cfg.accumulation_steps, []
        for _ in range(self.cfg.inner_epochs):
            order = torch.randperm(n, generator=generator).tolist()
            for s in range(0, n, micro * accum):
                step = order[s:s + micro * accum]
                step = sorted(step) if accum > 1 else step
                out.append([step[m:m + micro] for m in range(0, len(step), micro)])
        return out

    @staticmethod
    def _weights(buf: RolloutBuffer, step: list[list[int]]) -> list[float]:
        """Each micro-batch's share of the step's response tokens: the token-mean losses of the
        micro-batches, so weighted, sum to the token mean over the whole step."""
        counts = [sum(len(buf.responses[i]) for i in idx) for idx in step]
        return [c / sum(counts) for c in counts]

    def _step(self, model, optimizer, replicas: Optional[tuple[int, ...]]) -> float:
        """Gradients summed over the model's replicas, scaled by 1 / shards (= DP size under
        flattening), then the shared optimizer step. `replicas` None: flattening's all-replica
        reduce. A non-finite gradient raises NonFiniteError with nothing stepped."""
        if replicas is None:
            parallel.all_reduce_grads(model)
        else:
            parallel.all_reduce_grads_over(self.groups, model, replicas)
        parallel.scale_grads(model, 1.0 / parallel.dp_size())
        return optimizer_step(model, optimizer, None, self.cfg.max_grad_norm)

    def train_actor(self, buf: RolloutBuffer) -> dict:
        return self._train_actor([(buf, self._orders(self.batch_order, len(buf)))], None)[0]

    def _train_actor(self, jobs: list[tuple[RolloutBuffer, list]], replicas: Optional[tuple[int, ...]]) -> list[dict]:
        return self._train(self.m.actor, self.m.actor_opt, self._actor_loss, jobs, replicas, "actor/")

    def train_critic(self, buf: RolloutBuffer) -> dict:
        if self.cfg.estimator != "gae":
            return {}
        return self._train_critic([(buf, self._orders(self.batch_order, len(buf)))], None)[0]

    def _train_critic(self, jobs: list[tuple[RolloutBuffer, list]], replicas: Optional[tuple[int, ...]]) -> list[dict]:
        return self._train(self.m.critic, self.m.critic_opt, self._critic_loss, jobs, replicas, "critic/")

    def _train(self, model, optimizer, loss_fn, jobs: list[tuple[RolloutBuffer, list[list[list[int]]]]],
               replicas: Optional[tuple[int, ...]], prefix: str) -> list[dict]:
        """One optimizer step per step index; each job (shard buffer, its `_orders`) adds the
        gradients of that step's micro-batches, weighted by their token shares. Returns each
        job's stats (and the first micro-batch's ratio stats)."""
        acc: list[dict] = [{} for _ in jobs]
        first: list[dict] = [{} for _ in jobs]
        with self.m.phase(model, optimizer) as mdl:
            mdl.train()
            for k in range(max(len(steps) for _, steps in jobs)):
                done = []
                for j, (buf, steps) in enumerate(jobs):
                    step = steps[k] if k < len(steps) else []
                    for idx, share in zip(step, self._weights(buf, step)):
                        loss, sj = loss_fn(mdl, buf, idx)
                        (loss * share).backward()
                        done.append((j, sj))
                norm = self._step(mdl, optimizer, replicas)
                for j, sj in done:
                    sj["grad_norm"] = norm
                    first[j] = first[j] or {f"first/{key}": _f(v) for key, v in sj.items() if key.startswith("ratio")}
                    _accumulate(acc[j], sj)
        return [{**_mean(a, prefix), **f} for a, f in zip(acc, first)]

    def _actor_loss(self, actor, buf: RolloutBuffer, idx: list[int]) -> tuple[torch.Tensor, dict]:
        cfg, dev, kl_coef = self.cfg, self.m.device, self.kl_ctl.value
        batch = buf.batch(idx, self.tok.pad_id).to(dev)
        w = batch.action_mask.shape[1]
        with autocast():
            logps, ent = action_logprobs(actor, batch, with_entropy=True)
        loss, s = policy_loss(
            logps, buf.logprobs[idx, :w].to(dev), buf.advantages[idx, :w].to(dev), batch.action_mask,
            cfg.clip_range, entropy=ent, entropy_coef=cfg.entropy_coef,
            ref_logprobs=buf.ref_logprobs[idx, :w].to(dev) if cfg.kl_in == "loss" else None,
            kl_coef=kl_coef if cfg.kl_in == "loss" else 0.0, kl_estimator=cfg.kl_estimator)
        s["entropy"] = masked_mean(ent.detach(), batch.action_mask)
        return loss, s

    def _critic_loss(self, critic, buf: RolloutBuffer, idx: list[int]) -> tuple[torch.Tensor, dict]:
        dev = self.m.device
        batch = buf.batch(idx, self.tok.pad_id).to(dev)
        w = batch.action_mask.shape[1]
        with autocast():
            values = action_values(critic, batch)
        return value_loss(values, buf.values[idx, :w].to(dev), buf.returns[idx, :w].to(dev),
                          batch.action_mask, self.cfg.clip_range_value)

    # ------------------------------------------------------------------ rounds

    def run_round(self, records: list[dict], prompts: list[list[int]]) -> tuple[RolloutBuffer, dict]:
        """Flattening: every phase on this replica's own prompts, one after another; the stats
        and the KL that adapts the coefficient are pooled over all replicas."""
        tl = self.timeline
        tl.start_round(self.round + 1)
        times, t0 = {}, time.perf_counter()
        start = t0
        with tl.span("rollout"):
            buf = self.rollout(records, prompts)
        times["time/rollout"], t0 = time.perf_counter() - t0, time.perf_counter()
        self.score(buf)
        times["time/score"], t0 = time.perf_counter() - t0, time.perf_counter()
        with tl.span("advantages"):
            stats = self.advantages(buf)
        with tl.span("actor"):
            stats.update(self.train_actor(buf))
        times["time/actor"], t0 = time.perf_counter() - t0, time.perf_counter()
        if self.cfg.estimator == "gae":
            with tl.span("critic"):
                stats.update(self.train_critic(buf))
        times["time/critic"] = time.perf_counter() - t0
        times["time/round"] = time.perf_counter() - start
        stats.update(times, **_buffer_stats(buf))
        return buf, self._end_round(parallel.all_gather_objects((stats, len(buf))))

    def _end_round(self, parts: list[tuple[dict, int]]) -> dict:
        """Pool every replica's (or shard's) stats, adapt the KL coefficient once with the
        pooled KL over all rollouts, count the round."""
        stats = pool_stats(parts)
        self.kl_ctl.update(stats["kl"], sum(n for _, n in parts))
        self.round += 1
        return stats

    def run_placed_round(self, shards: list[tuple[list[dict], list[list[int]]]]
                         ) -> tuple[dict[int, RolloutBuffer], dict, list[tuple[float, str]]]:
        """One round under the placement. `shards[s]` = (records, prompts) that replica s would
        take under flattening. Returns the shard buffers this replica trained the actor on, the
        round's stats (pooled over shards, as flattening pools its replicas) and shard 0's samples."""
        P, me, tl = self.placement, parallel.dp_rank(), self.timeline
        tl.start_round(self.round + 1)
        t0 = time.perf_counter()
        lengths = [len(p) * self.cfg.num_samples for _, p in shards]
        bufs = self._placed_rollout(shards)
        local = self._placed_scores(bufs)
        # Every replica draws every shard's minibatch orders (actor, then critic, as flattening
        # does), so the generators stay in step wherever the shard is trained.
        orders = {"actor": [], "critic": []}
        for g, n in zip(self.batch_orders, lengths):
            orders["actor"].append(self._orders(g, n))
            orders["critic"].append(self._orders(g, n) if self.cfg.estimator == "gae" else [])
        self._placed_train(bufs, orders, local)
        trained = {s: bufs[s] for s in P.shards("actor", me)}
        shown = range(min(self.cfg.log_samples, len(trained[0]))) if 0 in trained else []
        samples = [(float(trained[0].scores[i]), trained[0].texts[i]) for i in shown]
        with tl.span("stats"):
            parts = parallel.all_gather_objects({"stats": local, "samples": samples})
        by_shard: dict[int, dict] = {s: {} for s in range(len(shards))}
        samples = []
        for part in parts:
            for s, st in part["stats"].items():
                by_shard[s].update(st)
            samples += part["samples"]
        stats = self._end_round([(by_shard[s], n) for s, n in enumerate(lengths)])
        stats.update({f"time/{k}": v for k, v in tl.durations().items()})
        stats["time/round"] = time.perf_counter() - t0
        return trained, stats, samples

    def _share(self, local: dict, replicas: tuple[int, ...]) -> dict:
        """Every member of `replicas` ends with the union of the members' `local` dicts."""
        if len(replicas) < 2 or not parallel.member(replicas):
            return local
        merged: dict = {}
        with self.timeline.span("exchange"):
            for part in parallel.gather_objects(self.groups, local, replicas):
                merged.update(part)
        return merged

    def _placed_rollout(self, shards: list[tuple[list[dict], list[list[int]]]]) -> dict[int, RolloutBuffer]:
        P, me = self.placement, parallel.dp_rank()
        local = {}
        mine = P.shards("rollout", me)
        if mine:
            model = self.m.generator_model if P.generator else self.m.actor
            with self.timeline.span("rollout"):
                local = {s: self.rollout(*shards[s], model=model) for s in mine}
        return self._share(local, P.rollout_exchange())

    @torch.no_grad()
    def _placed_scores(self, bufs: dict[int, RolloutBuffer]) -> dict[int, dict]:
        """Scoring phases on their replica sets (disjoint sets at the same time), results
        exchanged, then advantages of the shards this replica trains; returns their stats."""
        P, me = self.placement, parallel.dp_rank()
        out: dict = {}
        for phase, fn in (("reference", self.reference_logprobs), ("reward", self.reward_scores),
                          ("values", self.critic_values)):
            mine = P.shards(phase, me)
            if mine:
                with self.timeline.span(phase):
                    out.update({(phase, s): fn(bufs[s]) for s in mine})
        got = self._share(out, P.score_exchange())
        stats = {}
        mine = P.advantage_shards(me)
        if mine:
            with self.timeline.span("advantages"):
                for s in mine:
                    buf = bufs[s]
                    buf.logprobs = buf.generation_logprobs()
                    buf.ref_logprobs = got[("reference", s)]
                    buf.scores = self.combine_scores(buf, got.get(("reward", s)))
                    buf.values = got.get(("values", s))
                    stats[s] = {**self.advantages(buf), **_buffer_stats(buf)}
        return stats

    def _placed_train(self, bufs: dict[int, RolloutBuffer], orders: dict, stats: dict[int, dict]) -> None:
        """Actor and critic updates on their replica sets (at the same time when disjoint);
        generator copies get the new actor weights. Adds each trained shard's stats to `stats`."""
        P, me = self.placement, parallel.dp_rank()
        mine = P.shards("actor", me)
        if mine:
            with self.timeline.span("actor"):
                done = self._train_actor([(bufs[s], orders["actor"][s]) for s in mine], P.actor)
            for s, st in zip(mine, done):
                stats.setdefault(s, {}).update(st)
        if P.generator and parallel.member(P.sync_set()):
            with self.timeline.span("sync"):
                model = self.m.actor if me == P.actor[0] else self.m.generator_model
                with self.m.phase(model) as mdl:
                    parallel.broadcast_params(self.groups, mdl, P.actor[0], P.sync_set())
        mine = P.shards("critic", me)
        if mine:
            with self.timeline.span("critic"):
                done = self._train_critic([(bufs[s], orders["critic"][s]) for s in mine], P.critic)
            for s, st in zip(mine, done):
                stats.setdefault(s, {}).update(st)


def _buffer_stats(buf: RolloutBuffer) -> dict:
    lengths = torch.tensor([len(r) for r in buf.responses], dtype=torch.float)
    return {"reward/mean": buf.scores.mean().item(), "reward/std": buf.scores.std().item(),
            "response_length": lengths.mean().item(), "finished": buf.finished.float().mean().item()}


def _f(v) -> float:
    return v.item() if torch.is_tensor(v) else float(v)


def _accumulate(acc: dict, stats: dict) -> None:
    for k, v in stats.items():
        acc.setdefault(k, []).append(_f(v))


def _mean(acc: dict, prefix: str) -> dict:
    return {prefix + k: sum(v) / len(v) for k, v in acc.items()}
