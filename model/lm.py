"""The LM handle: a causal LM wrapped once with a LoRA adapter, driven functionally.

Every variant of the model (base, a meta-trained checkpoint, a task's adapted weights) is a
dict of parameter overrides applied with `torch.func.functional_call`; the module itself is
never mutated, so one loaded model serves many tasks and second-order gradients flow through
the overrides. LoRA parameters are named as peft names them (`...lora_A.default.weight`);
full-model parameters as peft sees the base (`...q_proj.base_layer.weight`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor
from torch.func import functional_call

from model.recipe import LORA_LAYERS

Params = dict[str, Tensor]
ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    """Where the LoRA sits: rank, scale, target modules, and optionally only some layers
    (negative indices count from the top: (-8, ..., -1) is the top eight)."""

    r: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] | None = LORA_LAYERS

    @classmethod
    def of(cls, s) -> LoraSpec:
        """From what has lora_r, lora_alpha, lora_targets and lora_layers (a `Settings`, a `MetaTrainConfig`)."""
        return cls(s.lora_r, s.lora_alpha, tuple(s.lora_targets), None if s.lora_layers is None else tuple(s.lora_layers))

    def config(self, n_layers: int | None = None) -> LoraConfig:
        layers = None
        if self.layers is not None:
            if n_layers is None:
                raise ValueError("a LoRA on some layers needs the model's layer count")
            layers = sorted({i % n_layers for i in self.layers})
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, target_modules=list(self.targets), lora_dropout=0.0,
            bias="none", task_type="CAUSAL_LM", layers_to_transform=layers,
        )


@dataclass
class LM:
    model: PeftModel
    tokenizer: object
    name: str
    sha256: str
    lora: LoraSpec
    lora_names: list[str] = field(default_factory=list)
    full_names: list[str] = field(default_factory=list)

    @classmethod
    def wrap(cls, base: torch.nn.Module, tokenizer, name: str, sha256: str, lora: LoraSpec) -> LM:
        n_layers = getattr(getattr(base, "config", None), "num_hidden_layers", None)
        peft_model = get_peft_model(base, lora.config(n_layers), adapter_name=ADAPTER).eval()
        names = [n for n, _ in peft_model.named_parameters()]
        lm = cls(peft_model, tokenizer, name, sha256, lora)
        lm.lora_names = [n for n in names if ".lora_" in n]
        lm.full_names = [n for n in names if ".lora_" not in n]
        return lm

    # --- basics
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.model.get_base_model().config.num_hidden_layers

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # --- parameter spaces
    def params(self, space: str) -> Params:
        """The module's current parameters of a space ("lora" or "full"), detached (no copy)."""
        names = set(self.lora_names if space == "lora" else self.full_names)
        return {n: p.detach() for n, p in self.model.named_parameters() if n in names}

    def lora_init(self, seed: int = 0) -> Params:
        """A fresh LoRA initialisation as peft makes it: A kaiming-uniform, B zero (so the model is unchanged)."""
        g = torch.Generator().manual_seed(seed)
        out: Params = {}
        for n, p in self.params("lora").items():
            if ".lora_A." in n:
                bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform(a=sqrt(5)) on fan_in
                w = torch.rand(p.shape, generator=g) * 2 * bound - bound
            else:
                w = torch.zeros(p.shape)
            out[n] = w.to(p.device, p.dtype)
        return out

    # --- running
    def __call__(self, params: Mapping[str, Tensor] | None = None, **kwargs):
        """Forward with `params` overriding the module's parameters (None: the module as loaded).

        A bf16 model on CUDA runs under bf16 autocast (its trained overrides are fp32 masters);
        an fp32 model runs in whatever autocast context the caller set (meta-training and the
        evaluation choose bf16 autocast over fp32 weights): `enabled=False` here would cancel it.
        """
        amp = self.device.type == "cuda" and self.dtype == torch.bfloat16
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            if not params:
                return self.model(**kwargs)
            return functional_call(self.model, dict(params), args=(), kwargs=kwargs, strict=False)
