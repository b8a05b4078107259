"""PPO at DP = 2 is one run: a run stopped by --max_rounds or SIGKILLed after a --save_rounds
checkpoint resumes to the weights and logs of an uninterrupted run (GRPO, and GAE with a
critic); the adaptive KL coefficient and the logged stats are pooled over the replicas."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import ROOT, free_port, ppo_checkpoints

WORKER = ROOT / "tests/dist/ppo_worker.py"
ESTIMATORS = ("grpo", "gae")


def _cfg(root, name: str, estimator: str, **kw) -> dict:
    base = dict(actor_ckpt_dir=str(root / "actor-tp1"), actor_save_dir=str(root / name / "actor"),
                train_file=str(root / "prompts.json"), reward_model_ckpt_dir=str(root / "critic-tp1"),
                reward="rm+rule", estimator=estimator, max_batch_size=2, max_buffer_size=4, max_new_tokens=6,
                actor_lr=1e-3, critic_lr=1e-3, kl_coef=0.05, kl_target=0.01, kl_horizon=20, log_samples=0)
    if estimator == "gae":
        base.update(critic_ckpt_dir=str(root / "critic-tp1"), critic_save_dir=str(root / name / "critic"))
    else:
        base.update(num_samples=2)
    return {**base, **kw}


def _start(root, name: str, cases: list[dict]) -> subprocess.Popen:
    path = root / f"{name}.json"
    path.write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(WORKER), str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, expect_ok: bool = True) -> None:
    out, _ = proc.communicate(timeout=300)
    if expect_ok:
        assert proc.returncode == 0, out[-5000:]
    else:
        assert proc.returncode != 0, "the killed run finished"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = ppo_checkpoints(tmp_path_factory.mktemp("ppo_resume"), n_prompts=16)
    first, resumed = [], []
    for e in ESTIMATORS:
        first += [{"cfg": _cfg(root, f"full-{e}", e, max_rounds=4, save_buffer=True), "record": str(root / f"rec-{e}")},
                  {"cfg": _cfg(root, f"stop-{e}", e, max_rounds=2)}]
        resumed += [{"cfg": _cfg(root, f"stop-{e}", e, max_rounds=4, resume=True)},
                    {"cfg": _cfg(root, f"kill-{e}", e, max_rounds=4, resume=True)}]
    # The runs SIGKILLed once round-2 is written go beside the others (separate dirs; mostly start-up).
    procs = [_start(root, "first", first)] + [
        _start(root, f"kill-{e}", [{"cfg": _cfg(root, f"kill-{e}", e, max_rounds=4, save_rounds=1), "kill_after": 2}])
        for e in ESTIMATORS]
    _finish(procs[0])
    for proc in procs[1:]:
        _finish(proc, expect_ok=False)
    for e in ESTIMATORS:
        assert (root / f"kill-{e}/actor/round-2").is_dir() and not (root / f"kill-{e}/actor/round-3").exists()
    _finish(_start(root, "resumed", resumed))
    return root


def _weights(path):
    return torch.load(path / "consolidated.00.pth", map_location="cpu")


def _rows(path) -> dict:
    rows = [json.loads(line) for line in open(path / "metrics.jsonl")]
    return {r["step"]: r for r in rows if "reward/mean" in r}


def _tb_steps(path) -> list[int]:
    acc = EventAccumulator(str(path / "tb"))
    acc.Reload()
    return sorted(e.step for e in acc.Scalars("reward/mean"))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_resume_equals_uninterrupted_run(runs, estimator, how):
    full, other = runs / f"full-{estimator}", runs / f"{how}-{estimator}"
    models = ["actor"] + (["critic"] if estimator == "gae" else [])
    for model in models:
        a, b = _weights(full / model / "round-4"), _weights(other / model / "round-4")
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] - b[k]).abs().max() <= 1e-6, f"{model} {k}"
    assert any((_weights(full / "actor/round-4")[k] != v).any() for k, v in
               torch.load(runs / "actor-tp1/consolidated.00.pth", map_location="cpu").items())  # it trained
    want, got = _rows(full / "actor"), _rows(other / "actor")
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        for key in ("reward/mean", "kl", "kl_coef", "actor/pg_loss"):
            assert math.isclose(got[step][key], want[step][key], rel_tol=1e-5, abs_tol=1e-7), (step, key)
    assert _tb_steps(other / "actor") == [1, 2, 3, 4]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_coefficient_and_stats_are_pooled_over_replicas(runs, estimator):
    ranks = [json.load(open(runs / f"rec-{estimator}.{r:02d}.json")) for r in (0, 1)]
    assert [r["kl_coef"] for r in ranks[0]] == [r["kl_coef"] for r in ranks[1]]  # one coefficient, every round
    assert len({round(r["kl_coef"], 12) for r in ranks[0]}) > 1  # it did adapt
    rows = _rows(runs / f"full-{estimator}/actor")
    for rnd in ranks[0]:
        (s0, n0), (s1, n1) = rnd["parts"]
        assert s0["reward/mean"] != s1["reward/mean"]  # the replicas saw different prompts
        row = rows[rnd["round"]]
        assert math.isclose(row["kl"], (s0["kl"] * n0 + s1["kl"] * n1) / (n0 + n1), rel_tol=1e-9)
        assert row["first/ratio_max_abs_dev"] == max(s0["first/ratio_max_abs_dev"], s1["first/ratio_max_abs_dev"])
        assert math.isclose(row["actor/clipfrac"], (s0["actor/clipfrac"] + s1["actor/clipfrac"]) / 2, abs_tol=1e-12)
    # The last round's reward mean / std are those of all rollouts of both replicas together.
    bufs = [torch.load(runs / f"full-{estimator}/actor/buffer.{r:02d}.pt", weights_only=False) for r in (0, 1)]
    scores = torch.cat([b["scores"] for b in bufs])
    last = rows[4]
    assert math.isclose(last["reward/mean"], scores.mean().item(), rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(last["reward/std"], scores.std().item(), rel_tol=1e-5, abs_tol=1e-7)
