"""Split, merge or re-shard a checkpoint into N tensor-parallel shards, or export to HF.

    python checkpoint_split.py --ckpt_file SRC --save_path DST --num_shards N [--model_type llama-2-7b]
    python checkpoint_split.py --ckpt_file DIR --save_path HF_DIR --to hf

One process does the work: run it with `python`, not torchrun (`--n` is the old name of
`--num_shards`; torchrun >= 2.13 refuses `--n` as an ambiguous option of its own).
"""
from typing import Optional

import fire

from llama_rlhf.cli import run_cli
from llama_rlhf.checkpoint import split_command


def main(ckpt_file: str, save_path: str, num_shards: Optional[int] = None, n: Optional[int] = None,
         model_type: Optional[str] = None, to: str = "meta", tokenizer_file: Optional[str] = None,
         overwrite: bool = False) -> None:
    run_cli(split_command, ckpt_file=ckpt_file, save_path=save_path, num_shards=num_shards, n=n,
            model_type=model_type, to=to, tokenizer_file=tokenizer_file, overwrite=overwrite)


if __name__ == "__main__":
    fire.Fire(main)
