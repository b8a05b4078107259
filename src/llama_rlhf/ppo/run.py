"""`ppo_train.py`'s body: load the four models, run rounds, log, evaluate, checkpoint.

With a placement other than flattening (`--placement`), each replica loads only the models
placed on it, every round hands the trainer all replicas' prompt slices (it runs each where
the placement says), and a model held by some replicas only is saved by the first of them.
"""
from __future__ import annotations

import os
import random
from typing import Optional

import torch
from tqdm import tqdm

from .. import parallel
from ..checkpoint import CheckpointError, ckpt_args, load_model, save_model, shard_files
from ..data.encoding import encode_prompt
from ..records import load_records
from ..errors import UsageError
from ..evaluation.evaluate import generate_texts
from ..log import get_logger
from ..lora import apply_lora, merged_state_dict
from ..metrics import MetricsLogger
from ..tasks.gsm8k import extract_answer, is_correct
from ..tokenizers import load_tokenizer
from ..trainers.optim import NonFiniteError, TrainingError, build_optimizer
from ..trainers.state import latest_checkpoint
from . import timeline
from .config import PPOConfig
from .placement import Placement, resolve
from .trainer import PPOModels, PPOTrainer

log = get_logger(__name__)


def _check_critic(cfg: PPOConfig) -> None:
    """The critic scores the actor's tokens: it must share the vocabulary and be a verifier."""
    actor = ckpt_args(cfg.actor_ckpt_dir, cfg.model_type)
    for name, path in (("--critic_ckpt_dir", cfg.critic_ckpt_dir), ("--reward_model_ckpt_dir", cfg.reward_model_ckpt_dir)):
        if not path:
            continue
        other = ckpt_args(path)
        if other.vocab_size != actor.vocab_size:
            raise CheckpointError(f"{name} {path}: vocab_size {other.vocab_size} differs from the actor's "
                                  f"{actor.vocab_size}; it cannot score the actor's tokens")
        if len(shard_files(path)) != len(shard_files(cfg.actor_ckpt_dir)):
            raise CheckpointError(f"{name} {path}: {len(shard_files(path))} shards, the actor has "
                                  f"{len(shard_files(cfg.actor_ckpt_dir))} (re-split with checkpoint_split.py)")


def load_models(cfg: PPOConfig, resume_dir: Optional[str], placement: Optional[Placement] = None) -> PPOModels:
    """The models placed on this replica (all of them without a placement); others stay None."""
    me = parallel.dp_rank()

    def here(model: str) -> bool:
        return placement is None or placement.holds(model, me)

    offload = torch.cuda.is_available() if cfg.offload is None else cfg.offload
    park = torch.device("cpu") if offload else parallel.device()
    dtype = parallel.autocast_dtype() if torch.cuda.is_available() else torch.float32
    actor_dir = resume_dir or cfg.actor_ckpt_dir
    actor = _load_actor(cfg, actor_dir, park) if here("actor") else None
    generator = _load_actor(cfg, actor_dir, park) if placement is not None and here("generator") else None
    reference = None
    if here("reference"):
        reference = load_model(cfg.reference_ckpt_dir or cfg.actor_ckpt_dir, cfg.model_type, park, dtype, role="solver")
        reference.requires_grad_(False)
    critic = reward = None
    if cfg.estimator == "gae" and here("critic"):
        critic_dir = _sibling(resume_dir, cfg.critic_save_dir) or cfg.critic_ckpt_dir
        critic = load_model(critic_dir, None, park, torch.float32, role="verifier")
    if "rm" in cfg.reward and here("reward"):
        reward = load_model(cfg.reward_model_ckpt_dir, None, park, dtype, role="verifier")
        reward.requires_grad_(False)
    actor_opt = build_optimizer([p for p in actor.parameters() if p.requires_grad], cfg.actor_lr,
                                cfg.weight_decay) if actor else None
    critic_opt = build_optimizer(critic.parameters(), cfg.critic_lr, cfg.weight_decay) if critic else None
    return PPOModels(actor, reference, critic, reward, actor_opt, critic_opt, offload, generator)


def _load_actor(cfg: PPOConfig, actor_dir: str, park: torch.device):
    """The trained policy (or a generator's copy of it: built the same way, so the actor's
    trainable parameters map one to one onto it)."""
    actor = load_model(actor_dir, cfg.model_type, park, torch.float32, role="solver")
    if cfg.lora_rank > 0:
        apply_lora(actor, cfg.lora_rank, cfg.lora_alpha)
    return actor


def _sibling(resume_dir: Optional[str], save_root: Optional[str]) -> Optional[str]:
    if not resume_dir or not save_root:
        return None
    path = os.path.join(save_root, os.path.basename(resume_dir))
    return path if os.path.isdir(path) else None


def load_prompts(cfg: PPOConfig, tokenizer) -> tuple[list[dict], list[list[int]]]:
    records = load_records(cfg.train_file, required=("instruction",))
    if cfg.reward != "rm":
        for i, r in enumerate(records):
            if r.get("label") in (None, ""):
                raise UsageError(f"{cfg.train_file}: record {i} has no 'label', needed by --reward {cfg.reward}")
    fmt = cfg.prompt
    prompts = [encode_prompt(tokenizer, r["instruction"], fmt) for r in records]
    return records, prompts


def heldout_accuracy(cfg: PPOConfig, actor, tokenizer, part: Optional[tuple[int, int]] = None) -> float:
    """Greedy accuracy of the actor on `--label_file` (`cfg.heldout_file`): replica `part[0]` of `part[1]` evaluating
    the actor (default: every DP replica) takes every part[1]-th record; `actor` None adds 0."""
    records = load_records(cfg.heldout_file, required=("instruction", "label"))
    index, count = part or (parallel.dp_rank(), parallel.dp_size())
    correct = 0
    if actor is not None:
        mine = records[index::count]
        actor.eval()
        texts = generate_texts(actor, tokenizer, [r["instruction"] for r in mine], max_new_tokens=cfg.max_new_tokens,
                               temperature=0.0, top_p=1.0, top_k=0, num_samples=1,
                               max_batch_size=cfg.eval_max_batch_size, seed=cfg.seed, fmt=cfg.prompt)
        correct = sum(is_correct(extract_answer(t[0]), r["label"]) for t, r in zip(texts, mine))
    return sum(parallel.all_gather_objects(correct)) / len(records)


def _heldout(cfg: PPOConfig, trainer: PPOTrainer, tokenizer) -> float:
    """Held-out accuracy on the actor's replicas (all of them under flattening)."""
    m, me = trainer.m, parallel.dp_rank()
    if m.actor is None:
        return heldout_accuracy(cfg, None, tokenizer)
    actors = trainer.placement.actor if trainer.placement else tuple(range(parallel.dp_size()))
    with m.phase(m.actor) as actor:
        return heldout_accuracy(cfg, actor, tokenizer, (actors.index(me), len(actors)))


def _save(cfg: PPOConfig, trainer: PPOTrainer, tokenizer_path: str, epoch: int, position: int) -> None:
    """round-N of the actor (with every rank's state) and the critic, through the one writer.
    Placed models are written by the first replica that holds them."""
    name, m, P = f"round-{trainer.round}", trainer.m, trainer.placement
    state = {"round": trainer.round, "epoch": epoch, "position": position, "kl_coef": trainer.kl_ctl.value,
             "batch_order": trainer.batch_order.get_state(), "placement": P.describe(why=False) if P else None,
             "actor_opt": m.actor_opt.state_dict() if m.actor_opt else None,
             "critic_opt": m.critic_opt.state_dict() if m.critic_opt else None}
    flat = P is None or P.is_flat
    if not flat:  # every shard's minibatch order, so any replica can resume any shard
        state["shards"] = [{"batch_order": g.get_state()} for g in trainer.batch_orders]
    save_model(m.actor, os.path.join(cfg.actor_save_dir, name), tokenizer_path, state=state,
               model_state=lambda: merged_state_dict(m.actor), prompt=cfg.prompt.recorded(),
               writer_replica=None if flat else P.actor[0])
    if cfg.estimator == "gae" and cfg.critic_save_dir:
        save_model(m.critic, os.path.join(cfg.critic_save_dir, name), tokenizer_path,
                   writer_replica=None if flat else P.critic[0], prompt=cfg.prompt.recorded())


def _restore(trainer: PPOTrainer, resume_dir: Optional[str]) -> tuple[int, int]:
    if not resume_dir:
        return 0, 0
    state = torch.load(os.path.join(resume_dir, f"state.{parallel.rank():02d}.pth"), weights_only=False)
    here = trainer.placement.describe(why=False) if trainer.placement else None
    if state.get("placement") not in (None, here) and parallel.is_main():
        # Weights carry over; each shard's minibatch RNG / KL state and the optimizer only where
        # this rank held them before.
        log.warning(f"resuming {resume_dir} ({state['placement']}) under {here}: per-shard sampling "
                    f"order, KL and optimizer state may not carry over exactly")
    trainer.round, trainer.kl_ctl.value = state["round"], state["kl_coef"]
    trainer.batch_order.set_state(state["batch_order"])
    for g, shard in zip(trainer.batch_orders, state.get("shards", [])):
        g.set_state(shard["batch_order"])
    if state["actor_opt"] and trainer.m.actor_opt:
        trainer.m.actor_opt.load_state_dict(state["actor_opt"])
    if state["critic_opt"] and trainer.m.critic_opt:
        trainer.m.critic_opt.load_state_dict(state["critic_opt"])
    log.info(f"resumed from {resume_dir} (round {trainer.round})")
    return state["epoch"], state["position"]


def _log_round(metrics: MetricsLogger, trainer: PPOTrainer, samples: list[tuple[float, str]], stats: dict,
               n: int) -> None:
    metrics.log(trainer.round, stats)
    if not parallel.is_main():
        return
    log.info(f"round {trainer.round}: reward {stats['reward/mean']:.3f} kl {stats['kl']:.3f} "
             f"ratio(first) {stats.get('first/ratio_mean', float('nan')):.6f}")
    for i, (score, text) in enumerate(samples[:n]):
        log.info(f"  sample {i}: score {score:.3f} | {text[:200]!r}")


def _round(cfg: PPOConfig, trainer: PPOTrainer, records: list[dict], prompts: list[list[int]],
           slices: list[list[int]], position: int, per_round: int) -> tuple[dict, list, dict]:
    """One round: this replica's slice under flattening, every replica's slice when placed.
    Returns the buffers to save (by shard), shard 0's samples and the stats."""
    if trainer.placement is None or trainer.placement.is_flat:
        idx = slices[parallel.dp_rank()][position:position + per_round]
        buf, stats = trainer.run_round([records[i] for i in idx], [prompts[i] for i in idx])
        return {parallel.dp_rank(): buf}, [(float(buf.scores[i]), buf.texts[i]) for i in range(len(buf))], stats
    cuts = [sl[position:position + per_round] for sl in slices]
    shards = [([records[i] for i in idx], [prompts[i] for i in idx]) for idx in cuts]
    bufs, stats, samples = trainer.run_placed_round(shards)
    return bufs, samples, stats


def _save_buffers(cfg: PPOConfig, trainer: PPOTrainer, bufs: dict) -> None:
    if trainer.placement is None or trainer.placement.is_flat:
        for buf in bufs.values():
            buf.save(os.path.join(cfg.actor_save_dir, f"buffer.{parallel.rank():02d}.pt"))
        return
    os.makedirs(cfg.actor_save_dir, exist_ok=True)
    if parallel.tp_rank() == 0:  # the actor replica that trained shard s writes it
        for s, buf in bufs.items():
            buf.save(os.path.join(cfg.actor_save_dir, f"buffer.shard{s:02d}.pt"))


def _write_timeline(cfg: PPOConfig, trainer: PPOTrainer) -> None:
    """The last round's phases of every rank -> timeline.json / timeline.png (rank 0)."""
    snap = trainer.timeline.snapshot(parallel.rank(), parallel.dp_rank(), parallel.tp_rank())
    snaps = parallel.all_gather_ranks(snap)
    if parallel.is_main() and any(s["events"] for s in snaps):
        p = trainer.placement
        timeline.write(cfg.actor_save_dir, snaps, p.strategy if p else "flattening", p.describe() if p else "")


def _setup(cfg: PPOConfig) -> tuple[PPOTrainer, list[dict], list[list[int]], Optional[str]]:
    """World, placement, tokenizer, prompts and the four models (from the latest round when
    resuming); returns the trainer, records, prompt ids and the dir resumed from."""
    cfg.validate()
    _check_critic(cfg)
    parallel.init(tp=len(shard_files(cfg.actor_ckpt_dir)))
    placement = resolve(cfg, parallel.dp_size(), parallel.tp_size())  # bad input fails before any model loads
    log.info(placement.describe())
    groups = None if placement.is_flat else parallel.ReplicaGroups(placement.group_sets())
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.actor_ckpt_dir)
    records, prompts = load_prompts(cfg, tok)
    found = latest_checkpoint(cfg.actor_save_dir) if cfg.resume else None
    resume_dir = found[0] if found else None
    if cfg.resume and resume_dir is None:
        log.warning(f"--resume: no complete round-N checkpoint in {cfg.actor_save_dir}; starting from scratch")
    trainer = PPOTrainer(cfg, load_models(cfg, resume_dir, placement), tok, placement=placement, groups=groups)
    return trainer, records, prompts, resume_dir


def _stopped(cfg: PPOConfig, trainer: PPOTrainer, why: str) -> TrainingError:
    found = latest_checkpoint(cfg.actor_save_dir)
    last = found[0] if found else "none (no round was saved yet)"
    return TrainingError(f"{why} in round {trainer.round + 1}; stopped without saving, last good checkpoint: {last}")


def train_ppo(cfg: PPOConfig) -> dict:
    """Run PPO; returns the last round's stats (and held-out accuracy when measured)."""
    trainer, records, prompts, resume_dir = _setup(cfg)
    start_epoch, position = _restore(trainer, resume_dir)
    metrics = MetricsLogger(cfg.actor_save_dir, resume_step=trainer.round + 1 if cfg.resume else None)
    placement, dp = trainer.placement, parallel.dp_size()
    per_round = max(cfg.max_buffer_size // dp, 1)
    stats: dict = {}
    bar = tqdm(total=cfg.max_rounds, initial=trainer.round, desc="ppo", disable=not parallel.is_main())
    for epoch in range(start_epoch, cfg.epochs):
        order = list(range(len(records)))
        random.Random(cfg.seed + epoch).shuffle(order)
        slices = [order[s::dp] for s in range(dp)]
        # Placed rounds run every shard together: stop when the shortest slice is used up.
        end = len(slices[parallel.dp_rank()]) if placement.is_flat else min(len(sl) for sl in slices)
        while position < end and (cfg.max_rounds is None or trainer.round < cfg.max_rounds):
            try:
                bufs, samples, stats = _round(cfg, trainer, records, prompts, slices, position, per_round)
            except NonFiniteError as e:
                raise _stopped(cfg, trainer, str(e)) from None
            position += per_round
            if cfg.save_buffer:
                _save_buffers(cfg, trainer, bufs)
            _log_round(metrics, trainer, samples, stats, cfg.log_samples)
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats['kl']:.3f}")
            if cfg.save_rounds and trainer.round % cfg.save_rounds == 0 and position < end:
                _save(cfg, trainer, cfg.actor_ckpt_dir, epoch, position)
        done = position >= end
        if cfg.heldout_file:
            stats["heldout_accuracy"] = _heldout(cfg, trainer, trainer.tok)
            metrics.log(trainer.round, {"heldout_accuracy": stats["heldout_accuracy"], "epoch": epoch})
            log.info(f"epoch {epoch}: held-out accuracy {stats['heldout_accuracy']:.4f}")
        _save(cfg, trainer, cfg.actor_ckpt_dir, epoch + done, 0 if done else position)
        position = 0
        if not done:
            break
    bar.close()
    _write_timeline(cfg, trainer)
    metrics.plot(["reward/mean", "kl", "actor/pg_loss", "critic/vf_loss", "heldout_accuracy"],
                 os.path.join(cfg.actor_save_dir, "ppo_curves.png"))
    metrics.close()
    return stats
