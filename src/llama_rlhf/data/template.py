"""The one prompt template, shared by SFT, verifier and PPO training and by evaluation.

A sample is tokenised in two parts, and every trainer and the evaluator must do it the same way:

    prompt ids = tokenizer.encode(format_prompt(instruction), bos=True, eos=False)
    target ids = tokenizer.encode(output, bos=False, eos=False) + [tokenizer.eos_id]

so the prompt text is the instruction followed by one newline, and the output starts
right after it. At evaluation the model generates from the prompt ids; the new tokens
are decoded on their own (EOS dropped), which gives back the output text as trained.
"""
from __future__ import annotations

SEPARATOR = "\n"


def format_prompt(instruction: str) -> str:
    """Prompt text of an instruction: the instruction (trailing whitespace dropped) + a newline."""
    return instruction.rstrip() + SEPARATOR
