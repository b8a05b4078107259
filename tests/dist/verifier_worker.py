"""torchrun worker (TP=2): score samples with a TP-split verifier and train one for a few
steps (packed pairs); rank 0 writes what the TP=1 run must reproduce."""
import json
import sys

import torch

from llama_rlhf import parallel
from llama_rlhf.checkpoint import load_model
from llama_rlhf.evaluation.best_of_n import score_samples
from llama_rlhf.tokenizers import load_tokenizer
from llama_rlhf.trainers.verifier import VerifierConfig, setup_verifier


def main(root: str, out_file: str) -> None:
    parallel.init(tp=2)
    samples = json.load(open(f"{root}/samples.json"))
    tok = load_tokenizer(f"{root}/verifier-tp2")
    verifier = load_model(f"{root}/verifier-tp2", role="verifier")
    out = {f"scores_{r}": score_samples(verifier, tok, samples["instructions"], samples["samples"], 3, r)
           for r in ("last", "mean")}
    del verifier
    trainer = setup_verifier(VerifierConfig(**json.load(open(f"{root}/train_kwargs.json")), ckpt_dir=f"{root}/solver-tp2",
                             save_dir=f"{root}/out-tp2"))
    trainer.fit()
    out["loss"] = [h["loss"] for h in trainer.history]
    out["eval"] = trainer.eval_history[-1]
    if parallel.is_main():
        torch.save(out, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
