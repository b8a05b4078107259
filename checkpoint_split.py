"""Split, merge or re-shard a checkpoint into N tensor-parallel shards, or export to HF.

    python checkpoint_split.py --ckpt_file SRC --save_path DST --num_shards N [--model_type llama-2-7b]
    python checkpoint_split.py --ckpt_file DIR --save_path HF_DIR --to hf

One process does the work: run it with `python`, not torchrun (`--n` is the old name of
`--num_shards`; torchrun >= 2.13 refuses `--n` as an ambiguous option of its own).
"""
import fire

from llama_rlhf.checkpoint import SplitConfig, split
from llama_rlhf.cli import command

main = command(SplitConfig, split, __doc__)

if __name__ == "__main__":
    fire.Fire(main)
