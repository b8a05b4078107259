"""The README's runnable commands, run.

A fenced code block right after a line `<!-- test -->` is run as bash from the repository
root, with the venv's `python` / `torchrun` first on PATH. Its upper-case placeholders
(whole words) are filled in before it runs:

    SRC     a tiny HF llama directory (random weights)
    DST     a fresh path for a consolidated checkpoint
    HF_DST  a fresh path for an HF export
    N       2 (the shard count)

Nothing else is rewritten, so a wrong script name, launcher or flag in the README fails here.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_rlhf.checkpoint import shard_files
from tests.helpers import ROOT, tiny_hf_model

MARKER = "<!-- test -->"
PLACEHOLDERS = ("SRC", "DST", "HF_DST", "N")


def marked_blocks(text: str) -> list[str]:
    """The bodies of the fenced blocks that directly follow a MARKER line."""
    lines, blocks = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
            raise AssertionError(f"README.md:{i + 1}: {MARKER} is not followed by a fenced code block")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise AssertionError(f"README.md:{i + 2}: the code block after {MARKER} is never closed")
        blocks.append("\n".join(lines[i + 2:end]) + "\n")
    return blocks


def fill(block: str, values: dict[str, str]) -> str:
    return re.sub(r"\b(" + "|".join(PLACEHOLDERS) + r")\b", lambda m: values[m.group(1)], block)


BLOCKS = marked_blocks((ROOT / "README.md").read_text())


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("readme") / "hf"
    tiny_hf_model("llama-tiny")[0].save_pretrained(path)
    return path


def test_readme_marks_the_checkpoint_split_block():
    assert any("checkpoint_split.py" in b for b in BLOCKS), f"no {MARKER} block runs checkpoint_split.py"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[0][:40] for b in BLOCKS])
def test_marked_block_runs(block, src, tmp_path):
    values = {"SRC": str(src), "DST": str(tmp_path / "dst"), "HF_DST": str(tmp_path / "hf_dst"), "N": "2"}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", fill(block, values)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README block failed ({proc.returncode}):\n{block}\n{proc.stderr[-3000:]}"
    if re.search(r"\bDST\b", block):  # what the checkpoint_split commands must have produced
        assert len(shard_files(values["DST"])) == 2
    if re.search(r"\bHF_DST\b", block):
        original, back = load_file(src / "model.safetensors"), load_file(tmp_path / "hf_dst/model.safetensors")
        assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)


def test_no_readme_command_launches_checkpoint_split_with_torchrun_or_n():
    """The code blocks outside the marked one (the pipeline walk-through) say the same."""
    fenced = False
    for i, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        fenced ^= line.startswith("```")
        if fenced and re.search(r"\bcheckpoint_split\.py --", line):
            assert not re.search(r"\btorchrun\b.*\bcheckpoint_split\.py", line), f"README.md:{i}: use python: {line}"
            assert not re.search(r"--n\b", line), f"README.md:{i}: use --num_shards: {line}"
