"""Convert official GSM8K jsonl to the project's JSON format, holding out a dev split.

    python dataset/convert_gsm8k.py --src ../shared/datasets/gsm8k/train.jsonl --dst dataset/GSM8K/train.json
    python dataset/convert_gsm8k.py --src ../shared/datasets/gsm8k/test.jsonl --dst dataset/GSM8K/test.json --dev_size 0

The first writes 6,973 of the 7,473 problems to train.json and 500 (a fixed seeded draw) to dev.json
beside it: PPO's held-out accuracy reads dev.json by default; test.json is for final numbers.
"""
from dataclasses import dataclass
from typing import Optional

import fire

from llama_rlhf.cli import command
from llama_rlhf.config import flag
from llama_rlhf.tasks.gsm8k import convert_gsm8k


@dataclass
class ConvertConfig:
    src: str = flag(path="file")  # official GSM8K jsonl
    dst: str = flag()  # JSON list of instruction / output / label
    dev_size: int = 500  # problems held out into --dev_dst; 0 for the test file
    dev_dst: Optional[str] = None  # default: dev.json beside --dst


def convert(cfg: ConvertConfig) -> int:
    return convert_gsm8k(cfg.src, cfg.dst, cfg.dev_size, cfg.dev_dst)


main = command(ConvertConfig, convert, __doc__)

if __name__ == "__main__":
    fire.Fire(main)
