"""Data sets: record files, the synthetic word-problem generator, SFT and preference data
(the GSM8K converter and prompt template live in tasks/gsm8k.py)."""
