"""Answer extraction and scoring for math word problems."""
from .gsm8k import extract_answer, is_correct, majority_vote, normalize_number

__all__ = ["extract_answer", "is_correct", "majority_vote", "normalize_number"]
