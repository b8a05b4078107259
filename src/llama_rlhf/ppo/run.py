"""`ppo_train.py`'s body: load the four models, run rounds, log, evaluate, checkpoint.

With a placement other than flattening (`--placement`), each replica loads only the models
placed on it, every round hands the trainer all replicas' prompt slices (it runs each where
the placement says), and a model held by some replicas only is saved by the first of them.
"""
from __future__ import annotations

import glob
import os
import random
import re
import shutil
from typing import Optional

import torch

from .. import parallel
from ..checkpoint import CheckpointError, load_model, save_model, shard_files
from ..data.records import load_records
from ..log import get_logger
from ..metrics import MetricsLogger
from ..models.args import read_args
from ..tasks.gsm8k import extract_answer, format_prompt, is_correct
from ..tokenizers import load_tokenizer
from . import timeline
from .config import PPOConfig
from .placement import Placement, resolve
from .trainer import PPOModels, PPOTrainer

log = get_logger(__name__)


def _check_critic(cfg: PPOConfig) -> None:
    """The critic scores the actor's tokens: it must share the vocabulary and be a verifier."""
    actor = read_args(cfg.actor_ckpt_dir, cfg.model_type)
    for name, path in (("--critic_ckpt_dir", cfg.critic_ckpt_dir), ("--reward_model_ckpt_dir", cfg.reward_model_ckpt_dir)):
        if not path:
            continue
        other = read_args(path)
        if other.vocab_size != actor.vocab_size:
            raise CheckpointError(f"{name} {path}: vocab_size {other.vocab_size} differs from the actor's "
                                  f"{actor.vocab_size}; it cannot score the actor's tokens")
        if len(shard_files(path)) != len(shard_files(cfg.actor_ckpt_dir)):
            raise CheckpointError(f"{name} {path}: {len(shard_files(path))} shards, the actor has "
                                  f"{len(shard_files(cfg.actor_ckpt_dir))} (re-split with checkpoint_split.py)")


def load_models(cfg: PPOConfig, resume_dir: Optional[str], placement: Optional[Placement] = None) -> PPOModels:
    """The models placed on this replica (all of them without a placement); others stay None."""
    from ..trainers.base import build_optimizer
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
    from ..lora import apply_lora
    actor = load_model(actor_dir, cfg.model_type, park, torch.float32, role="solver")
    if cfg.lora_rank > 0:
        apply_lora(actor, cfg.lora_rank, cfg.lora_alpha)
    return actor


def _sibling(resume_dir: Optional[str], save_root: Optional[str]) -> Optional[str]:
    if not resume_dir or not save_root:
        return None
    path = os.path.join(save_root, os.path.basename(resume_dir))
    return path if os.path.isdir(path) else None


def latest_checkpoint(save_dir: str) -> Optional[str]:
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(save_dir, "round-*"))
             if (m := re.search(r"round-(\d+)$", p)) and shard_files(p)]
    return max(found)[1] if found else None


def load_prompts(cfg: PPOConfig, tokenizer) -> tuple[list[dict], list[list[int]]]:
    records = load_records(cfg.train_file, required=("instruction",))
    if cfg.reward != "rm":
        for i, r in enumerate(records):
            if r.get("label") in (None, ""):
                raise ValueError(f"{cfg.train_file}: record {i} has no 'label', needed by --reward {cfg.reward}")
    prompts = [tokenizer.encode(format_prompt(r["instruction"]), bos=True) for r in records]
    return records, prompts


def heldout_accuracy(cfg: PPOConfig, actor, tokenizer, part: Optional[tuple[int, int]] = None) -> float:
    """Greedy accuracy of the actor on `--label_file`: replica `part[0]` of `part[1]` evaluating
    the actor (default: every DP replica) takes every part[1]-th record; `actor` None adds 0."""
    from ..evaluation.evaluate import generate_texts
    records = load_records(cfg.label_file, required=("instruction", "label"))
    index, count = part or (parallel.dp_rank(), parallel.dp_size())
    correct = 0
    if actor is not None:
        mine = records[index::count]
        actor.eval()
        texts = generate_texts(actor, tokenizer, [r["instruction"] for r in mine], max_new_tokens=cfg.max_new_tokens,
                               temperature=0.0, top_p=1.0, top_k=0, num_samples=1,
                               max_batch_size=cfg.eval_max_batch_size, seed=cfg.seed)
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


def _save(cfg: PPOConfig, trainer: PPOTrainer, tokenizer_dir: str, epoch: int, position: int) -> None:
    from ..lora import merged_state_dict
    name, m, P = f"round-{trainer.round}", trainer.m, trainer.placement
    state = {"round": trainer.round, "epoch": epoch, "position": position, "kl_coef": trainer.kl_ctl.value,
             "generator": trainer.generator.get_state(), "placement": P.describe(why=False) if P else None,
             "actor_opt": m.actor_opt.state_dict() if m.actor_opt else None,
             "critic_opt": m.critic_opt.state_dict() if m.critic_opt else None}
    if P is None or P.is_flat:
        save_model(m.actor, os.path.join(cfg.actor_save_dir, name), tokenizer_dir, state=state,
                   model_state=merged_state_dict(m.actor))
        if m.critic is not None and cfg.critic_save_dir:
            save_model(m.critic, os.path.join(cfg.critic_save_dir, name), tokenizer_dir)
        return
    # Placed: every shard's minibatch generator and KL coefficient, so any replica can resume any shard.
    state["shards"] = [{"generator": g.get_state(), "kl_coef": c.value}
                       for g, c in zip(trainer.generators, trainer.kl_ctls)]
    _save_placed(m.actor, lambda: merged_state_dict(m.actor), os.path.join(cfg.actor_save_dir, name),
                 tokenizer_dir, P.actor[0], state)
    if cfg.estimator == "gae" and cfg.critic_save_dir:
        _save_placed(m.critic, lambda: m.critic.state_dict(), os.path.join(cfg.critic_save_dir, name),
                     tokenizer_dir, P.critic[0])


def _save_placed(model, weights, dst: str, tokenizer_src: str, writer: int, state: Optional[dict] = None) -> None:
    """`save_model` for a model that only some replicas hold: replica `writer` (its TP ranks)
    writes the shards and params.json, every rank its `state`; called by every rank."""
    from ..models import write_params
    from ..tokenizers import load_tokenizer, save_tokenizer
    tmp, mine = dst + ".tmp", parallel.dp_rank() == writer
    lead = mine and parallel.tp_rank() == 0
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    parallel.barrier()
    if mine:
        sd = {k: v.detach().to("cpu").clone() for k, v in weights().items()}
        torch.save(sd, os.path.join(tmp, f"consolidated.{parallel.tp_rank():02d}.pth"))
    if state is not None:
        torch.save(state, os.path.join(tmp, f"state.{parallel.rank():02d}.pth"))
    parallel.barrier()
    if lead:
        write_params(model.args, tmp)
        save_tokenizer(load_tokenizer(tokenizer_src), tmp)
        if os.path.exists(dst):
            os.replace(dst, dst + ".old")
        os.replace(tmp, dst)
        shutil.rmtree(dst + ".old", ignore_errors=True)
    parallel.barrier()


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
    trainer.generator.set_state(state["generator"])
    for g, c, shard in zip(trainer.generators, trainer.kl_ctls, state.get("shards", [])):
        g.set_state(shard["generator"])
        c.value = shard["kl_coef"]
    if state["actor_opt"] and trainer.m.actor_opt:
        trainer.m.actor_opt.load_state_dict(state["actor_opt"])
    if state["critic_opt"] and trainer.m.critic_opt:
        trainer.m.critic_opt.load_state_dict(state["critic_opt"])
    log.info(f"resumed from {resume_dir} (round {trainer.round})")
    return state["epoch"], state["position"]


def _log_round(metrics: MetricsLogger, trainer: PPOTrainer, samples: list[tuple[float, str]], stats: dict,
               n: int) -> None:
    metrics.log(trainer.round, stats)
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


def train_ppo(cfg: PPOConfig) -> dict:
    """Run PPO; returns the last round's stats (and held-out accuracy when measured)."""
    from tqdm import tqdm
    cfg.validate()
    _check_critic(cfg)
    parallel.init(tp=len(shard_files(cfg.actor_ckpt_dir)))
    placement = resolve(cfg, parallel.dp_size(), parallel.tp_size())  # bad input fails before any model loads
    log.info(placement.describe())
    groups = None if placement.is_flat else parallel.ReplicaGroups(placement.group_sets())
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.actor_ckpt_dir)
    records, prompts = load_prompts(cfg, tok)
    resume_dir = latest_checkpoint(cfg.actor_save_dir) if cfg.resume else None
    trainer = PPOTrainer(cfg, load_models(cfg, resume_dir, placement), tok, placement=placement, groups=groups)
    start_epoch, position = _restore(trainer, resume_dir)
    metrics = MetricsLogger(cfg.actor_save_dir) if parallel.is_main() else None
    dp, per_round = parallel.dp_size(), max(cfg.max_buffer_size // parallel.dp_size(), 1)
    stats: dict = {}
    bar = tqdm(total=cfg.max_rounds, desc="ppo", disable=not parallel.is_main())
    for epoch in range(start_epoch, cfg.epochs):
        order = list(range(len(records)))
        random.Random(cfg.seed + epoch).shuffle(order)
        slices = [order[s::dp] for s in range(dp)]
        # Placed rounds run every shard together: stop when the shortest slice is used up.
        end = len(slices[parallel.dp_rank()]) if placement.is_flat else min(len(sl) for sl in slices)
        while position < end and (cfg.max_rounds is None or trainer.round < cfg.max_rounds):
            bufs, samples, stats = _round(cfg, trainer, records, prompts, slices, position, per_round)
            position += per_round
            if cfg.save_buffer:
                _save_buffers(cfg, trainer, bufs)
            if metrics:
                _log_round(metrics, trainer, samples, stats, cfg.log_samples)
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats['kl']:.3f}")
        done = position >= end
        if cfg.label_file:
            stats["heldout_accuracy"] = _heldout(cfg, trainer, tok)
            if metrics:
                metrics.log(trainer.round, {"heldout_accuracy": stats["heldout_accuracy"], "epoch": epoch})
                log.info(f"epoch {epoch}: held-out accuracy {stats['heldout_accuracy']:.4f}")
        _save(cfg, trainer, cfg.actor_ckpt_dir, epoch + done, 0 if done else position)
        position = 0
        if not done:
            break
    _write_timeline(cfg, trainer)
    if metrics:
        metrics.plot(["reward/mean", "kl", "actor/pg_loss", "critic/vf_loss", "heldout_accuracy"],
                     os.path.join(cfg.actor_save_dir, "ppo_curves.png"))
        metrics.close()
    return stats
