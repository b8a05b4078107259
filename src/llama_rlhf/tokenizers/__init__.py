"""Tokenizers behind one interface: SentencePiece `.model` files, tiktoken BPE files (Llama-3's
`tokenizer.model`, Qwen-1's `qwen.tiktoken`) and HF `tokenizer.json` dirs."""
from .base import Tokenizer
from .hf import HFTokenizer
from .loader import BOS_ID, EOS_ID, PAD_ID, UNK_ID, load_tokenizer, save_tokenizer, train_sentencepiece
from .sp import SentencePieceTokenizer
from .tiktoken_bpe import TiktokenTokenizer

__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "TiktokenTokenizer", "load_tokenizer",
           "save_tokenizer", "train_sentencepiece", "UNK_ID", "BOS_ID", "EOS_ID", "PAD_ID"]
