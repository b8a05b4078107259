"""Train a verifier (outcome reward model) from a solver checkpoint, tensor x data parallel.

    torchrun --nproc_per_node N verifier_train.py --ckpt_dir SOLVER_DIR --save_dir DIR \\
        --train_file pairs.json --model_type llama-1-7b --max_batch_size 6 --lora_rank -1 \\
        [--loss pairwise|logexpwithlm|pointwise --lm_coef 0.1 --reduce last|mean --packing \\
         --label_file held_out_pairs.json --epochs 1 --lr 1e-5 ...]

--ckpt_dir must be a SOLVER checkpoint (a verifier dir is refused); a scalar head is attached
(seeded by --seed) and every checkpoint written (save_dir/epoch-N, save_dir/step-N) is a
verifier (params.json has reward_head). --resume continues from the latest checkpoint in
--save_dir; pass the same solver --ckpt_dir as the first run. --max_batch_size counts pairs
per micro-batch per DP rank. Records: pairwise {"instruction", "chosen": [...], "rejected":
[...], "margin"?} (dataset/make_pairs.py builds them) or, for --loss pointwise, also
{"instruction", "output", "label": 0|1}. --label_file: held-out pairs scored after each epoch
(eval/accuracy, eval/margin, eval/reward_mean, eval/reward_std in save_dir/metrics.jsonl).
"""
import fire

from llama_rlhf.cli import command
from llama_rlhf.trainers.verifier import VerifierConfig, train_verifier

main = command(VerifierConfig, train_verifier, __doc__)

if __name__ == "__main__":
    fire.Fire(main)
