"""Record files (errors that point at the line) and the synthetic word-problem generator."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from llama_rlhf.data.pairs import PairDataset
from llama_rlhf.records import DataError, load_records, write_json_atomic
from llama_rlhf.data.sft import SFTDataset
from llama_rlhf.data.synthetic import make_problems, make_splits, write_synthetic
from llama_rlhf.log import get_logger
from llama_rlhf.tasks.gsm8k import extract_answer

KEYS = ("instruction", "label")
STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_jsonl_and_json_list(tmp_path):
    rows = [{"instruction": "a", "label": "1"}, {"instruction": "b", "label": "2", "extra": 0}]
    jsonl = _write(tmp_path / "a.jsonl", "\n".join(map(json.dumps, rows)) + "\n\n")
    write_json_atomic(rows, tmp_path / "a.json")
    assert load_records(jsonl, KEYS) == rows == load_records(tmp_path / "a.json", KEYS)


@pytest.mark.parametrize("name,text,match", [
    ("m.jsonl", '{"instruction": "a", "label": "1"}\n\n{"instruction": oops}\n', r"m\.jsonl:3: malformed JSON"),
    ("k.jsonl", '{"instruction": "a", "label": "1"}\n{"instruction": "b"}\n', r"k\.jsonl:2: .*missing key\(s\) label"),
    ("k.json", '[{"instruction": "a", "label": "1"},\n {"label": "2"}]', r"k\.json: record index 1: .*instruction"),
    ("l.json", '[{"instruction": "a", "label": "1"},\n {"label": ]', r"l\.json:2: malformed JSON"),
    ("o.jsonl", '{"instruction": "a", "label": "1"}\n[1, 2]\n', r"o\.jsonl:2: expected a JSON object, got list"),
    ("e.jsonl", "\n  \n", r"e\.jsonl: empty file"),
    ("e.json", "[]", r"e\.json: no records"),
])
def test_load_errors_name_file_and_line(tmp_path, name, text, match):
    with pytest.raises(DataError, match=match):
        load_records(_write(tmp_path / name, text), KEYS)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: no such file"):
        load_records(tmp_path / "nope.json", KEYS)


def test_write_json_atomic_replaces_and_leaves_no_temp(tmp_path):
    dst = tmp_path / "sub" / "x.json"
    write_json_atomic({"v": 1}, dst)
    write_json_atomic({"v": "ü"}, dst)
    assert json.loads(dst.read_text(encoding="utf-8")) == {"v": "ü"}
    assert [p.name for p in dst.parent.iterdir()] == ["x.json"]
    with pytest.raises(TypeError):
        write_json_atomic({"v": object()}, dst)
    assert json.loads(dst.read_text(encoding="utf-8")) == {"v": "ü"}
    assert [p.name for p in dst.parent.iterdir()] == ["x.json"]


def test_synthetic_is_deterministic():
    assert make_problems(50, seed=3) == make_problems(50, seed=3)
    assert make_problems(50, seed=3) != make_problems(50, seed=4)
    assert make_problems(30, seed=3) == make_problems(50, seed=3)[:30]


def test_splits_are_disjoint_and_distinct():
    train, test = make_splits(400, 100, seed=0)
    questions = [p["instruction"] for p in train + test]
    assert len(train) == 400 and len(test) == 100 and len(set(questions)) == 500


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_solutions_are_right(steps):
    for p in make_problems(300, seed=steps, steps=steps):
        solution = p["output"][0]
        assert set(p) == {"instruction", "output", "label"} and len(p["output"]) == 1
        assert solution.endswith(f"Therefore, the answer is {p['label']}.")
        assert extract_answer(solution) == p["label"]
        equations = STEP.findall(solution)
        assert len(equations) == steps, solution
        count = None
        for a, op, b, c in equations:
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, solution
            assert 0 < c < 100 and (count is None or a == count), solution  # a chain on one count
            count = c
        assert str(count) == p["label"]


def test_write_synthetic(tmp_path):
    write_synthetic(str(tmp_path), n_train=20, n_test=5, seed=1)
    train = load_records(tmp_path / "train.json", ("instruction", "output", "label"))
    test = load_records(tmp_path / "test.json", ("instruction", "output", "label"))
    assert (train, test) == make_splits(20, 5, seed=1)


def test_slips_go_into_train_solutions_only_and_labels_stay_true():
    clean_train, clean_test = make_splits(300, 50, seed=2)
    train, test = make_splits(300, 50, seed=2, slip=1.0)
    assert test == clean_test and [r["label"] for r in train] == [r["label"] for r in clean_train]
    for slipped, clean in zip(train, clean_train):
        assert slipped["instruction"] == clean["instruction"]
        solution = slipped["output"][0]
        if not re.search(r"(double|triple)\.", slipped["instruction"]):
            assert slipped == clean
            continue
        for word, a, op, b in re.findall(r"(double|triple), so (\d+) ([-+*]) (\d+)", solution):
            assert (op, b) == ("+", {"double": "2", "triple": "3"}[word]), solution  # "double" read as "2 more"
        for a, op, b, c in STEP.findall(solution):
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c), solution
        assert extract_answer(solution) != slipped["label"] or "double, so 2 + 2" in solution  # 2 * 2 = 2 + 2
    assert make_splits(300, 50, seed=2, slip=0.0) == (clean_train, clean_test)
    with pytest.raises(ValueError, match="slip"):
        make_splits(3, 1, seed=0, slip=1.5)


class _CharTokenizer:
    """One id per character; enough for the data sets' counting and warnings."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + [3 + ord(c) % 100 for c in text] + [self.eos_id] * eos


def _warn_from_datasets() -> None:
    tok = _CharTokenizer()
    SFTDataset([{"instruction": "q" * 20, "output": "a" * 20}], tok, max_seq_len=8)  # truncated
    PairDataset([{"instruction": "q", "chosen": ["a", "b"], "rejected": ["a"]}], tok)  # one identical pair


@pytest.fixture
def project_records(caplog):
    """Records reaching the project logger (it does not propagate to pytest's root handler)."""
    root = logging.getLogger("llama_rlhf")
    get_logger()
    root.addHandler(caplog.handler)
    yield caplog
    root.removeHandler(caplog.handler)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_data_warnings_come_from_rank_0_only(project_records, monkeypatch, rank):
    monkeypatch.setenv("RANK", rank)
    _warn_from_datasets()
    warnings = [r.getMessage() for r in project_records.records if r.levelno == logging.WARNING]
    if rank == "0":
        assert any("truncated 1 of 1 sequences" in m for m in warnings)
        assert any("skipped 1 pair(s) whose chosen and rejected texts are identical" in m for m in warnings)
    else:
        assert warnings == [] and project_records.records == []
    get_logger("llama_rlhf.data.sft").error("boom")  # errors can be local to a rank: every rank reports them
    assert project_records.records[-1].getMessage() == "boom"
