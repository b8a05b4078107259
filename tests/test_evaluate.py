"""solver_evaluate.py end to end on a tiny random checkpoint and tokenizer, plus its bad-input errors."""
import json

import pytest

from llama_rlhf.checkpoint import load_model, load_source, save_meta
from llama_rlhf.data.synthetic import make_problems
from llama_rlhf.evaluation.evaluate import EvalConfig, encode_prompts, evaluate, generate_texts, score_item, summarize
from llama_rlhf.tasks.gsm8k import format_prompt
from llama_rlhf.tokenizers import load_tokenizer
from tests.fakes import tiny_sentencepiece
from tests.helpers import ROOT, run_script, tiny_hf_model, torchrun

KEYS = {"accuracy", "correct", "total", "missing", "num_samples", "pass@k", "majority_accuracy", "truncated", "items"}
FAST = dict(max_new_tokens=10, max_batch_size=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    sp = tiny_sentencepiece(root)
    hf, _ = tiny_hf_model("llama-tiny")  # random norms too: peaked logits, so greedy ties are unlikely
    hf.save_pretrained(root / "hf")
    sd, args = load_source(str(root / "hf"))
    save_meta(sd, args, str(root / "ckpt"), n=1, tokenizer_path=sp)
    records = [{"instruction": r["instruction"], "label": r["label"]} for r in make_problems(6, seed=4)]
    # Vary prompt lengths so batches are padded and reordered.
    records[1]["instruction"] = "Short one?"
    records[4]["instruction"] += " " + records[3]["instruction"]
    (root / "test.json").write_text(json.dumps(records))
    return root, records


def test_evaluate_results(setup, tmp_path):
    root, records = setup
    res = evaluate(EvalConfig(str(root / "ckpt"), str(root / "test.json"), str(tmp_path), **FAST))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == res and KEYS <= set(res)
    assert res["total"] == len(records) == len(res["items"])
    assert res["accuracy"] == res["correct"] / res["total"]
    assert res["missing"] == sum(it["predict"] is None for it in res["items"])
    assert [it["instruction"] for it in res["items"]] == [r["instruction"] for r in records]
    assert [it["label"] for it in res["items"]] == [str(r["label"]) for r in records]
    # Outputs are what the engine makes for each prompt alone, whatever the batching.
    model = load_model(str(root / "ckpt")).eval()
    tok = load_tokenizer(str(root / "ckpt"))
    alone = [generate_texts(model, tok, [r["instruction"]], 10)[0][0] for r in records[:3]]
    assert [it["output"] for it in res["items"][:3]] == alone


def test_torchrun_dp2_matches_one_process(setup, tmp_path):
    root, _ = setup
    one = evaluate(EvalConfig(str(root / "ckpt"), str(root / "test.json"), str(tmp_path / "one"), **FAST))
    torchrun(ROOT / "solver_evaluate.py", "--ckpt_dir", root / "ckpt", "--log_dir", tmp_path / "two",
             "--label_file", root / "test.json", "--max_new_tokens", 10, "--max_batch_size", 4)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two == one


def test_sampling_k_and_scoring(setup, tmp_path):
    root, records = setup
    res = evaluate(EvalConfig(str(root / "ckpt"), str(root / "test.json"), str(tmp_path), t=1.0, num_samples=3, limit=2,
                   seed=1, **FAST))
    assert res["total"] == 2 and res["num_samples"] == 3
    assert all(len(it["outputs"]) == len(it["predicts"]) == 3 for it in res["items"])
    again = evaluate(EvalConfig(str(root / "ckpt"), str(root / "test.json"), str(tmp_path), t=1.0, num_samples=3, limit=2,
                     seed=1, **FAST))
    assert again["items"] == res["items"]
    # Scoring: no-answer outputs count as wrong and missing; majority and pass@k per item.
    items = [score_item("q", ["so 5 - 2 = 3 left", "the answer is 4", "answer 4"], "4"),
             score_item("q", ["no idea", "none", "7"], "7"),
             score_item("q", ["x", "y", "z"], "1")]
    s = summarize(items, 3)
    assert (s["correct"], s["missing"], s["total"]) == (0, 2, 3)
    assert s["pass@k"] == 2 / 3 and s["majority_accuracy"] == 2 / 3  # votes skip no-answer outputs


def test_long_prompts_are_left_truncated_and_counted(setup, tmp_path):
    root, records = setup
    tok = load_tokenizer(str(root / "ckpt"))
    ids, n = encode_prompts(tok, [records[0]["instruction"], "Hi"], 8)
    full = tok.encode(format_prompt(records[0]["instruction"]))
    assert n == 1 and ids[0] == [tok.bos_id] + full[-7:] and ids[1] == tok.encode(format_prompt("Hi"))
    res = evaluate(EvalConfig(str(root / "ckpt"), str(root / "test.json"), str(tmp_path), max_seq_len=18, **FAST))
    assert res["truncated"] == sum(len(tok.encode(format_prompt(r["instruction"]))) > 8 for r in records) > 0
    assert res["total"] == len(records)


def test_bad_input_in_process(setup, tmp_path):
    root, records = setup
    ckpt = str(root / "ckpt")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([records[0], {"instruction": "no label here"}]))
    with pytest.raises(ValueError, match=r"bad.json: record index 1.*label"):
        evaluate(EvalConfig(ckpt, str(bad), str(tmp_path)))
    bad.write_text("")
    with pytest.raises(ValueError, match=r"bad.json: empty file"):
        evaluate(EvalConfig(ckpt, str(bad), str(tmp_path)))
    with pytest.raises(ValueError, match="--num_samples 3 with --t 0"):
        evaluate(EvalConfig(ckpt, str(root / "test.json"), str(tmp_path), num_samples=3))
    with pytest.raises(ValueError, match="--max_new_tokens 300 leaves no room"):
        evaluate(EvalConfig(ckpt, str(root / "test.json"), str(tmp_path), max_new_tokens=300))
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--label_file", "missing.json"], "missing.json: no such file"),
    (["--max_batch_size", "0"], "--max_batch_size must be >= 1"),
])
def test_bad_input_exits_with_one_line(setup, tmp_path, argv, message):
    root, _ = setup
    base = {"--ckpt_dir": str(root / "ckpt"), "--log_dir": str(tmp_path), "--label_file": str(root / "test.json")}
    base.update(zip(argv[::2], argv[1::2]))
    proc = run_script("solver_evaluate.py", *[x for kv in base.items() for x in kv])
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1
