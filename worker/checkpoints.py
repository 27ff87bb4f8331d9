"""Glue to the meta-training checkpoint registry (model/checkpoints.py) for the API and the worker:
the service's registry is the shared store (contract/blobs.py), so a checkpoint one worker trains is
listed by the API and loaded by every other worker, whatever machine each runs on."""

from __future__ import annotations

import logging
from typing import Any

from contract.blobs import shared
from contract.store import Store
from model import checkpoints as registry
from model.optim import AdamState
from model.lm import LM, Params
from model.settings import Settings

CheckpointError = registry.CheckpointError
inner_lr = registry.inner_lr
log = logging.getLogger("mamlserve.checkpoints")


def listing(s: Settings) -> list[dict[str, Any]]:
    return registry.list_checkpoints(shared(s))


def meta(s: Settings, ckpt: str) -> dict[str, Any]:
    """The checkpoint's metadata; CheckpointError when there is no such (complete) checkpoint."""
    return registry.read_meta(shared(s), ckpt)


def load(s: Settings, ckpt: str, lm: LM) -> tuple[Params, AdamState | None]:
    """A checkpoint's parameter overrides (on the model's device and dtype) and, when it was trained
    with shared moments, the Adam state test-time adaptation continues from (as the evaluation does)."""
    p, state, m = registry.load(shared(s), ckpt, lm.device, lm.dtype)
    registry.check_compatible(m, lm)
    return p, state if m.get("shared_moments") else None


def install_shipped(s: Settings, lm: LM, store: Store) -> dict[str, Any] | None:
    """Install the checkpoint that ships for this base model (model/shipped/) into the shared registry
    and make it active when no checkpoint was ever chosen: a fresh install adapts from it. One
    that fails `verify` (damaged, another layout) is refused: new tasks start from the base model,
    and the log and /readyz (the SHIPPED record) say why. None when none ships for this model."""
    if s.shipped_dir is None:
        return None
    mine = [m for m in registry.list_checkpoints(s.shipped_dir)
            if (m.get("base_model") or {}).get("name") == lm.name]
    if not mine:
        return None
    ckpt = mine[-1]["id"]  # the newest version, should more than one ship
    try:
        registry.verify(s.shipped_dir, ckpt, lm)
    except CheckpointError as e:
        info = {"id": ckpt, "installed": False, "refused": str(e)}
        if store.deactivate(ckpt):
            info["deactivated"] = True
        log.error("shipped checkpoint refused, new tasks start from the base model: %s", e)
    else:
        registry.copy(s.shipped_dir, shared(s), ckpt)
        info = {"id": ckpt, "installed": True, "refused": None, "activated": store.activate_first(ckpt)}
        log.info("shipped checkpoint %s installed%s", ckpt, " and active" if info["activated"] else "")
    store.note_shipped(info)
    return info
