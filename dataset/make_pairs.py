"""Turn sampled solver answers into verifier / DPO preference pairs.

    torchrun --nproc_per_node N solver_evaluate.py ... --t 0.7 --num_samples 8 --log_dir runs/x
    python dataset/make_pairs.py --results runs/x/results.json --dst pairs.json [--max_pairs_per_question 4]
        [--gold_file train.json --slipped_pairs 240 --seed 0]

Per question, distinct correct samples (GSM8K answer extraction against the label) are chosen
answers and distinct wrong ones rejected answers; up to --max_pairs_per_question pairs are
written per question. Questions with only correct or only wrong samples are skipped and counted.
--slipped_pairs N adds N pairs (gold solution, the same solution with one wrong sum carried
through to its answer) from the first records of --gold_file: the solver's typical mistake, in
pairs that differ in nothing else.
"""
import fire

from llama_rlhf.cli import command
from llama_rlhf.data.pairs import PairsConfig, make_pairs_command

main = command(PairsConfig, make_pairs_command, __doc__)

if __name__ == "__main__":
    fire.Fire(main)
