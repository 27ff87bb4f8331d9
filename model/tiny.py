"""A tiny randomly initialised llama (the default model's family) with a small vocabulary.

For tests and development: deterministic (seeded), built in code, nothing downloaded. The
small vocabulary matters: with SmolLM2's 49k tokens the output layer would dominate.
"""

from functools import lru_cache

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from model.tokens import BOS, EOS, tiny_bpe


@lru_cache
def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tiny_bpe(vocab_size), bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   unk_token="<unk>")


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
