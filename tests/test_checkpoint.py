"""checkpoint_split.py: split / merge / re-shard / HF export, and its bad-input errors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from llama_rlhf.checkpoint import (CheckpointError, load_model, load_source, shard_dim, shard_files, split_command,
                                   split_state_dict)
from llama_rlhf.models.args import ConfigError
from tests.helpers import run_script, tiny_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model, _ = tiny_hf_model("llama-tiny")
    model.save_pretrained(root / "hf")
    return root


def test_hf_split_merge_export_is_bit_exact(hf_dir):
    root = hf_dir
    split_command(str(root / "hf"), str(root / "tp2"), n=2)
    assert sorted(os.listdir(root / "tp2")) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    split_command(str(root / "tp2"), str(root / "tp1"), n=1)
    split_command(str(root / "tp1"), str(root / "back"), to="hf")
    original, back = load_file(root / "hf/model.safetensors"), load_file(root / "back/model.safetensors")
    assert original.keys() == back.keys()
    for key in original:
        assert torch.equal(original[key], back[key]), key

    import transformers
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(root / "back", attn_implementation="eager")
    ref = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", attn_implementation="eager")
    tokens = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, ref(tokens).logits)


def test_reshard_2_to_1_equals_the_source(hf_dir):
    root = hf_dir
    split_command(str(root / "hf"), str(root / "r2"), n=2)
    split_command(str(root / "r2"), str(root / "r1"), n=1)
    full_a, _ = load_source(str(root / "r1"))
    full_b, _ = load_source(str(root / "hf"))
    assert all(torch.equal(full_a[k], full_b[k]) for k in full_b)


def test_single_file_sources(hf_dir, tmp_path):
    sd, args = load_source(str(hf_dir / "hf"))
    torch.save(sd, tmp_path / "model.pth")  # Meta keys, no config beside it -> the preset decides
    split_command(str(tmp_path / "model.pth"), str(tmp_path / "out"), n=1, model_type="llama-tiny")
    out, _ = load_source(str(tmp_path / "out"))
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_every_parameter_has_a_shard_rule(hf_dir):
    sd, _ = load_source(str(hf_dir / "hf"))
    shards = split_state_dict(sd, 2)
    for key, t in sd.items():
        dim = shard_dim(key)
        assert shards[0][key].shape[dim] * 2 == t.shape[dim] if dim is not None else torch.equal(shards[1][key], t)


def test_bad_inputs_raise_clear_errors(hf_dir, tmp_path):
    root = hf_dir
    with pytest.raises(CheckpointError, match="no such file"):
        split_command(str(tmp_path / "missing.pth"), str(tmp_path / "d1"), n=1)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        split_command(str(tmp_path / "junk.pth"), str(tmp_path / "d2"), n=1, model_type="llama-tiny")
    with pytest.raises(ConfigError, match="unknown --model_type"):
        split_command(str(root / "hf"), str(tmp_path / "d3"), n=1, model_type="llama-9b")
    with pytest.raises(ValueError, match="does not divide n_kv_heads"):
        split_command(str(root / "hf"), str(tmp_path / "d4"), n=4)
    with pytest.raises(ConfigError, match="qwen"):
        split_command(str(root / "hf"), str(tmp_path / "d5"), n=1, model_type="qwen-tiny")
    for d in ("d1", "d2", "d3", "d4", "d5"):
        assert not (tmp_path / d).exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_shard_count_must_equal_tp_size(hf_dir, tmp_path):
    split_command(str(hf_dir / "hf"), str(tmp_path / "two"), n=2)
    with pytest.raises(CheckpointError, match="has 2 shards but tensor parallel size is 1"):
        load_model(str(tmp_path / "two"))


def test_params_json_that_disagrees_with_tensors(hf_dir, tmp_path):
    split_command(str(hf_dir / "hf"), str(tmp_path / "c"), n=1)
    params = json.loads((tmp_path / "c/params.json").read_text())
    params["hidden_dim"] = 96
    (tmp_path / "c/params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="w1.weight has shape"):
        split_command(str(tmp_path / "c"), str(tmp_path / "d"), n=1)


def test_dst_holding_a_different_checkpoint(hf_dir, tmp_path):
    split_command(str(hf_dir / "hf"), str(tmp_path / "dst"), n=1)
    before = (tmp_path / "dst/consolidated.00.pth").read_bytes()
    split_command(str(hf_dir / "hf"), str(tmp_path / "dst"), n=1)  # same content: fine
    with pytest.raises(CheckpointError, match="different checkpoint"):
        split_command(str(hf_dir / "hf"), str(tmp_path / "dst"), n=2)
    assert (tmp_path / "dst/consolidated.00.pth").read_bytes() == before
    assert not (tmp_path / "dst/consolidated.01.pth").exists()


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    proc = run_script("checkpoint_split.py", "--ckpt_file", tmp_path / "nope", "--save_path", tmp_path / "d", "--n", "2")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "nope" in lines[0], proc.stderr
    assert not (tmp_path / "d").exists()


def test_num_shards_and_its_alias_n(hf_dir, tmp_path):
    split_command(str(hf_dir / "hf"), str(tmp_path / "a"), num_shards=2)
    split_command(str(hf_dir / "hf"), str(tmp_path / "b"), n=2)
    split_command(str(hf_dir / "hf"), str(tmp_path / "c"), num_shards=2, n=2)  # agreeing: fine
    for d in "abc":
        assert len(shard_files(str(tmp_path / d))) == 2
    with pytest.raises(CheckpointError, match="--num_shards 2 and --n 1 disagree"):
        split_command(str(hf_dir / "hf"), str(tmp_path / "d"), num_shards=2, n=1)
    with pytest.raises(CheckpointError, match="--num_shards must be an integer >= 1"):
        split_command(str(hf_dir / "hf"), str(tmp_path / "e"), num_shards=0)
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def _hf_tokenizer(dst, bos: bool):
    """A tokenizer.json dir whose ids are not Llama-2's: pad 1, bos 3, eos 4 (with `bos`: it
    prepends BOS as Llama-3's does); without `bos` it has no BOS and no pad, as Qwen's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    specials = ["<unk>", "<|pad|>", "<|reserved|>", "<|begin_of_text|>", "<|end_of_text|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = ["twelve apples and seven pears", "the answer is 19", "she sold 48 clips in May"]
    tok.train_from_iterator(words, trainers.BpeTrainer(vocab_size=80, special_tokens=specials, show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 3)])
    tok.save(str(dst / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end_of_text|>", "unk_token": "<unk>"}
    if bos:
        config.update(bos_token="<|begin_of_text|>", pad_token="<|pad|>")
    (dst / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("bos,expected", [(True, {"bos_token_id": 3, "eos_token_id": 4, "pad_token_id": 1}),
                                          (False, {"bos_token_id": None, "eos_token_id": 4})])
def test_hf_export_takes_special_ids_from_the_tokenizer(hf_dir, tmp_path, bos, expected):
    import shutil
    import transformers
    src = tmp_path / "src"
    shutil.copytree(hf_dir / "hf", src)
    _hf_tokenizer(src, bos)
    split_command(str(src), str(tmp_path / "tp1"), num_shards=1)  # the tokenizer travels with the shards
    split_command(str(tmp_path / "tp1"), str(tmp_path / "hf"), to="hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert {k: config.get(k) for k in expected} == expected
    assert ("pad_token_id" in config) == ("pad_token_id" in expected)
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert (loaded.bos_token_id, loaded.eos_token_id) == (expected["bos_token_id"], 4)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token_id == 4


def test_split_keeps_the_source_dtype_unless_dtype_is_given(hf_dir, tmp_path):
    split_command(str(hf_dir / "hf"), str(tmp_path / "bf16"), num_shards=2, dtype="bf16")
    shard = torch.load(tmp_path / "bf16/consolidated.01.pth")
    assert {t.dtype for t in shard.values()} == {torch.bfloat16}
    split_command(str(tmp_path / "bf16"), str(tmp_path / "kept"), num_shards=1)  # a bf16 source stays bf16
    kept = torch.load(tmp_path / "kept/consolidated.00.pth")
    assert {t.dtype for t in kept.values()} == {torch.bfloat16}
    split_command(str(tmp_path / "kept"), str(tmp_path / "hf16"), to="hf", dtype="fp16")
    cfg = json.loads((tmp_path / "hf16/config.json").read_text())
    assert cfg["torch_dtype"] == "float16"
    split_command(str(hf_dir / "hf"), str(tmp_path / "fp32"), num_shards=1)
    fp32 = torch.load(tmp_path / "fp32/consolidated.00.pth")
    assert {t.dtype for t in fp32.values()} == {torch.float32}
    assert kept.keys() == fp32.keys() and all(torch.equal(kept[k], fp32[k].bfloat16()) for k in fp32)
    with pytest.raises(CheckpointError, match="--dtype must be one of"):
        split_command(str(hf_dir / "hf"), str(tmp_path / "bad"), dtype="int8")


def test_tied_embeddings_are_stored_once(tmp_path):
    hf, args = tiny_hf_model("qwen-tiny")  # tie_word_embeddings
    hf.save_pretrained(tmp_path / "hf")
    split_command(str(tmp_path / "hf"), str(tmp_path / "tp2"), num_shards=2)
    shard = torch.load(tmp_path / "tp2/consolidated.00.pth")
    assert shard["output.weight"].data_ptr() == shard["tok_embeddings.weight"].data_ptr()
    split_command(str(tmp_path / "tp2"), str(tmp_path / "back"), to="hf")
    assert json.loads((tmp_path / "back/config.json").read_text())["tie_word_embeddings"] is True
