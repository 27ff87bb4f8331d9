"""A meta-training checkpoint's side of the run: what its meta.json records, and how a run resumes
from one (weights, Adam state, step, history, and the config it continues with)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from model import checkpoints
from model.optim import AdamState
from model.lm import LM, Params
from model.meta.tasks import TaskSource
from model.meta_config import MetaTrainConfig


def setting_fingerprint(source: TaskSource) -> str:
    """sha256 of the setting's two task lists: the committed settings files can be regenerated."""
    text = json.dumps([sorted(t.name for t in source.meta_train), sorted(t.name for t in source.held_out)])
    return hashlib.sha256(text.encode()).hexdigest()


def run_meta(cfg: MetaTrainConfig, lm: LM, source: TaskSource, status: str, step: int, parent: str | None,
             history: list) -> dict[str, Any]:
    """meta.json of a run's checkpoint (model.checkpoints reads it: keep its keys)."""
    return {
        "method": cfg.method, "space": cfg.space, "setting": cfg.setting, "status": status,
        # what this checkpoint has seen: the evaluation refuses held-out tasks that are in here
        "meta_train_tasks": sorted(t.name for t in source.meta_train), "setting_sha256": setting_fingerprint(source),
        "step": step, "total_steps": cfg.steps, "parent": parent, "shared_moments": cfg.shared,
        "order": cfg.order, "seed": cfg.seed,
        "hyperparameters": {
            "tasks_per_step": cfg.tasks_per_step, "inner_steps": cfg.inner_steps, "inner_lr": cfg.lr_inner,
            "outer_lr": cfg.lr_outer, "support_size": cfg.support_size, "support_batch": cfg.support_batch,
            "query_size": cfg.query_size, "context_demos": cfg.context_demos, "inner_context": cfg.inner_context,
            "remap": cfg.remap, "max_grad_norm": cfg.max_grad_norm,
            "betas": list(cfg.betas), "context_tokens": cfg.context_tokens, "grad_checkpointing": cfg.grad_checkpointing,
            "prompt_format": cfg.prompt_format,
        },
        "base_model": {"name": lm.name, "sha256": lm.sha256},
        "lora": {"r": lm.lora.r, "alpha": lm.lora.alpha, "targets": list(lm.lora.targets),
                 "layers": checkpoints.lora_layers(lm.lora.layers, lm.n_layers)},
        "config": cfg.model_dump(mode="json"),
        "history": history[-200:],
    }


def resumed_config(cfg: MetaTrainConfig, meta: dict[str, Any]) -> MetaTrainConfig:
    """The config a run resumed from a checkpoint continues with: the checkpoint's inner context
    unless the caller names one, and then it must be the same (a resume continues the run it
    resumes). A meta.json written before `inner_context` existed ran "sampled"."""
    stored = (meta.get("config") or {}).get("inner_context", "sampled")
    if "inner_context" in cfg.model_fields_set:
        if cfg.inner_context != stored:
            raise ValueError(f"checkpoint {cfg.resume} was meta-trained with inner_context {stored!r}, "
                             f"not {cfg.inner_context!r}")
        return cfg
    return MetaTrainConfig.model_validate({**cfg.model_dump(exclude_unset=True), "inner_context": stored})



def resume(cfg: MetaTrainConfig, lm: LM,
           registry: checkpoints.Where) -> tuple[MetaTrainConfig, Params, AdamState, int, list]:
    """(config, θ, Adam state, step, history) of the run `cfg.resume` names, checked against the
    model and the config's method and space."""
    params, state, meta = checkpoints.load(registry, cfg.resume, lm.device)
    checkpoints.check_compatible(meta, lm)
    cfg = resumed_config(cfg, meta)
    if (meta["method"], meta["space"]) != (cfg.method, cfg.space):
        raise ValueError(f"checkpoint {cfg.resume} is {meta['method']}/{meta['space']}, not {cfg.method}/{cfg.space}")
    return cfg, {k: v.float() for k, v in params.items()}, state, int(meta["step"]), list(meta.get("history", []))
