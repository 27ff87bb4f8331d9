"""The configuration a task's weights depend on, and its fingerprint: shared by the API and the workers.

Weights adapted under one configuration are meaningless under another: another base model (its
sha256), dtype, LoRA layout (rank, alpha, targets, layers) or prompt format. Each worker
publishes its configuration and fingerprint in its heartbeat; the API computes its own from its
settings. The fingerprint is part of every task (its id, its weights' key, its adapt queue
`adapt.<fingerprint>`), and predictions go only to workers with the task's fingerprint, so no
worker is ever handed weights it cannot use. /readyz names the workers whose configuration
differs from the API's, and how.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from model.files import model_sha256
from model.settings import Settings


def service_config(s: Settings, model_sha256: str) -> dict[str, Any]:
    return {"model": model_sha256, "dtype": s.dtype, "prompt_format": s.prompt_format,
            "lora": {"r": s.lora_r, "alpha": s.lora_alpha, "targets": list(s.lora_targets),
                     "layers": None if s.lora_layers is None else list(s.lora_layers)}}


def fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """What differs between two configurations, field by field ("lora.layers: None vs [-2, -1]")."""
    out = []
    for k in sorted(set(mine) | set(theirs)):
        a, b = mine.get(k), theirs.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{d}" for d in differences(a, b)]
        elif a != b:
            out.append(f"{k}: {a!r} here, {b!r} there" if k != "model" else f"{k}: sha256 {str(a)[:12]} here, "
                       f"{str(b)[:12]} there")
    return out


def local_config(s: Settings) -> dict[str, Any]:
    """This machine's configuration: the settings and the base model's sha256 (its files' hash,
    memoised; converting the GGUF once, under the same lock as the worker's preparation)."""
    with model_lock(s.data_dir):
        return service_config(s, model_sha256(s.base_model, s.data_dir))


@contextmanager
def model_lock(data_dir: Path):
    """Serialise the one-time GGUF conversion between the API, the worker and their restarts."""
    path = Path(data_dir) / "models" / ".convert.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
