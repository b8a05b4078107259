"""torchrun worker (4 processes = TP 2 x DP 2) for tests/test_trainer.py and tests/test_lora.py.

Writes into OUT:
* grads.tp{t}.dp{d}.pt, weights.tp{t}.dp{d}.pt: full-model gradients after one SFT step's
  accumulate + DP all-reduce + scaling, and the weights after the AdamW step;
* stats.pt: the step's loss / grad norm (rank 0);
* lora.tp{t}.pt: LoRA adapter gradients (dp 0), lora_logits.pt / merged_logits.pt (rank 0).
"""
import sys

import torch
import torch.nn.functional as F

from llama_rlhf import lora, parallel
from llama_rlhf.checkpoint import load_model


def set_full_lora(model, seed: int = 0, scale: float = 0.05) -> None:
    """Give every adapter values cut from full (unsharded) random tensors, so TP = 1 and
    TP = 2 models hold the same adapters: column bases shard B on dim 0, row bases A on dim 1."""
    tp, r = parallel.tp_size(), parallel.tp_rank()
    mods = [m for m in model.modules() if hasattr(m, "_lora_hook")]
    with torch.no_grad():
        for i, m in enumerate(mods):
            g = torch.Generator().manual_seed(seed * 1000 + i)
            rank = m.lora_A.shape[0]
            if m.lora_row:
                a_full = torch.randn(rank, m.lora_A.shape[1] * tp, generator=g) * scale
                b_full = torch.randn(m.lora_B.shape[0], rank, generator=g) * scale
                m.lora_A.copy_(a_full.chunk(tp, dim=1)[r])
                m.lora_B.copy_(b_full)
            else:
                a_full = torch.randn(rank, m.lora_A.shape[1], generator=g) * scale
                b_full = torch.randn(m.lora_B.shape[0] * tp, rank, generator=g) * scale
                m.lora_A.copy_(a_full)
                m.lora_B.copy_(b_full.chunk(tp, dim=0)[r])


def lora_case(ckpt_dir: str, tokens: torch.Tensor):
    """Adapted model's logits, its adapter gradients for a summed LM loss, merged logits."""
    model = load_model(ckpt_dir)
    lora.apply_lora(model, rank=4, alpha=8)
    set_full_lora(model)
    logits = model(tokens)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").backward()
    grads = {n: p.grad.clone() for n, p in lora.lora_parameters(model).items()}
    lora.merge_lora(model)
    with torch.no_grad():
        merged = model(tokens)
    return logits.detach(), grads, merged


def main(ckpt_dir: str, train_file: str, out: str, micro_batch: str) -> None:
    from llama_rlhf.trainers.sft import SFTConfig, setup_sft
    trainer = setup_sft(SFTConfig(ckpt_dir=ckpt_dir, save_dir=f"{out}/run", train_file=train_file, max_batch_size=int(micro_batch),
                        lr=1e-3, max_seq_len=256, seed=3, max_grad_norm=0.5, progress=False, peak_flops=1.0))
    t, d = parallel.tp_rank(), parallel.dp_rank()
    stats = trainer.compute_grads(trainer.micro_batches(0))
    torch.save({n: p.grad.clone() for n, p in trainer.model.named_parameters()}, f"{out}/grads.tp{t}.dp{d}.pt")
    stats["grad_norm"] = trainer.apply_grads()
    torch.save({n: p.detach().clone() for n, p in trainer.model.named_parameters()}, f"{out}/weights.tp{t}.dp{d}.pt")
    if parallel.is_main():
        torch.save(stats, f"{out}/stats.pt")

    tokens = torch.load(f"{out}/tokens.pt")
    logits, grads, merged = lora_case(ckpt_dir, tokens)
    if d == 0:
        torch.save(grads, f"{out}/lora.tp{t}.pt")
    if parallel.is_main():
        torch.save(logits, f"{out}/lora_logits.pt")
        torch.save(merged, f"{out}/merged_logits.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
