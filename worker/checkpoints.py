"""Glue to the meta-training checkpoint registry (model/checkpoints.py) for the API and the worker:
the service's registry is the shared store (worker/blobs.py), so a checkpoint one worker trains is
listed by the API and loaded by every other worker, whatever machine each runs on."""

from __future__ import annotations

from typing import Any

from model import checkpoints as registry
from model.adapt import AdamState
from model.lm import LM, Params
from model.settings import Settings
from worker.blobs import shared

CheckpointError = registry.CheckpointError
inner_lr = registry.inner_lr


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
