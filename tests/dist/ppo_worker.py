"""torchrun worker for tests/test_ppo_resume.py: PPO runs described by a JSON file.

    ppo_worker.py CASES.json

CASES.json is a list of {"cfg": PPOConfig fields, "kill_after": round or null, "record": path or
null}. `kill_after`: SIGKILL every rank right after the round-N checkpoint is written, as a
crash would. `record`: per rank, each round's local stats (before pooling over replicas) and
the KL coefficient held after the round, written to record.RR.json.
"""
import json
import os
import signal
import sys

from llama_rlhf import parallel
from llama_rlhf.ppo import run, trainer
from llama_rlhf.ppo.config import PPOConfig

_save, _end_round = run._save, trainer.PPOTrainer._end_round


def main(cases_file: str) -> None:
    for case in json.load(open(cases_file)):
        rounds: list = []

        def end_round(self, parts):
            stats = _end_round(self, parts)
            rounds.append({"round": self.round, "parts": parts, "kl_coef": self.kl_ctl.value})
            return stats

        def save(cfg, tr, *args, _kill=case.get("kill_after")):
            _save(cfg, tr, *args)
            if _kill is not None and tr.round == _kill:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.PPOTrainer._end_round, run._save = end_round, save
        run.train_ppo(PPOConfig(**case["cfg"]))
        if case.get("record"):
            with open(f"{case['record']}.{parallel.rank():02d}.json", "w") as f:
                json.dump(rounds, f)


if __name__ == "__main__":
    main(sys.argv[1])
