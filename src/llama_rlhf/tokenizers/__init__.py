"""Tokenizers behind one interface: SentencePiece `.model` files and HF `tokenizer.json` dirs."""
from .base import Tokenizer
from .hf import HFTokenizer
from .loader import BOS_ID, EOS_ID, PAD_ID, UNK_ID, load_tokenizer, save_tokenizer, train_sentencepiece
from .sp import SentencePieceTokenizer

__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "load_tokenizer", "save_tokenizer",
           "train_sentencepiece", "UNK_ID", "BOS_ID", "EOS_ID", "PAD_ID"]
