"""Checkpoints: the tables (`tables`), format conversion (`formats`: any source -> Meta shards or
an HF dir, `checkpoint_split.py`) and runtime I/O (`io`: load a shard, the one atomic writer)."""
from .formats import SplitConfig, load_source, save_hf, save_meta, special_token_ids, split, split_command
from .io import (atomic_torch_save, ckpt_args, commit_dir, copy_tokenizer, find_tokenizer, load_model, read_state_dict,
                 save_model, shard_files)
from .tables import (HF_KEYS, SHARD_DIMS, CheckpointError, check_shapes, expected_shapes, hf_to_meta, is_hf_keys,
                     merge_state_dicts, meta_to_hf, shard_dim, split_state_dict)

__all__ = ["HF_KEYS", "SHARD_DIMS", "CheckpointError", "SplitConfig", "atomic_torch_save", "check_shapes",
           "ckpt_args", "commit_dir", "copy_tokenizer", "expected_shapes", "find_tokenizer", "hf_to_meta", "is_hf_keys",
           "load_model", "load_source", "merge_state_dicts", "meta_to_hf", "read_state_dict", "save_hf", "save_meta",
           "save_model", "shard_dim", "shard_files", "special_token_ids", "split", "split_command", "split_state_dict"]
