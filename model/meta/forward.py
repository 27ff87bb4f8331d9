"""How the model runs while meta-training: no KV cache, MATH attention where a double backward or
vmap needs it, bf16 autocast on CUDA, and gradient checkpointing that is exact under `functional_call`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.lm import LM


class _ReplayCache:
    """One layer's KV cache as it was before a checkpointed forward: `update` returns what the
    real cache's returned then (its keys and values, then the new ones) and stores nothing."""

    def __init__(self, kv: tuple[Tensor, Tensor] | None):
        self.kv = kv

    @classmethod
    def of(cls, cache: Any, idx: int | None) -> _ReplayCache:
        layers = getattr(cache, "layers", None)
        if idx is None or layers is None:
            raise NotImplementedError(f"gradient checkpointing over a {type(cache).__name__} cache")
        layer = layers[idx] if idx < len(layers) else None
        return cls((layer.keys, layer.values) if layer is not None and layer.is_initialized else None)

    def update(self, keys: Tensor, values: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.kv is None:
            return keys, values
        return torch.cat([self.kv[0], keys], dim=-2), torch.cat([self.kv[1], values], dim=-2)


@contextlib.contextmanager
def grad_checkpointing(lm: LM, enabled: bool = True) -> Iterator[None]:
    """Recompute each decoder layer in backward, with the tensors the forward actually used.

    Each decoder layer is wrapped in non-reentrant `torch.utils.checkpoint` with the layer's
    *current* parameter tensors passed in explicitly: the model runs under `functional_call`, and
    HF's own checkpointing would recompute with the module's original weights (wrong gradients,
    silently). Under `functional_call` a layer's `named_parameters()` are the override tensors, so
    they are captured at forward time and re-installed for the recomputation. Non-reentrant
    checkpointing supports `autograd.grad(create_graph=True)`: second order works through it. A KV
    cache (the prediction prompt of inner_context "recipe") is replayed to the recomputation as the
    forward found it (`_ReplayCache`).

    The result is bit-identical to no checkpointing, first and second order (tests check it). What
    it saves (SmolLM2, CPU, peak RSS, 2k tokens a step): fomaml/full 6.9 -> 5.3 GB, maml/lora
    8.6 -> 7.5 GB, maml/full 15.7 -> 15.3 GB: little for second order, whose create_graph backward
    keeps the recomputed activations alive anyway.
    """
    if not enabled:
        yield
        return
    from torch.nn.utils.stateless import _reparametrize_module
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in lm.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        orig = layer.forward

        def fwd(*args, _orig=orig, _layer=layer, **kwargs):
            if not torch.is_grad_enabled():
                return _orig(*args, **kwargs)
            names, tensors = zip(*_layer.named_parameters())
            # A KV cache (a prompt encoded once, or rows on top of one) is appended to by the
            # forward; the recomputation must see what the forward saw, not the cache after it.
            cache = kwargs.get("past_key_values")
            idx = getattr(getattr(_layer, "self_attn", None), "layer_idx", None)
            seen = _ReplayCache.of(cache, idx) if cache is not None else None
            calls = 0

            def run(*ts):
                nonlocal calls
                calls += 1
                kw = kwargs if calls == 1 or cache is None else {**kwargs, "past_key_values": seen}
                with _reparametrize_module(_layer, dict(zip(names, ts))):
                    return _orig(*args, **kw)

            return checkpoint(run, *tensors, use_reentrant=False)

        layer.forward = fwd
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


@contextlib.contextmanager
def training_mode(lm: LM, order: int | None, bf16: bool, batched: bool = False) -> Iterator[None]:
    """No KV cache; MATH attention for second order (it needs attention with a double backward,
    which the fused kernels, CPU SDPA's among them, lack) and for vmapped tasks (the fused kernels
    have no batching rule: vmap would loop over tasks); bf16 autocast on CUDA, where the
    meta-parameters stay fp32."""
    cfg = lm.model.config
    old_cache = getattr(cfg, "use_cache", None)
    cfg.use_cache = False  # training forwards never reuse keys/values; don't build a cache
    with contextlib.ExitStack() as stack:
        if order == 2 or batched:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if bf16 and lm.device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        try:
            yield
        finally:
            cfg.use_cache = old_cache

