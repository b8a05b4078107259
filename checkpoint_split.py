"""Split, merge or re-shard a checkpoint into N tensor-parallel shards, or export to HF.

    torchrun checkpoint_split.py --ckpt_file SRC --save_path DST --n N [--model_type llama-2-7b]
    python checkpoint_split.py --ckpt_file DIR --save_path HF_DIR --to hf
"""
from typing import Optional

import fire

from llama_rlhf.cli import run_cli
from llama_rlhf.checkpoint import split_command


def main(ckpt_file: str, save_path: str, n: int = 1, model_type: Optional[str] = None, to: str = "meta",
         tokenizer_file: Optional[str] = None, overwrite: bool = False) -> None:
    run_cli(split_command, ckpt_file=ckpt_file, save_path=save_path, n=n, model_type=model_type, to=to,
            tokenizer_file=tokenizer_file, overwrite=overwrite)


if __name__ == "__main__":
    fire.Fire(main)
