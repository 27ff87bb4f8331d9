"""A tiny randomly initialised llama (the default model's family) with a small vocabulary.

For tests and development: deterministic (seeded), built in code, nothing downloaded. The
small vocabulary matters: with SmolLM2's 49k tokens the output layer would dominate.
"""

from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token="<unk>")


def tiny_config(vocab_size: int = 512) -> LlamaConfig:
    tok = tiny_tokenizer(vocab_size)
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def tiny_model(seed: int = 0, vocab_size: int = 512) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size))
    return model.eval()
