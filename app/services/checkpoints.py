"""The checkpoint registry as the API sees it: the service's shared store (contract/blobs.py), read
without torch (model/checkpoint_meta.py); the workers write it and load from it."""

from __future__ import annotations

from typing import Any

from contract.blobs import shared
from model.checkpoint_meta import CheckpointError, inner_lr, list_checkpoints, read_meta
from model.settings import Settings

__all__ = ["CheckpointError", "inner_lr", "listing", "meta"]


def listing(s: Settings) -> list[dict[str, Any]]:
    return list_checkpoints(shared(s))


def meta(s: Settings, ckpt: str) -> dict[str, Any]:
    """The checkpoint's metadata; CheckpointError when there is no such (complete) checkpoint."""
    return read_meta(shared(s), ckpt)
