"""Multi-node as torchrun does it: two agents on this machine (`--nnodes 2`, one process each,
rendezvous on 127.0.0.1) run SFT at TP = 2 across the two "nodes" through solver_train.py,
and log the same losses as one agent with `--nproc_per_node 2` (README, "Tensor and data
parallelism")."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llama_rlhf.checkpoint import save_meta
from llama_rlhf.data.synthetic import make_problems
from llama_rlhf.models import build_model, preset_args
from llama_rlhf.tokenizers import load_tokenizer
from tests.fakes import tiny_sentencepiece
from tests.helpers import ROOT

STEPS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tokenizer, a llama-tiny checkpoint in 2 shards and a synthetic train file."""
    root = tmp_path_factory.mktemp("multinode")
    sp = tiny_sentencepiece(root)
    args = preset_args("llama-tiny", vocab_size=load_tokenizer(sp).vocab_size)
    save_meta(build_model(args, init_seed=0).state_dict(), args, str(root / "tp2"), 2, tokenizer_path=sp)
    with open(root / "train.jsonl", "w") as f:
        for p in make_problems(24, 0):
            f.write(json.dumps(p) + "\n")
    return root


def _ports(n: int) -> list[int]:
    """`n` distinct free ports (held open together while chosen, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _agent(launch: list[str], tiny: Path, save_dir: Path) -> subprocess.Popen:
    """One torchrun agent running a few SFT steps of the TP = 2 checkpoint."""
    train = ["--ckpt_dir", tiny / "tp2", "--save_dir", save_dir, "--train_file", tiny / "train.jsonl",
             "--max_batch_size", 2, "--max_seq_len", 64, "--max_steps", STEPS, "--lr", 1e-3, "--seed", 1,
             "--log_steps", 1]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, str(ROOT / "solver_train.py"), *map(str, train)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(procs: list[subprocess.Popen], save_dir: Path) -> list[float]:
    for p in procs:
        out, err = p.communicate(timeout=300)
        launch = " ".join(p.args[3:9])
        assert p.returncode == 0, f"{save_dir.name}: agent {launch} failed ({p.returncode}):\n{err[-4000:]}"
    rows = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


def test_two_nodes_equal_one(tiny, tmp_path):
    """The static form of the README (--node_rank, --master_addr / --master_port; the c10d form
    differs only in how torchrun finds the peers), against one agent with two processes."""
    master, single = _ports(2)
    forms = {
        "two": [["--nnodes", "2", "--node_rank", str(r), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                 "--master_port", str(master)] for r in (0, 1)],
        "one": [["--nnodes", "1", "--nproc_per_node", "2", "--master_port", str(single)]],
    }
    procs = {name: [_agent(launch, tiny, tmp_path / name) for launch in agents] for name, agents in forms.items()}
    try:
        losses = {name: _losses(p, tmp_path / name) for name, p in procs.items()}
    finally:  # a failed agent leaves its peer waiting for it: stop what is still running
        for left in [p for agents in procs.values() for p in agents if p.poll() is None]:
            left.terminate()
            left.wait(timeout=60)
    assert losses["two"] == pytest.approx(losses["one"], abs=1e-5, rel=0)
