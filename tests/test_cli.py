"""Every entry script: a bad flag value is one line naming the flag and exit 2, in-process
through fire exactly as the command line parses it; a programming error keeps its traceback."""
import importlib.util
import logging

import fire
import pytest

from llama_rlhf.cli import run_cli
from llama_rlhf.errors import UsageError
from tests.helpers import ROOT

# script -> (required flags, with {dir} / {file} for paths that exist, and the cases:
# flag, bad value, what the message must say). None: the script has no flag of that kind.
SCRIPTS = {
    "solver_train.py": ("--ckpt_dir {dir} --save_dir {dir}/out --train_file {file}",
                        [("--max_batch_size", "abc", "an integer"), ("--lr", "abc", "a number"),
                         ("--schedule", "wavy", "one of"), ("--train_file", "{dir}/missing.json", "no such")]),
    "verifier_train.py": ("--ckpt_dir {dir} --save_dir {dir}/out --train_file {file}",
                          [("--max_batch_size", "abc", "an integer"), ("--lm_coef", "abc", "a number"),
                           ("--loss", "hinge", "one of"), ("--label_file", "{dir}/missing.json", "no such")]),
    "dpo_train.py": ("--ckpt_dir {dir} --save_dir {dir}/out --train_file {file}",
                     [("--max_batch_size", "abc", "an integer"), ("--beta", "abc", "a number"),
                      ("--loss", "hinge", "one of"), ("--reference_ckpt_dir", "{dir}/missing", "no such")]),
    "ppo_train.py": ("--actor_ckpt_dir {dir} --actor_save_dir {dir}/out --train_file {file}",
                     [("--max_batch_size", "abc", "an integer"), ("--actor_lr", "abc", "a number"),
                      ("--estimator", "ppo2", "one of"), ("--critic_ckpt_dir", "{dir}/missing", "no such")]),
    "solver_evaluate.py": ("--ckpt_dir {dir} --log_dir {dir}/out --label_file {file}",
                           [("--max_batch_size", "abc", "an integer"), ("--t", "abc", "a number"),
                            ("--task", "MATH", "one of"), ("--label_file", "{dir}/missing.json", "no such")]),
    "dataset/make_pairs.py": ("--results {file} --dst {dir}/pairs.json",
                              [("--max_pairs_per_question", "abc", "an integer"), None, None,
                               ("--results", "{dir}/missing.json", "no such")]),
    "checkpoint_split.py": ("--ckpt_file {file} --save_path {dir}/out",
                            [("--num_shards", "abc", "an integer"), None, ("--to", "gguf", "one of"),
                             ("--ckpt_file", "{dir}/missing.pth", "no such")]),
}
CASES = [(script, i) for script, (_, cases) in SCRIPTS.items() for i, c in enumerate(cases) if c is not None]


def _main(script: str):
    spec = importlib.util.spec_from_file_location(script.replace("/", "_")[:-3], ROOT / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines += record.getMessage().splitlines()


@pytest.mark.parametrize("script,case", CASES, ids=[f"{s}-{i}" for s, i in CASES])
def test_bad_flag_is_one_line_and_exit_2(script, case, tmp_path):
    (tmp_path / "data.json").write_text("[]")
    fill = {"dir": str(tmp_path), "file": str(tmp_path / "data.json")}
    required, cases = SCRIPTS[script]
    flag, value, says = cases[case]
    argv = [a.format(**fill) for a in required.split()]
    if flag in argv:  # the case replaces a required flag's value
        argv[argv.index(flag) + 1] = value.format(**fill)
    else:
        argv += [flag, value.format(**fill)]
    lines = _Lines()
    logging.getLogger("llama_rlhf").addHandler(lines)
    try:
        with pytest.raises(SystemExit) as exc:
            fire.Fire(_main(script), command=argv)
    finally:
        logging.getLogger("llama_rlhf").removeHandler(lines)
    assert exc.value.code == 2
    assert len(lines.lines) == 1, lines.lines
    assert flag in lines.lines[0] and says in lines.lines[0], lines.lines[0]
    assert not (tmp_path / "out").exists()


def test_user_errors_exit_2_and_bugs_keep_their_traceback():
    def bad_input():
        raise UsageError("--x must be >= 1")

    with pytest.raises(SystemExit) as exc:
        run_cli(bad_input)
    assert exc.value.code == 2
    with pytest.raises(KeyError):  # a programming error propagates: python prints it and exits 1
        run_cli(lambda: {}["missing"])
    with pytest.raises(ValueError):  # a plain ValueError is a bug too, not "bad input"
        run_cli(lambda: int("x"))
