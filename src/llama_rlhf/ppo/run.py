"""`ppo_train.py`'s body: load the four models, run rounds, log, evaluate, checkpoint."""
from __future__ import annotations

import glob
import os
import random
import re
from typing import Optional

import torch

from .. import parallel
from ..checkpoint import CheckpointError, load_model, save_model, shard_files
from ..data.records import load_records
from ..data.template import format_prompt
from ..log import get_logger
from ..metrics import MetricsLogger
from ..models.args import read_args
from ..tokenizers import load_tokenizer
from .config import PPOConfig
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


def load_models(cfg: PPOConfig, resume_dir: Optional[str]) -> PPOModels:
    from ..lora import apply_lora
    from ..trainers.base import build_optimizer
    offload = torch.cuda.is_available() if cfg.offload is None else cfg.offload
    park = torch.device("cpu") if offload else parallel.device()
    dtype = parallel.autocast_dtype() if torch.cuda.is_available() else torch.float32
    actor_dir = resume_dir or cfg.actor_ckpt_dir
    actor = load_model(actor_dir, cfg.model_type, park, torch.float32, role="solver")
    if cfg.lora_rank > 0:
        apply_lora(actor, cfg.lora_rank, cfg.lora_alpha)
    reference = load_model(cfg.reference_ckpt_dir or cfg.actor_ckpt_dir, cfg.model_type, park, dtype, role="solver")
    reference.requires_grad_(False)
    critic = reward = None
    if cfg.estimator == "gae":
        critic_dir = _sibling(resume_dir, cfg.critic_save_dir) or cfg.critic_ckpt_dir
        critic = load_model(critic_dir, None, park, torch.float32, role="verifier")
    if "rm" in cfg.reward:
        reward = load_model(cfg.reward_model_ckpt_dir, None, park, dtype, role="verifier")
        reward.requires_grad_(False)
    actor_opt = build_optimizer([p for p in actor.parameters() if p.requires_grad], cfg.actor_lr, cfg.weight_decay)
    critic_opt = build_optimizer(critic.parameters(), cfg.critic_lr, cfg.weight_decay) if critic else None
    return PPOModels(actor, reference, critic, reward, actor_opt, critic_opt, offload)


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


def heldout_accuracy(cfg: PPOConfig, actor, tokenizer) -> float:
    """Greedy accuracy of the actor on `--label_file`, DP ranks splitting the records."""
    from ..evaluation.evaluate import generate_texts
    from ..evaluation.gsm8k import extract_answer, is_correct
    records = load_records(cfg.label_file, required=("instruction", "label"))
    mine = records[parallel.dp_rank()::parallel.dp_size()]
    actor.eval()
    texts = generate_texts(actor, tokenizer, [r["instruction"] for r in mine], max_new_tokens=cfg.max_new_tokens,
                           temperature=0.0, top_p=1.0, top_k=0, num_samples=1,
                           max_batch_size=cfg.eval_max_batch_size, seed=cfg.seed)
    correct = sum(is_correct(extract_answer(t[0]), r["label"]) for t, r in zip(texts, mine))
    return sum(parallel.all_gather_objects(correct)) / len(records)


def _save(cfg: PPOConfig, trainer: PPOTrainer, tokenizer_dir: str, epoch: int, position: int) -> None:
    from ..lora import merged_state_dict
    name = f"round-{trainer.round}"
    state = {"round": trainer.round, "epoch": epoch, "position": position, "kl_coef": trainer.kl_ctl.value,
             "generator": trainer.generator.get_state(), "actor_opt": trainer.m.actor_opt.state_dict(),
             "critic_opt": trainer.m.critic_opt.state_dict() if trainer.m.critic_opt else None}
    save_model(trainer.m.actor, os.path.join(cfg.actor_save_dir, name), tokenizer_dir, state=state,
               model_state=merged_state_dict(trainer.m.actor))
    if trainer.m.critic is not None and cfg.critic_save_dir:
        save_model(trainer.m.critic, os.path.join(cfg.critic_save_dir, name), tokenizer_dir)


def _restore(trainer: PPOTrainer, resume_dir: Optional[str]) -> tuple[int, int]:
    if not resume_dir:
        return 0, 0
    state = torch.load(os.path.join(resume_dir, f"state.{parallel.rank():02d}.pth"), weights_only=False)
    trainer.round, trainer.kl_ctl.value = state["round"], state["kl_coef"]
    trainer.generator.set_state(state["generator"])
    trainer.m.actor_opt.load_state_dict(state["actor_opt"])
    if state["critic_opt"] and trainer.m.critic_opt:
        trainer.m.critic_opt.load_state_dict(state["critic_opt"])
    log.info(f"resumed from {resume_dir} (round {trainer.round})")
    return state["epoch"], state["position"]


def _log_round(metrics: MetricsLogger, trainer: PPOTrainer, buf, stats: dict, n: int) -> None:
    metrics.log(trainer.round, stats)
    log.info(f"round {trainer.round}: reward {stats['reward/mean']:.3f} kl {stats['kl']:.3f} "
             f"ratio(first) {stats.get('first/ratio_mean', float('nan')):.6f}")
    for i in range(min(n, len(buf))):
        log.info(f"  sample {i}: score {buf.scores[i]:.3f} | {buf.texts[i][:200]!r}")


def train_ppo(cfg: PPOConfig) -> dict:
    """Run PPO; returns the last round's stats (and held-out accuracy when measured)."""
    from tqdm import tqdm
    cfg.validate()
    _check_critic(cfg)
    parallel.init(tp=len(shard_files(cfg.actor_ckpt_dir)))
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.actor_ckpt_dir)
    records, prompts = load_prompts(cfg, tok)
    resume_dir = latest_checkpoint(cfg.actor_save_dir) if cfg.resume else None
    trainer = PPOTrainer(cfg, load_models(cfg, resume_dir), tok)
    start_epoch, position = _restore(trainer, resume_dir)
    metrics = MetricsLogger(cfg.actor_save_dir) if parallel.is_main() else None
    dp, per_round = parallel.dp_size(), max(cfg.max_buffer_size // parallel.dp_size(), 1)
    stats: dict = {}
    bar = tqdm(total=cfg.max_rounds, desc="ppo", disable=not parallel.is_main())
    for epoch in range(start_epoch, cfg.epochs):
        order = list(range(len(records)))
        random.Random(cfg.seed + epoch).shuffle(order)
        mine = order[parallel.dp_rank()::dp]
        while position < len(mine) and (cfg.max_rounds is None or trainer.round < cfg.max_rounds):
            idx = mine[position:position + per_round]
            buf, stats = trainer.run_round([records[i] for i in idx], [prompts[i] for i in idx])
            position += per_round
            if cfg.save_buffer:
                buf.save(os.path.join(cfg.actor_save_dir, f"buffer.{parallel.rank():02d}.pt"))
            if metrics:
                _log_round(metrics, trainer, buf, stats, cfg.log_samples)
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", kl=f"{stats['kl']:.3f}")
        done = position >= len(mine)
        if cfg.label_file:
            with trainer.m.phase(trainer.m.actor) as actor:
                stats["heldout_accuracy"] = heldout_accuracy(cfg, actor, tok)
            if metrics:
                metrics.log(trainer.round, {"heldout_accuracy": stats["heldout_accuracy"], "epoch": epoch})
                log.info(f"epoch {epoch}: held-out accuracy {stats['heldout_accuracy']:.4f}")
        _save(cfg, trainer, cfg.actor_ckpt_dir, epoch + done, 0 if done else position)
        position = 0
        if not done:
            break
    if metrics:
        metrics.plot(["reward/mean", "kl", "actor/pg_loss", "critic/vf_loss", "heldout_accuracy"],
                     os.path.join(cfg.actor_save_dir, "ppo_curves.png"))
        metrics.close()
    return stats
