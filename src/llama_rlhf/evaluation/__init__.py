"""Evaluation of solvers: generate and score (`evaluate`, solver_evaluate.py) and verifier reranking
(`best_of_n`: best-of-K, majority, pass@K)."""
