"""Counting tokens without torch: the base model's own tokenizer (its tokenizer.json, read by the
`tokenizers` package, as transformers reads it) and the tiny test model's byte-level BPE."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.files import TINY, model_folder

BOS, EOS = "<|im_start|>", "<|im_end|>"

# Enough English-like text for byte-level BPE to learn common merges; every byte is in the
# initial alphabet, so any input encodes.
_CORPUS = [
    "the movie was great and i loved it", "the film was terrible and boring",
    "positive negative neutral sports politics business science world",
    "question answer input output option true false yes no entailment contradiction",
    "what is the capital of france paris berlin london tokyo madrid rome",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
] * 20


@lru_cache
def tiny_bpe(vocab_size: int = 512) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def fast_tokenizer(spec: str, data_dir: Path) -> Tokenizer:
    """The tokenizer `model.loading.load_tokenizer(spec, data_dir)` wraps; a model folder without a
    tokenizer.json (slow tokenizer files alone) is converted by transformers, as it loads them."""
    if spec == TINY:
        return tiny_bpe()
    folder = model_folder(spec, data_dir)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True).backend_tokenizer


def count_tokens(tok: Tokenizer, text: str) -> int:
    """Tokens of `text` alone, as the prompt builder encodes it (no special tokens added)."""
    return len(tok.encode(text, add_special_tokens=False).ids)
