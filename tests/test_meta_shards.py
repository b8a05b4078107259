"""Meta's own pre-split Llama-1/2 checkpoints (`consolidated.NN.pth` at MP N, tok_embeddings split
on the model dim, params.json with vocab_size -1) load directly at TP = N, and checkpoint_split.py
re-splits them to any other TP.

The Meta shards are cut here by hand, from Meta's layout rules, not by `split_state_dict`. This
file is also the torchrun worker: `python -m torch.distributed.run tests/test_meta_shards.py OUT DIR...`.
"""
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run by torchrun as its own worker: the repo root is not on sys.path then
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch

from llama_rlhf import parallel
from llama_rlhf.checkpoint import CheckpointError, load_model, load_source, save_model, shard_files, split_command
from llama_rlhf.models import ModelArgs, build_model
from tests.helpers import torchrun

META_PARAMS = {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "vocab_size": -1}
VOCAB = 512

# Meta's layout (fairscale's ParallelEmbedding / ColumnParallelLinear / RowParallelLinear):
# the split dim of each weight by key suffix; anything else (norms) is replicated.
META_DIMS = {"tok_embeddings.weight": 1, "output.weight": 0, "wq.weight": 0, "wk.weight": 0, "wv.weight": 0,
             "w1.weight": 0, "w3.weight": 0, "wo.weight": 1, "w2.weight": 1}


def _meta_dim(key: str):
    return next((d for suffix, d in META_DIMS.items() if key.endswith(suffix)), None)


def write_meta_dir(sd: dict, dst: Path, n: int) -> None:
    dst.mkdir(parents=True)
    for i in range(n):
        shard = {k: (t if _meta_dim(k) is None else t.chunk(n, dim=_meta_dim(k))[i]).clone() for k, t in sd.items()}
        torch.save(shard, dst / f"consolidated.{i:02d}.pth")
    (dst / "params.json").write_text(json.dumps(META_PARAMS))


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    args = ModelArgs(**{**META_PARAMS, "vocab_size": VOCAB})
    model = build_model(args, init_seed=0)
    with torch.no_grad():  # every weight random, norms too, so no slice can hide behind ones
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    tokens[0, :3] = torch.tensor([VOCAB - 1, 0, VOCAB // 2])  # rows in every shard's vocab slice
    torch.save(tokens, root / "tokens.pt")
    with torch.no_grad():
        ref = model(tokens)
    write_meta_dir(sd, root / "meta2", 2)
    write_meta_dir(sd, root / "meta4", 4)
    split_command(str(root / "meta2"), str(root / "split1"), num_shards=1)
    split_command(str(root / "meta2"), str(root / "split4"), num_shards=4)
    torchrun(__file__, root / "out2.pt", root / "tokens.pt", root / "meta2", nproc=2)
    torchrun(__file__, root / "out4.pt", root / "tokens.pt", root / "meta4", root / "split4", nproc=4)
    return {"root": root, "sd": sd, "ref": ref, "tokens": tokens,
            "out": {**torch.load(root / "out2.pt"), **torch.load(root / "out4.pt")}}


def test_meta_shards_load_at_their_tp(meta):
    for name in ("meta2", "meta4"):
        out = meta["out"][str(meta["root"] / name)]
        assert (out["logits"] - meta["ref"]).abs().max().item() <= 1e-5, name
        assert out["vocab_size"] == VOCAB  # from the embedding, params.json says -1


def test_resplit_to_1_and_4_shards(meta):
    root = meta["root"]
    with torch.no_grad():
        logits1 = load_model(str(root / "split1")).eval()(meta["tokens"])
    assert (logits1 - meta["ref"]).abs().max().item() <= 1e-5
    assert (meta["out"][str(root / "split4")]["logits"] - meta["ref"]).abs().max().item() <= 1e-5
    for name in ("split1", "split4"):
        full, _ = load_source(str(root / name))
        assert all(torch.equal(full[k], meta["sd"][k]) for k in meta["sd"]), name


def test_a_meta_dir_loaded_at_tp2_saves_our_layout(meta):
    resaved = str(meta["root"] / "meta2") + "-resaved"
    assert len(shard_files(resaved)) == 2
    assert torch.load(shard_files(resaved)[0])["tok_embeddings.weight"].shape == (VOCAB // 2, META_PARAMS["dim"])
    full, _ = load_source(resaved)
    assert all(torch.equal(full[k], meta["sd"][k]) for k in meta["sd"])


def test_disagreeing_meta_shards_name_the_file(meta, tmp_path):
    from llama_rlhf.checkpoint.io import _vocab_split_embedding
    write_meta_dir(meta["sd"], tmp_path / "bad", 2)
    shard1 = torch.load(tmp_path / "bad/consolidated.01.pth")
    shard1["tok_embeddings.weight"] = shard1["tok_embeddings.weight"][:-1].clone()
    torch.save(shard1, tmp_path / "bad/consolidated.01.pth")
    shard0 = torch.load(tmp_path / "bad/consolidated.00.pth")
    args = ModelArgs(**{**META_PARAMS, "vocab_size": VOCAB})
    with pytest.raises(CheckpointError, match="consolidated.01.pth: tok_embeddings.weight"):
        _vocab_split_embedding(shard0, shard_files(str(tmp_path / "bad")), args, rank=0)


def test_ppo_sizes_a_raw_meta_dir(meta):
    """PPO checks its models and sizes their memory before loading any: from a Meta dir's
    params.json (vocab_size -1) that needs the embedding's shape."""
    from llama_rlhf.checkpoint import ckpt_args
    from llama_rlhf.ppo.config import PPOConfig
    from llama_rlhf.ppo.placement import model_costs
    from llama_rlhf.ppo.run import _check_critic
    meta2 = str(meta["root"] / "meta2")
    assert ckpt_args(meta2).vocab_size == VOCAB
    cfg = PPOConfig(actor_ckpt_dir=meta2, actor_save_dir="unused", train_file="unused", estimator="grpo",
                    reward="rm", reward_model_ckpt_dir=meta2)
    _check_critic(cfg)
    params = sum(t.numel() for t in meta["sd"].values())
    assert model_costs(cfg, tp=2, on_cuda=False)["actor"] == 16 * params / 2


def _worker(out_file: str, tokens_file: str, *ckpt_dirs: str) -> None:
    """Each dir (all with this world's shard count): logits of the tokens; a Meta dir is also saved
    back (`DIR-resaved`) as training would save it."""
    tokens, out = torch.load(tokens_file), {}
    for ckpt_dir in ckpt_dirs:
        parallel.init(tp=len(shard_files(ckpt_dir)))
        model = load_model(ckpt_dir).eval()
        with torch.no_grad():
            out[ckpt_dir] = {"logits": model(tokens), "vocab_size": model.args.vocab_size}
        if Path(ckpt_dir).name.startswith("meta") and parallel.tp_size() == 2:
            save_model(model, ckpt_dir + "-resaved")
    if parallel.is_main():
        torch.save(out, out_file)
    parallel.barrier()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
