"""Where PPO's models live: which data-parallel replicas hold the actor, critic, reference,
reward model (and optional generator copies of the actor), and so where each phase runs.

A *replica* is one full tensor-parallel group of the TP x DP grid, so fairscale's TP groups
never change; a placement only says which replicas load which model. A model is never
loaded on a replica outside its set, which is what saves memory.

The data of a round is cut exactly as flattening cuts it: `num_replicas` *shards*, shard s
being the slice that replica s would own under flattening. A phase's replica set shares the
shards round-robin (`owner`), so a phase running on fewer replicas processes several shards
per replica, each exactly as flattening would; results then travel to the replicas that need
them. Hence every strategy computes the same rollouts, rewards, advantages and updates.

* flattening: every model on every replica, phases one after another.
* interleaving: actor and critic everywhere; reference on the first half, reward model on the
  second half, both scoring the whole buffer at the same time.
* separation: explicit sets from `--placement_file`; disjoint sets run concurrently.
* auto: the first of the above whose estimated memory per device fits (logged with why).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import MissingPathError, UsageError
from ..checkpoint import ckpt_args
from ..models.transformer import Transformer

STRATEGIES = ("flattening", "interleaving", "separation", "auto")
MODELS = ("actor", "critic", "reference", "reward", "generator")
GiB = 1024 ** 3


@dataclass(frozen=True)
class Placement:
    strategy: str
    num_replicas: int
    actor: tuple[int, ...]
    reference: tuple[int, ...]
    critic: tuple[int, ...] = ()  # () when the estimator needs no critic
    reward: tuple[int, ...] = ()  # () when there is no reward model
    generator: tuple[int, ...] = ()  # replicas that only sample, with a copy of the actor
    reason: str = ""

    @property
    def is_flat(self) -> bool:
        return self.strategy == "flattening"

    def replicas(self, model: str) -> tuple[int, ...]:
        """Replica set of a model, or of a phase: "rollout" samples on the generator copies when
        there are any, else on the actor; "values" is the critic's forward pass."""
        if model == "rollout":
            return self.generator or self.actor
        if model == "values":
            return self.critic
        return getattr(self, model)

    def holds(self, model: str, replica: int) -> bool:
        return replica in self.replicas(model)

    def owner(self, phase: str, shard: int) -> int:
        """The replica that runs `phase` on `shard` (round-robin over the phase's set)."""
        rs = self.replicas(phase)
        return rs[shard % len(rs)]

    def shards(self, phase: str, replica: int) -> list[int]:
        """The shards `replica` runs `phase` on (none when the phase is not placed there)."""
        if not self.replicas(phase):
            return []
        return [s for s in range(self.num_replicas) if self.owner(phase, s) == replica]

    def advantage_shards(self, replica: int) -> list[int]:
        """Shards whose advantages `replica` computes: those it trains the actor or critic on
        (a critic replica computes its own returns, so it need not wait for the actor)."""
        return sorted(set(self.shards("actor", replica)) | set(self.shards("critic", replica)))

    # Replica sets that exchange data in a round; every rank builds their groups up front.
    def rollout_exchange(self) -> tuple[int, ...]:
        return _union(self.replicas("rollout"), self.reference, self.reward, self.critic, self.actor)

    def score_exchange(self) -> tuple[int, ...]:
        return _union(self.reference, self.reward, self.critic, self.actor)

    def sync_set(self) -> tuple[int, ...]:
        return _union(self.actor[:1], self.generator) if self.generator else ()

    def group_sets(self) -> list[tuple[int, ...]]:
        return [s for s in (self.rollout_exchange(), self.score_exchange(), self.actor, self.critic,
                            self.sync_set()) if len(s) > 1]

    def describe(self, why: bool = True) -> str:
        parts = [f"{m} {list(self.replicas(m))}" for m in MODELS if self.replicas(m)]
        suffix = f" ({self.reason})" if self.reason and why else ""
        return f"placement {self.strategy} over {self.num_replicas} replicas: {', '.join(parts)}{suffix}"


def _union(*sets: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(set().union(*sets)))


# ----------------------------------------------------------------------------- the fixed strategies

def flattening(num_replicas: int, critic: bool, reward: bool, reason: str = "") -> Placement:
    every = tuple(range(num_replicas))
    return Placement("flattening", num_replicas, every, every, every if critic else (), every if reward else (),
                     reason=reason)


def interleaving(num_replicas: int, critic: bool, reward: bool, reason: str = "") -> Placement:
    if num_replicas < 2:
        raise UsageError(f"--placement interleaving needs at least 2 data-parallel replicas (world size / "
                         f"tensor-parallel size), got {num_replicas}")
    every, half = tuple(range(num_replicas)), num_replicas // 2
    # Without a reward model the second half has nothing to score: the reference takes all.
    ref = every[:half] if reward else every
    return Placement("interleaving", num_replicas, every, ref, every if critic else (),
                     every[half:] if reward else (), reason=reason)


def read_placement_file(path: str, num_replicas: int, critic: bool, reward: bool) -> Placement:
    """`--placement_file` JSON, e.g. {"actor": [0, 1], "critic": [2, 3], "reference": [2],
    "reward": [3], "generator": []}, checked against the replicas that exist."""
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise MissingPathError(f"--placement_file {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--placement_file {path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise UsageError(f"--placement_file {path}: expected a JSON object of model -> replica list")
    unknown = sorted(set(spec) - set(MODELS))
    if unknown:
        raise UsageError(f"--placement_file {path}: unknown model(s) {unknown}; expected keys from {list(MODELS)}")
    sets = {m: _replica_list(path, m, spec.get(m, []), num_replicas) for m in MODELS}
    needed = ["actor", "reference"] + (["critic"] if critic else []) + (["reward"] if reward else [])
    for m in needed:
        if not sets[m]:
            raise UsageError(f"--placement_file {path}: the {m} model has no replica (give \"{m}\": [replica, ...])")
    both = sorted(set(sets["generator"]) & set(sets["actor"]))
    if both:
        raise UsageError(f"--placement_file {path}: replica(s) {both} are both actor and generator; "
                         f"generator replicas only sample and must not hold the actor")
    return Placement("separation", num_replicas, sets["actor"], sets["reference"], sets["critic"] if critic else (),
                     sets["reward"] if reward else (), sets["generator"])


def _replica_list(path: str, model: str, value, num_replicas: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in value):
        raise UsageError(f"--placement_file {path}: {model} must be a list of replica indices, got {value!r}")
    for r in value:
        if not 0 <= r < num_replicas:
            raise UsageError(f"--placement_file {path}: {model} replica {r} does not exist (there are "
                             f"{num_replicas} replicas, 0..{num_replicas - 1}: world size / tensor-parallel size)")
    if len(set(value)) != len(value):
        raise UsageError(f"--placement_file {path}: {model} lists a replica twice: {value}")
    return tuple(sorted(value))


# ----------------------------------------------------------------------------- auto

def replica_memory(p: Placement, costs: dict[str, float], offload: bool) -> list[float]:
    """Estimated bytes per device of each replica under `p`: the models it holds, summed, or
    only the largest with offloading (one model on the accelerator at a time)."""
    out = []
    for r in range(p.num_replicas):
        held = [costs[m] for m in MODELS if p.holds(m, r) and m in costs]
        out.append(max(held, default=0.0) if offload else sum(held))
    return out


def _separation_layouts(num_replicas: int, critic: bool, reward: bool):
    """Actor on the first k replicas; critic, reference and reward model each on the first or
    the other group."""
    every = tuple(range(num_replicas))
    others = ["reference"] + (["critic"] if critic else []) + (["reward"] if reward else [])
    for k in range(1, num_replicas):
        groups = (every[:k], every[k:])
        for mask in range(2 ** len(others)):
            sets = {m: groups[(mask >> i) & 1] for i, m in enumerate(others)}
            yield Placement("separation", num_replicas, every[:k], sets["reference"], sets.get("critic", ()),
                            sets.get("reward", ()))


def choose_auto(num_replicas: int, costs: dict[str, float], budget: float, offload: bool,
                critic: bool, reward: bool) -> Placement:
    """Flattening when it fits (most parallel, no transfers), else interleaving (one scoring
    model less per replica), else the separation layout with the least memory per device."""
    def peak(p: Placement) -> float:
        return max(replica_memory(p, costs, offload))

    cands = [flattening(num_replicas, critic, reward)]
    if num_replicas >= 2:
        cands.append(interleaving(num_replicas, critic, reward))
        # Least memory first; then prefer balanced groups (more replicas for the smaller side).
        cands.append(min(_separation_layouts(num_replicas, critic, reward),
                         key=lambda p: (peak(p), -min(len(p.actor), num_replicas - len(p.actor)))))
    sizes = ", ".join(f"{m} {costs[m] / GiB:.2f}" for m in MODELS if m in costs)
    needs = "; ".join(f"{c.strategy} {peak(c) / GiB:.2f}" for c in cands)
    fits = [c for c in cands if peak(c) <= budget]
    chosen = fits[0] if fits else min(cands, key=peak)
    verdict = "the first that fits" if fits else "nothing fits, taking the smallest"
    reason = (f"auto: GiB per device needed: {needs}; budget {budget / GiB:.2f} GiB; "
              f"models (GiB per device) {sizes}; {verdict}")
    return Placement(chosen.strategy, num_replicas, chosen.actor, chosen.reference, chosen.critic, chosen.reward,
                     chosen.generator, reason)


def model_costs(cfg, tp: int, on_cuda: bool) -> dict[str, float]:
    """Bytes per device of each model: trained ones fp32 weights + grads + two AdamW moments
    (16 B/param, 4 with LoRA), scoring ones their weights in the compute dtype, each split over TP."""
    infer = 2 if on_cuda else 4
    actor_p = _param_count(ckpt_args(cfg.actor_ckpt_dir, cfg.model_type))
    train = 16 if cfg.lora_rank <= 0 else 4
    costs = {"actor": train * actor_p / tp,
             "reference": infer * _param_count(ckpt_args(cfg.reference_ckpt_dir or cfg.actor_ckpt_dir,
                                                          cfg.model_type)) / tp}
    if cfg.estimator == "gae":
        costs["critic"] = 16 * _param_count(ckpt_args(cfg.critic_ckpt_dir)) / tp
    if "rm" in cfg.reward:
        costs["reward"] = infer * _param_count(ckpt_args(cfg.reward_model_ckpt_dir)) / tp
    return costs


def _param_count(args) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(args).parameters())


def device_memory() -> float:
    """Bytes of one device: the GPU's memory, or this machine's RAM shared by its local ranks."""
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float(ram) / int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def resolve(cfg, num_replicas: int, tp: int, memory: Optional[float] = None) -> Placement:
    """The placement of `cfg.placement` over `num_replicas` replicas; raises on bad input
    before any model is loaded."""
    critic, reward = cfg.estimator == "gae", "rm" in cfg.reward
    if cfg.placement == "flattening":
        return flattening(num_replicas, critic, reward)
    if cfg.placement == "interleaving":
        return interleaving(num_replicas, critic, reward)
    if cfg.placement == "separation":
        return read_placement_file(cfg.placement_file, num_replicas, critic, reward)
    on_cuda = torch.cuda.is_available()
    offload = on_cuda if cfg.offload is None else cfg.offload
    budget = 0.8 * (memory or device_memory())  # the rest: activations, KV cache, allocator slack
    return choose_auto(num_replicas, model_costs(cfg, tp, on_cuda), budget, offload, critic, reward)
