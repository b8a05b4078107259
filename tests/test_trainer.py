"""The shared trainer through SFT: loss falls; TP = 2 x DP = 2 equals TP = 1 with the global
batch; accumulation and packing change nothing; the CLI checkpoints, resumes to the same
losses, stops cleanly on a non-finite loss and rejects bad input in one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from llama_rlhf.checkpoint import load_model, merge_state_dicts, save_meta
from llama_rlhf.data.synthetic import make_problems
from llama_rlhf.models import build_model, preset_args
from llama_rlhf.tokenizers import load_tokenizer
from tests.fakes import tiny_sentencepiece
from tests.helpers import ROOT, torchrun

MICRO = 3  # per DP rank in the distributed worker; TP = 1 compares against 2 * MICRO
_ONCE: dict = {}  # test_lora imports these fixtures too: build them once per session, not per module


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tokenizer, a llama-tiny checkpoint as 1 and 2 shards, a synthetic train file, tokens."""
    if "tiny" in _ONCE:
        return _ONCE["tiny"]
    root = _ONCE["tiny"] = tmp_path_factory.mktemp("sft")
    sp = tiny_sentencepiece(root)
    tok = load_tokenizer(sp)
    args = preset_args("llama-tiny", vocab_size=tok.vocab_size)
    sd = build_model(args, init_seed=0).state_dict()
    save_meta(sd, args, str(root / "tp1"), 1, tokenizer_path=sp)
    save_meta(sd, args, str(root / "tp2"), 2, tokenizer_path=sp)
    with open(root / "train.jsonl", "w") as f:
        for p in make_problems(48, 0):
            f.write(json.dumps(p) + "\n")
    torch.save(torch.randint(3, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5)),
               root / "tokens.pt")
    return root


@pytest.fixture(scope="session")
def dist_out(tiny):
    """One 4-process torchrun (TP 2 x DP 2) doing an SFT step and the LoRA checks."""
    out = tiny / "dist"
    if (out / "done").exists():
        return out
    out.mkdir(exist_ok=True)
    shutil.copy(tiny / "tokens.pt", out / "tokens.pt")
    torchrun(ROOT / "tests/dist/train_worker.py", tiny / "tp2", tiny / "train.jsonl", out, MICRO, nproc=4)
    (out / "done").touch()
    return out


def sft(tiny, save_dir, **kw):
    from llama_rlhf.trainers.sft import SFTConfig, setup_sft
    base = dict(ckpt_dir=str(tiny / "tp1"), save_dir=str(save_dir), train_file=str(tiny / "train.jsonl"),
                lr=1e-3, max_seq_len=256, seed=3, max_grad_norm=0.5, progress=False, peak_flops=1.0)
    return setup_sft(SFTConfig(**{**base, **kw}))


def grads_of(trainer):
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def assert_close(a: dict, b: dict, rel: float = 1e-5):
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp(min=1e-30)
        assert err <= rel, f"{k}: relative error {err:.2e}"


def test_loss_falls(tiny, tmp_path):
    trainer = sft(tiny, tmp_path, max_batch_size=8, lr=3e-3, max_steps=24, max_grad_norm=1.0)
    trainer.fit()
    losses = [h["loss"] for h in trainer.history]
    assert len(losses) == 24
    assert sum(losses[-3:]) / 3 < losses[0] - 1.5, losses
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "loss.png").stat().st_size > 0


def test_tp2_dp2_equals_tp1(tiny, dist_out, tmp_path):
    """Gradients (after DP all-reduce + global-token normalisation), grad norm, loss and the
    updated weights of TP 2 x DP 2 x batch b equal TP 1 x DP 1 x batch 2b."""
    trainer = sft(tiny, tmp_path, max_batch_size=2 * MICRO)
    stats = trainer.compute_grads(trainer.micro_batches(0))
    ref_grads = grads_of(trainer)
    stats["grad_norm"] = trainer.apply_grads()
    ref_weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    args = trainer.model.args
    dist_stats = torch.load(dist_out / "stats.pt")
    assert dist_stats["n_targets"] == stats["n_targets"]
    assert dist_stats["loss"] == pytest.approx(stats["loss"], rel=1e-6)
    assert dist_stats["grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-5)
    assert stats["grad_norm"] > 0.5  # so clipping was active
    start = torch.load(tiny / "tp1" / "consolidated.00.pth")
    for dp in (0, 1):
        grads = merge_state_dicts([torch.load(dist_out / f"grads.tp{t}.dp{dp}.pt") for t in (0, 1)], args)
        assert_close(grads, ref_grads, 1e-5)
        # AdamW normalises each element, so compare the updates (not the weights) relatively
        weights = merge_state_dicts([torch.load(dist_out / f"weights.tp{t}.dp{dp}.pt") for t in (0, 1)], args)
        assert_close({k: w - start[k] for k, w in weights.items()}, {k: w - start[k] for k, w in ref_weights.items()},
                     1e-4)


def test_accumulation_equals_one_big_step(tiny, tmp_path):
    """...and gradient checkpointing changes nothing either."""
    big = sft(tiny, tmp_path / "a", max_batch_size=6)
    acc = sft(tiny, tmp_path / "b", max_batch_size=3, accumulation_steps=2, gradient_checkpointing=True)
    assert acc.model.gradient_checkpointing
    s_big = big.compute_grads(big.micro_batches(0))
    s_acc = acc.compute_grads(acc.micro_batches(0))
    assert s_big["loss"] == pytest.approx(s_acc["loss"], rel=1e-6)
    assert_close(grads_of(acc), grads_of(big))


def test_schedule_and_optimizer_groups():
    from llama_rlhf.trainers import build_optimizer, lr_factor
    assert [lr_factor(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(12, 4, 20) == pytest.approx(0.5) and lr_factor(20, 4, 20) == pytest.approx(0.0)
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5) and lr_factor(9, 0, 10, "constant") == 1.0
    with pytest.raises(ValueError):
        lr_factor(0, 0, 10, "exp")
    lin = torch.nn.Linear(4, 4)
    opt = build_optimizer(lin.named_parameters(), 1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # no decay on the bias


def test_packing_same_loss_and_grads(tiny, tmp_path):
    plain = sft(tiny, tmp_path / "a", max_batch_size=6)
    packed = sft(tiny, tmp_path / "b", max_batch_size=6, packing=True)
    mb_plain, mb_packed = plain.micro_batches(0), packed.micro_batches(0)
    assert mb_packed[0]["tokens"].shape[0] < mb_plain[0]["tokens"].shape[0]  # several samples share a row
    assert mb_packed[0]["mask"].sum() == mb_plain[0]["mask"].sum()
    s_plain, s_packed = plain.compute_grads(mb_plain), packed.compute_grads(mb_packed)
    assert s_packed["loss"] == pytest.approx(s_plain["loss"], rel=1e-5)
    assert_close(grads_of(packed), grads_of(plain), 1e-4)


def test_loss_mask_covers_answer_and_eos_only(tiny):
    from llama_rlhf.data.sft import SFTDataset
    from llama_rlhf.tasks.gsm8k import format_prompt
    tok = load_tokenizer(tiny / "tp1")
    records = [{"instruction": "Tom has 3 apples.", "output": ["He has 3 apples.", "The answer is 3."]}]
    ds = SFTDataset(records, tok, max_seq_len=256, seed=0)
    seen = set()
    for epoch in range(12):
        s = ds.sample(0, epoch)
        answer = [t for t, m in zip(s.targets, s.mask) if m]
        assert answer[-1] == tok.eos_id
        text = tok.decode(answer)
        assert text in records[0]["output"]
        seen.add(text)
        n_prompt = len(tok.encode(format_prompt(records[0]["instruction"]), bos=True))
        assert not any(s.mask[:n_prompt - 1]) and all(s.mask[n_prompt - 1:])
    assert len(seen) == 2  # answers are sampled per epoch
    short = SFTDataset(records, tok, max_seq_len=12, seed=0)
    assert short.n_truncated == 2 and all(len(short.sample(0, e).tokens) == 12 for e in range(3))


def _cli(*args):
    env_cmd = [sys.executable, str(ROOT / "solver_train.py"), *map(str, args)]
    import os
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(env_cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(p):
    out, err = p.communicate(timeout=300)
    return p.returncode, err


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert "error:" in lines[-1], err
    return lines[-1]


def test_cli_checkpoints_resume_nan_and_bad_input(tiny, tmp_path):
    """Concurrent CLI runs (2 cores): a 6-step run saving every 2 steps, a diverging run and a
    malformed train file; then a resume from the run's step-2 checkpoint."""
    common = ["--ckpt_dir", tiny / "tp1", "--max_batch_size", 4, "--max_seq_len", 48, "--seed", 1, "--log_steps", 1]
    (tmp_path / "malformed.jsonl").write_text('{"instruction": "a", "output": ["b"]}\n\n{"instruction": oops}\n')
    full = tmp_path / "full"
    runs = {"full": _cli(*common, "--train_file", tiny / "train.jsonl", "--save_dir", full, "--max_steps", 6,
                         "--save_steps", 2, "--lr", 1e-3),
            "nan": _cli(*common, "--train_file", tiny / "train.jsonl", "--save_dir", tmp_path / "nan", "--max_steps", 4,
                        "--save_steps", 1, "--lr", 1e30)}
    runs["malformed"] = _cli(*common, "--train_file", tmp_path / "malformed.jsonl", "--save_dir", tmp_path / "bad")
    results = {name: _wait(p) for name, p in runs.items()}

    rc, err = results["full"]
    assert rc == 0, err
    assert "truncated" in err  # --max_seq_len 48 cuts the longer problems, and says how many
    for step in (2, 4, 6):
        assert (full / f"step-{step}" / "state.00.pth").exists()
    assert not list(full.glob("*.tmp")) and (full / "loss.png").exists() and (full / "tb").is_dir()
    model = load_model(str(full / "step-6"), role="solver")
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]]))).all()
    logged = [json.loads(ln) for ln in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert all(k in logged[-1] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"))

    # "killed" after step 3: only the step-2 checkpoint survives; resume in a fresh process
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "step-2", resumed / "step-2")
    p = _cli(*common, "--train_file", tiny / "train.jsonl", "--save_dir", resumed, "--max_steps", 6,
             "--save_steps", 2, "--lr", 1e-3, "--resume")
    rc, err = _wait(p)
    assert rc == 0, err
    again = [json.loads(ln) for ln in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [3, 4, 5, 6]
    for a, b in zip(again, logged[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0) and a["lr"] == b["lr"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    w_full = torch.load(full / "step-6" / "consolidated.00.pth")
    w_res = torch.load(resumed / "step-6" / "consolidated.00.pth")
    assert_close(w_res, w_full, 1e-6)

    rc, err = results["nan"]
    assert rc != 0
    line = _one_line_error(err)
    assert "non-finite loss" in line and "step-1" in line
    assert (tmp_path / "nan" / "step-1").is_dir() and not (tmp_path / "nan" / "step-2").exists()
    assert not list((tmp_path / "nan").glob("*.tmp"))
    load_model(str(tmp_path / "nan" / "step-1"))  # the last good checkpoint is intact

    rc, err = results["malformed"]
    assert rc == 2, err
    assert "malformed.jsonl:3" in _one_line_error(err)  # blank lines still count


@pytest.mark.parametrize("text,where", [('{"instruction": "a", "output": ["b"]}\n{"instruction": "a"}\n', ":2"),
                                        ("", "empty"), ('[{"instruction": "a", "output": 5}]', "record"),
                                        ('{"instruction": "a", "output": ["b"]}\n[1, 2]\n', ":2")])
def test_bad_records_name_file_and_line(tiny, tmp_path, text, where):
    """Errors are DataError (a ValueError: one line and exit 2 through run_cli, as above)."""
    from llama_rlhf.records import DataError
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    with pytest.raises(DataError) as e:
        sft(tiny, tmp_path / "out", train_file=str(bad))
    assert "bad.jsonl" in str(e.value) and where in str(e.value) and "\n" not in str(e.value)


def test_metrics_logger_and_mfu(tmp_path):
    from llama_rlhf.metrics import MetricsLogger, measure_matmul_peak, mfu, read_metrics
    m = MetricsLogger(str(tmp_path))
    for step in (1, 2, 3):
        m.log(step, {"loss": 4.0 - step, "lr": torch.tensor(1e-3), "grad_norm": float("nan")})
    m.plot(["loss", "lr"], str(tmp_path / "curves.png"))
    m.close()
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["loss"] for r in rows] == [3.0, 2.0, 1.0] and rows[0]["lr"] == pytest.approx(1e-3)
    assert rows[0]["grad_norm"] == "nan"  # JSON has no NaN; kept readable
    assert (tmp_path / "curves.png").stat().st_size > 1000 and list((tmp_path / "tb").glob("events.*"))
    MetricsLogger(str(tmp_path), tensorboard=False, resume_step=3).close()  # resuming at step 3 drops step >= 3
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2]
    assert mfu(1000.0, 10**6, 6e9) == pytest.approx(1.0)
    assert measure_matmul_peak("cpu", torch.float32, n=256, repeats=1) > 1e8
