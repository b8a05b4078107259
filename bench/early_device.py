"""Imported by the bench scripts before torch: `--device cpu` hides CUDA from the library,
which runs on CUDA whenever one is visible (so the choice must come before torch loads)."""
import argparse
import os


def early_device() -> str:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", default="auto")
    return p.parse_known_args()[0].device


if early_device() == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
