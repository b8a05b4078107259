"""torchrun worker: greedy (and one sampled) generation on TP-split checkpoints.

    generate_worker.py OUT.json CKPT_DIR PROMPTS.json [CKPT_DIR PROMPTS.json ...]

Rank 0 writes {ckpt_dir: {"greedy": tokens, "logprobs": ..., "sampled": tokens}}; every rank
checks that all ranks sampled the same tokens (the identically seeded generator)."""
import json
import sys

import torch.distributed as dist

from llama_rlhf import parallel
from llama_rlhf.checkpoint import load_model, shard_files
from llama_rlhf.generation import generate


def main(out_file: str, *pairs: str) -> None:
    results = {}
    for ckpt_dir, prompts_file in zip(pairs[::2], pairs[1::2]):
        parallel.init(tp=len(shard_files(ckpt_dir)))
        model = load_model(ckpt_dir).eval()
        with open(prompts_file) as f:
            spec = json.load(f)
        greedy = generate(model, spec["prompts"], spec["max_new_tokens"], eos_id=-1)
        sampled = generate(model, spec["prompts"], spec["max_new_tokens"], eos_id=-1, temperature=1.0,
                           top_p=0.9, seed=7).tokens
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sampled)
        assert all(s == sampled for s in everyone), "TP ranks sampled different tokens"
        results[ckpt_dir] = {"greedy": greedy.tokens, "logprobs": greedy.logprobs, "sampled": sampled}
    if parallel.is_main():
        with open(out_file, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()  # a gloo group torn down at interpreter exit can abort


if __name__ == "__main__":
    main(*sys.argv[1:])
