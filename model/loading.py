"""Load a base causal LM offline: a Hugging Face folder, a GGUF file, the embedded SmolLM2, or the tiny test model.

Where its files are (a GGUF file dequantized once under data_dir/models, so later starts load in
well under a second) is model/files.py's, which needs no torch. Nothing here touches the network.
"""

from __future__ import annotations

from pathlib import Path

from model.files import TINY, TINY_SHA256, ModelLoadError, model_folder, model_hash  # first: the offline flags

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from model.lm import LM, LoraSpec  # noqa: E402


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(spec: str, data_dir: Path):
    if spec == TINY:
        from model.tiny import tiny_tokenizer

        return tiny_tokenizer()
    return AutoTokenizer.from_pretrained(model_folder(spec, data_dir), local_files_only=True)


def load_lm(
    spec: str,
    data_dir: Path,
    device: str = "auto",
    lora: LoraSpec | None = None,
    attn: str = "sdpa",
    dtype: torch.dtype | None = None,
) -> LM:
    """Load `spec` ("smollm2", "tiny", a HF folder or a .gguf file) as an LM: fp32 on CPU, bf16 on CUDA.

    On CUDA the forward runs under bf16 autocast, and the parameters being trained are fp32
    masters (see `adapt.start_params`): small steps would round away in bf16 weights. On this
    CPU bf16 is 7-20x slower than fp32. `dtype` overrides the choice (e.g. fp32 on CUDA).
    attn="eager" gives attention with a double backward everywhere (second-order MAML on CPU).
    """
    dev = resolve_device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    lora = lora or LoraSpec()
    if spec == TINY:
        from model.tiny import tiny_model, tiny_tokenizer

        model, tok = tiny_model(), tiny_tokenizer()
        model.config._attn_implementation = attn
        return LM.wrap(model.to(dev, dtype), tok, name=TINY, sha256=TINY_SHA256, lora=lora)
    folder = model_folder(spec, data_dir)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        if config.architectures and not causal.intersection(config.architectures):
            raise ValueError(f"its architectures {config.architectures} have no causal LM head")
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype, local_files_only=True, attn_implementation=attn
        )
    except ValueError as e:  # transformers says "Unrecognized configuration class ..." for non-causal models
        raise ModelLoadError(f"{folder} is not a causal language model: {e}") from e
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    try:
        return LM.wrap(model.to(dev).eval(), tok, name=spec, sha256=model_hash(folder), lora=lora)
    except ValueError as e:  # peft: the target modules are not in this architecture
        raise ModelLoadError(f"LoRA targets {list(lora.targets)} do not fit {folder}: {e}") from e


def load_for_autocast(spec: str, data_dir: Path, device: str = "auto", lora: LoraSpec | None = None) -> LM:
    """`spec` as meta-training and evaluation run it: SDPA attention, fp32 weights everywhere (on
    CUDA loaded in bf16, then made fp32 masters; the forward runs under bf16 autocast)."""
    lm = load_lm(spec, data_dir, device, lora, attn="sdpa")
    if lm.device.type == "cuda":
        lm.model.float()
    return lm
