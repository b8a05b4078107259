"""`make demo` plumbing: the real-GSM8K data path and flag checking (the full pipeline runs
in `make demo` itself, too slow for the test suite)."""
import json
import os

import pytest

from llama_rlhf.demo import DemoConfig, Pipeline, main
from llama_rlhf.tokenizers import load_tokenizer

GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "gsm8k")


@pytest.mark.skipif(not os.path.isdir(GSM8K), reason="official GSM8K files not present (../shared/datasets/gsm8k)")
def test_gsm8k_demo_converts_the_official_files_first(tmp_path):
    pipe = Pipeline(DemoConfig(gsm8k=GSM8K, n_train=40, n_test=10, run_dir=str(tmp_path), pair_questions=8))
    pipe.prepare()
    train = json.load(open(tmp_path / "data" / "train.json"))
    test = json.load(open(tmp_path / "data" / "test.json"))
    assert len(train) == 40 and len(test) == 10
    first = json.loads(open(os.path.join(GSM8K, "test.jsonl")).readline())
    assert test[0]["instruction"] == first["question"].strip()
    assert test[0]["output"][0].endswith(f"Therefore, the answer is {test[0]['label']}.")
    assert "<<" not in train[0]["output"][0]
    assert load_tokenizer(tmp_path / "init").vocab_size > 0
    assert len(json.load(open(tmp_path / "data" / "pair_questions.json"))) == 8


def test_bad_demo_input_is_a_one_line_error(tmp_path, caplog):
    with pytest.raises(SystemExit) as e:
        main(sft_stepz=3)
    assert e.value.code == 2 and "unknown flag --sft_stepz" in caplog.text
    with pytest.raises(SystemExit) as e:
        main(gsm8k=str(tmp_path / "nowhere"), run_dir=str(tmp_path / "run"))
    assert e.value.code == 2 and "no train.jsonl" in caplog.text
