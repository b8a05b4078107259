"""GSM8K answer extraction, scoring, and the converter (inline data and the real release)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_rlhf.records import DataError, load_records
from llama_rlhf.tasks.gsm8k import convert_gsm8k, extract_answer, is_correct, majority_vote, normalize_number

GSM8K = Path(__file__).resolve().parents[2] / "shared/datasets/gsm8k"

EXTRACT = [
    ("Therefore, the answer is 72.", "72"),
    ("So 48 + 24 = 72.\n#### 72", "72"),
    ("He had 5, then 3. The answer is 8. Check: 8 - 3 = 5.", "8"),  # marker beats the last number
    ("The answer is 3. No wait, the answer is 4.", "4"),  # last marker wins
    ("The temperature fell to -3 degrees. The answer is -3.", "-3"),
    ("She pays $5 for each, so the answer is $15.", "15"),
    ("The answer is $1,234.50.", "1234.5"),
    ("The city has 1,000,000 people.", "1000000"),
    ("Each costs 2.5 dollars, so 4 cost 10.0 dollars.", "10"),
    ("He also bought 3 pens and 4 more, so 7 in total.", "7"),  # "also" holds "so"
    ("I am not sure.", None),
    ("", None),
    ("the answer is 12", "12"),
    ("THE ANSWER IS 9", "9"),
    ("12-5=7 apples", "7"),  # a binary minus is not a negative sign
    ("The answer is unclear, but 6 seems right.", "6"),  # marker without a number falls back
    ("Numbers 3,4,5 in a row", "5"),
    ("The answer is: 0.75 of the cake.", "0.75"),
    ("The answer is -$4.", "-4"),
    ("Tom is 120-page-book fan: the answer is 120.", "120"),
]


@pytest.mark.parametrize("text,expected", EXTRACT)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("raw,expected", [
    ("1,234.50", "1234.5"), ("-3", "-3"), ("$5", "5"), ("5.0", "5"), ("5.00", "5"), ("72.", "72"),
    (" 1,000,000 ", "1000000"), ("0.50", "0.5"), ("-0", "0"), ("abc", None), ("", None), ("1e3", None),
])
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_is_correct_and_majority_vote():
    assert is_correct("5", "5.00") and is_correct("1,000", "1000") and is_correct("$-2", "-2")
    assert not is_correct(None, "5") and not is_correct("five", "5") and not is_correct("6", "5")
    assert majority_vote(["5", None, "3", "5.0", "3"]) == "5"  # tie 2-2, "5" came first
    assert majority_vote(["3", "5", "5"]) == "5"
    assert majority_vote([None, None]) is None and majority_vote([]) is None


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_convert_small_file(tmp_path):
    src = _write_jsonl(tmp_path / "g.jsonl", [
        {"question": " Natalia sold 48 clips in April and half as many in May. How many in all? ",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                   "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72"},
        {"question": "How much?", "answer": "It costs 1,000 x 2 = $<<1000*2=2000>>2,000.\n#### 2,000"},
    ])
    n = convert_gsm8k(str(src), str(tmp_path / "out/train.json"))
    out = load_records(tmp_path / "out/train.json", ("instruction", "output", "label"))
    assert n == 2 and [r["label"] for r in out] == ["72", "2000"]
    assert out[0]["instruction"].startswith("Natalia") and out[0]["instruction"].endswith("all?")
    assert out[0]["output"] == ["Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n"
                                "Therefore, the answer is 72."]
    assert out[1]["output"][0].endswith("$2,000.\nTherefore, the answer is 2000.")


@pytest.mark.parametrize("bad,match", [
    ({"question": "q", "answer": "no final line"}, r"g\.jsonl:2: answer has no '#### N'"),
    ({"question": "q", "answer": "x\n#### many"}, r"g\.jsonl:2: final answer 'many' is not a number"),
    ({"question": "q"}, r"g\.jsonl:2: 'answer' must be a string"),
    ('{"question": "q", "answer": ', r"g\.jsonl:2: malformed JSON"),
])
def test_convert_errors_name_file_and_line(tmp_path, bad, match):
    src = _write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}, bad])
    with pytest.raises(DataError, match=match):
        convert_gsm8k(str(src), str(tmp_path / "out.json"))
    assert not (tmp_path / "out.json").exists()


@pytest.mark.skipif(not GSM8K.is_dir(), reason="../shared/datasets/gsm8k is absent")
@pytest.mark.parametrize("split,count", [("train", 7473), ("test", 1319)])
def test_convert_real_gsm8k(tmp_path, split, count):
    dst = tmp_path / f"{split}.json"
    assert convert_gsm8k(str(GSM8K / f"{split}.jsonl"), str(dst)) == count
    records = json.loads(dst.read_text())
    assert len(records) == count
    for i, r in enumerate(records):
        assert len(r["output"]) == 1 and "<<" not in r["output"][0] and "####" not in r["output"][0], i
        assert extract_answer(r["output"][0]) == r["label"], i


def test_dev_split_is_fixed_disjoint_and_found_by_ppo(tmp_path):
    from llama_rlhf.ppo.config import PPOConfig

    src = _write_jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(10)])
    assert convert_gsm8k(str(src), str(tmp_path / "a/train.json"), dev_size=3) == 7
    again = tmp_path / "b"
    convert_gsm8k(str(src), str(again / "train.json"), dev_size=3, dev_json=str(again / "held.json"))
    train, dev = (load_records(tmp_path / "a" / f, ("label",)) for f in ("train.json", "dev.json"))
    assert len(dev) == 3 and sorted(r["label"] for r in train + dev) == sorted(str(i) for i in range(10))
    assert load_records(again / "held.json", ("label",)) == dev  # the same problems every time
    assert [int(r["label"]) for r in dev] == sorted(int(r["label"]) for r in dev)  # file order kept
    cfg = PPOConfig(actor_ckpt_dir=str(tmp_path), actor_save_dir=str(tmp_path / "o"),
                    train_file=str(tmp_path / "a/train.json"))
    assert cfg.heldout_file == str(tmp_path / "a/dev.json")  # PPO's held-out default is dev, not test
    with pytest.raises(DataError, match="--dev_size 10"):
        convert_gsm8k(str(src), str(tmp_path / "c/train.json"), dev_size=10)


@pytest.mark.parametrize("text,strict,flexible", [
    ("So 3 + 4 = 7. The answer is 7.", "7", "7"),
    ("3 + 4 = 7, plus 1 is 8", None, "8"),
    ("The answer is 12. Check: 12 - 2 = 10", "12", "10"),
    ("#### 1,000", "1000", "1000"),
])
def test_strict_and_flexible_extraction(text, strict, flexible):
    from llama_rlhf.tasks.gsm8k import extract_flexible, extract_strict
    assert extract_strict(text) == strict and extract_flexible(text) == flexible


@pytest.mark.skipif(not GSM8K.is_dir(), reason="../shared/datasets/gsm8k is absent")
def test_convert_script_holds_out_500_dev_problems(tmp_path):
    from tests.helpers import run_script
    proc = run_script("dataset/convert_gsm8k.py", "--src", GSM8K / "train.jsonl", "--dst", tmp_path / "train.json")
    assert proc.returncode == 0, proc.stderr
    train, dev = (json.loads((tmp_path / f).read_text()) for f in ("train.json", "dev.json"))
    assert (len(train), len(dev)) == (6973, 500)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in dev}
