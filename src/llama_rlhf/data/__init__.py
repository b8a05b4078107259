"""Data sets: record files, the GSM8K converter and the synthetic word-problem generator."""
