"""Convert official GSM8K jsonl to the project's JSON format.

Example: python dataset/convert_gsm8k.py --src ../shared/datasets/gsm8k/train.jsonl --dst dataset/GSM8K/train.json
"""
from __future__ import annotations

import fire

from llama_rlhf.cli import run_cli
from llama_rlhf.tasks.gsm8k import convert_gsm8k


def main(src: str, dst: str) -> None:
    """Convert GSM8K `src` (jsonl) into `dst` (JSON list of instruction/output/label)."""
    run_cli(convert_gsm8k, src_jsonl=src, dst_json=dst)


if __name__ == "__main__":
    fire.Fire(main)
