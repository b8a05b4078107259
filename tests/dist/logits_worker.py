"""torchrun worker: load a TP-split checkpoint and write this world's logits (rank 0)."""
import sys

import torch

from llama_rlhf import parallel
from llama_rlhf.checkpoint import load_model, shard_files


def main(ckpt_dir: str, tokens_file: str, out_file: str) -> None:
    parallel.init(tp=len(shard_files(ckpt_dir)))
    model = load_model(ckpt_dir).eval()
    tokens = torch.load(tokens_file)
    with torch.no_grad():
        logits = model(tokens)
    if parallel.is_main():
        torch.save(logits, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
