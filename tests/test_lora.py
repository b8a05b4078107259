"""LoRA: merged weights give the adapted model's logits (TP 1 and TP 2); TP 2 adapters see the
same logits and gradients as TP 1; only adapters train and the base stays frozen; LoRA
checkpoints are plain checkpoints, and a LoRA run resumes to the same losses."""
from __future__ import annotations

import shutil

import torch
import torch.nn.functional as F

from llama_rlhf import lora
from llama_rlhf.checkpoint import load_model
from tests.dist.train_worker import lora_case
from tests.test_trainer import dist_out, sft, tiny  # noqa: F401 - shared session fixtures


def test_merge_equals_adapters_tp1(tiny):
    tokens = torch.load(tiny / "tokens.pt")
    base = load_model(str(tiny / "tp1"))
    with torch.no_grad():
        base_logits = base(tokens)
    logits, grads, merged = lora_case(str(tiny / "tp1"), tokens)
    assert (logits - base_logits).abs().max() > 1e-3  # the adapters do change the output
    assert (merged - logits).abs().max() <= 1e-5


def test_tp2_adapters_match_tp1(tiny, dist_out):  # noqa: F811
    tokens = torch.load(tiny / "tokens.pt")
    logits, grads, merged = lora_case(str(tiny / "tp1"), tokens)
    assert (torch.load(dist_out / "lora_logits.pt") - logits).abs().max() <= 1e-5
    assert (torch.load(dist_out / "merged_logits.pt") - logits).abs().max() <= 1e-5
    shards = [torch.load(dist_out / f"lora.tp{t}.pt") for t in (0, 1)]
    for name, g in grads.items():
        row = ".wo." in name or ".w2." in name
        if name.endswith("lora_A"):
            g2 = torch.cat([s[name] for s in shards], dim=1) if row else shards[0][name]
            if not row:
                assert torch.equal(shards[0][name], shards[1][name])  # replicated A: same gradient
        else:
            g2 = shards[0][name] if row else torch.cat([s[name] for s in shards], dim=0)
        assert (g2 - g).norm() / g.norm() <= 1e-5, name


def test_only_adapters_train_and_checkpoint_is_plain(tiny, tmp_path):
    trainer = sft(tiny, tmp_path / "run", lora_rank=4, lora_alpha=8, lr=1e-2, max_steps=4, save_steps=2,
                  max_batch_size=4)
    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 7 * model.args.n_layers
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer.fit()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(p.abs().max() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))

    saved = load_model(str(tmp_path / "run" / "step-4"), role="solver")  # plain keys, strict load
    tokens = torch.load(tiny / "tokens.pt")
    with torch.no_grad():
        assert (saved(tokens) - model(tokens)).abs().max() <= 1e-5

    # resume from step 2 in a fresh trainer: same losses for steps 3 and 4
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "run" / "step-2", tmp_path / "resumed" / "step-2")
    again = sft(tiny, tmp_path / "resumed", lora_rank=4, lora_alpha=8, lr=1e-2, max_steps=4, save_steps=2,
                max_batch_size=4, resume=True)
    again.fit()
    assert [h["loss"] for h in again.history] == [h["loss"] for h in trainer.history[2:]]


def test_lora_output_zero_at_init(tiny):
    tokens = torch.load(tiny / "tokens.pt")
    model = load_model(str(tiny / "tp1"))
    with torch.no_grad():
        ref = model(tokens)
        lora.apply_lora(model, rank=2)
        assert torch.equal(model(tokens), ref)  # B = 0
    loss = F.cross_entropy(model(tokens)[0], tokens[0])
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B")))
    assert all(p.grad is not None for p in lora.lora_parameters(model).values())


def test_lora_resume_onto_another_base_is_refused(tiny, tmp_path):  # noqa: F811
    """The adapters of a LoRA run only mean something on the base they were trained on."""
    import pytest

    from llama_rlhf.checkpoint import save_meta
    from llama_rlhf.models import build_model
    from llama_rlhf.trainers import TrainingError
    base = load_model(str(tiny / "tp1"))
    other = build_model(base.args, init_seed=7)  # same shapes, other weights
    save_meta(other.state_dict(), base.args, str(tmp_path / "other"), 1, tokenizer_path=str(tiny / "tp1"))
    kw = dict(lora_rank=4, lr=1e-2, max_steps=2, max_batch_size=4)
    sft(tiny, tmp_path / "run", **kw).fit()
    with pytest.raises(TrainingError, match=r"trained on the base .*tp1.*not on --ckpt_dir .*other"):
        sft(tiny, tmp_path / "run", **{**kw, "max_steps": 3}, ckpt_dir=str(tmp_path / "other"), resume=True).fit()
    resumed = sft(tiny, tmp_path / "run", **{**kw, "max_steps": 3}, resume=True)  # its own base: fine
    resumed.fit()
    assert resumed.step == 3
