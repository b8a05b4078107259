"""Checkpoint writes are atomic: a writer killed (SIGKILL) in the middle of a save leaves the
previous checkpoint loadable and `--resume`'s lookup on it, and what the killed writer left
does not disturb the next save. Also: `save_model(writer_replica=...)` for a model that only
some data-parallel replicas hold (torchrun, DP = 2).

The killed saves run in a child process (`python -c "...; _killed_save(...)"`) whose
`torch.save` / `os.replace` are patched to SIGKILL the process at a chosen file.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_rlhf import parallel
from llama_rlhf.checkpoint import atomic_torch_save, load_model, load_source, save_meta, save_model, shard_files
from llama_rlhf.models import build_model, preset_args
from llama_rlhf.ppo.buffer import RolloutBuffer
from llama_rlhf.trainers.base import latest_checkpoint
from tests.helpers import ROOT, torchrun


def _model(seed: int):
    return build_model(preset_args("llama-tiny"), init_seed=seed)


def _die_in_torch_save(marker: str) -> None:
    """The torch.save into a file whose name contains `marker` writes half its bytes, then the
    process is SIGKILLed: a torn file, as a crash mid-write leaves it."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        name = os.path.basename(str(getattr(f, "name", f)))
        if marker not in name:
            return real(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


def _die_in_swap(dst: str) -> None:
    """SIGKILL right after the old `dst` was moved aside, before the new one takes its name."""
    real = os.replace

    def replace(src, target):
        if os.fspath(target) == dst:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, target)

    os.replace = replace


def _killed_save(kind: str, dst: str, seed: int, marker: str) -> None:
    """Child process: one save of `kind` ("model": save_model with a state file, "split":
    save_meta into 2 shards) that is killed at `marker` ("swap": between the two renames)."""
    if marker == "swap":
        _die_in_swap(dst)
    else:
        _die_in_torch_save(marker)
    model = _model(seed)
    if kind == "model":
        save_model(model, dst, state={"step": seed})
    else:
        save_meta(model.state_dict(), model.args, dst, 2, overwrite=True)
    raise AssertionError("the save was expected to be killed")


def _run_killed(kind: str, dst: Path, seed: int, marker: str) -> None:
    code = f"from tests.test_atomic_save import _killed_save; _killed_save({kind!r}, {str(dst)!r}, {seed}, {marker!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _weights(seed: int) -> dict:
    return _model(seed).state_dict()


def _assert_holds(ckpt_dir: Path, seed: int) -> None:
    loaded = load_model(str(ckpt_dir)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in _weights(seed).items())


def test_killed_model_save_keeps_the_previous_checkpoint(tmp_path):
    save_model(_model(1), str(tmp_path / "step-1"), state={"step": 1})
    _run_killed("model", tmp_path / "step-2", 2, "state.00")  # the shard is written, its state file torn
    assert not (tmp_path / "step-2").exists() and (tmp_path / "step-2.tmp").is_dir()
    found = latest_checkpoint(str(tmp_path))
    assert found is not None and found[0] == str(tmp_path / "step-1") and found[1]["step"] == 1
    _assert_holds(tmp_path / "step-1", 1)

    save_model(_model(2), str(tmp_path / "step-2"), state={"step": 2})  # over the killed run's leftovers
    assert latest_checkpoint(str(tmp_path))[0] == str(tmp_path / "step-2")
    _assert_holds(tmp_path / "step-2", 2)
    assert sorted(os.listdir(tmp_path)) == ["step-1", "step-2"]
    assert sorted(os.listdir(tmp_path / "step-2")) == ["consolidated.00.pth", "params.json", "state.00.pth"]


def test_killed_split_between_shards_keeps_the_previous_dir(tmp_path):
    dst = tmp_path / "tp2"
    save_meta(_weights(1), preset_args("llama-tiny"), str(dst), 2)
    _run_killed("split", dst, 2, "consolidated.01")  # shard 0 written, shard 1 torn
    sd, _ = load_source(str(dst))
    assert all(torch.equal(sd[k], v) for k, v in _weights(1).items())
    save_meta(_weights(2), preset_args("llama-tiny"), str(dst), 2, overwrite=True)
    sd, _ = load_source(str(dst))
    assert all(torch.equal(sd[k], v) for k, v in _weights(2).items())
    assert os.listdir(tmp_path) == ["tp2"] and len(shard_files(str(dst))) == 2


def test_killed_between_the_renames_is_repaired_by_the_next_save(tmp_path):
    dst = tmp_path / "step-1"
    save_model(_model(1), str(dst), state={"step": 1})
    _run_killed("model", dst, 2, "swap")  # the old dir is moved aside, the new one not yet in place
    assert not dst.exists() and (tmp_path / "step-1.old").is_dir()
    # the next save first puts the whole old dir back, so a crash during it still leaves step-1
    _run_killed("model", dst, 3, "consolidated.00")
    assert latest_checkpoint(str(tmp_path))[0] == str(dst)
    _assert_holds(dst, 1)


def test_atomic_torch_save_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "buffer.00.pt")
    buf = RolloutBuffer([[1, 2]], [[3]], ["4"], torch.tensor([True]), [[-0.5]])
    buf.save(path)
    real = torch.save

    def torn(obj, f, *args, **kwargs):
        f.write(b"half a buffer")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"other": 1}, path)
    assert RolloutBuffer.load(path).responses == [[3]]
    monkeypatch.setattr(torch, "save", real)
    buf.responses = [[5]]
    buf.save(path)  # a stale buffer.00.pt.tmp is simply overwritten
    assert RolloutBuffer.load(path).responses == [[5]] and os.listdir(tmp_path) == ["buffer.00.pt"]


# ----------------------------------------------------------------------------- placed models (DP = 2)

def _placed_worker(out: str) -> None:
    """torchrun worker: replica 1 alone holds a model (seed 7) and writes it; then both replicas
    hold one (seeds 0 / 1) and the default writer, replica 0, writes."""
    parallel.init(tp=1)
    me = parallel.dp_rank()
    save_model(_model(7) if me == 1 else None, f"{out}/placed", state={"rank": parallel.rank()}, writer_replica=1)
    save_model(_model(me), f"{out}/flat")


def test_writer_replica_writes_a_model_only_it_holds(tmp_path):
    torchrun("-m", "tests.test_atomic_save", tmp_path, nproc=2)
    _assert_holds(tmp_path / "placed", 7)
    for r in (0, 1):
        assert torch.load(tmp_path / "placed" / f"state.{r:02d}.pth")["rank"] == r
    _assert_holds(tmp_path / "flat", 0)
    assert sorted(os.listdir(tmp_path)) == ["flat", "placed"]


if __name__ == "__main__":
    _placed_worker(sys.argv[1])
