"""Shared test helpers: tiny HF models on random weights, and a torchrun launcher."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from llama_rlhf.models import preset_args
from llama_rlhf.models.args import hf_config_from_args

ROOT = Path(__file__).resolve().parents[1]


def tiny_hf_model(preset: str, seed: int = 0, **overrides):
    """An HF transformers model built from one of our tiny presets, every weight random
    (norms too, so a wrong norm or permutation cannot hide behind ones)."""
    import transformers
    args = preset_args(preset, **overrides)
    cfg_dict = hf_config_from_args(args)
    cfg = transformers.AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" not in name else 0.2) + (1.0 if "norm" in name else 0.0))
    return model.eval(), args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str | Path, *argv: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with gloo on CPU; raise with its output when it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(script), *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_script(script: str, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run an entry script in a fresh process (exit code and stderr are part of its contract)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ppo_checkpoints(root: Path, n_prompts: int) -> Path:
    """A tiny actor (solver) and critic (verifier) at TP=1 and TP=2, a tokenizer and prompts."""
    from llama_rlhf.checkpoint import save_meta
    from llama_rlhf.records import write_json_atomic
    from llama_rlhf.data.synthetic import make_problems
    from llama_rlhf.models import build_model
    from llama_rlhf.tokenizers import load_tokenizer
    from tests.fakes import tiny_sentencepiece
    sp = tiny_sentencepiece(root)
    vocab = load_tokenizer(sp).vocab_size
    for name, head, seed in (("actor", 0, 0), ("critic", 1, 1)):
        args = preset_args("llama-tiny", vocab_size=vocab, reward_head=head)
        model = build_model(args, init_seed=seed)
        for n in (1, 2):
            save_meta(model.state_dict(), args, str(root / f"{name}-tp{n}"), n=n, tokenizer_path=sp)
    write_json_atomic(make_problems(n_prompts, seed=3), str(root / "prompts.json"))
    return root
