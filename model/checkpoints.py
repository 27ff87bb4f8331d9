"""The meta-training checkpoint registry: one versioned entry per run, in a blob store.

    checkpoints/<id>/
        params.safetensors   the meta-learned parameters, as overrides of the base model
                             (LoRA space: every lora_A/lora_B; full space: every base weight)
        adam.safetensors     the outer Adam moments, keys "m/<name>" and "v/<name>"
        meta.json            method, setting, space, config, base model name and sha256, step,
                             Adam t/betas/eps, status, log history, evaluation results

The registry is a `model.blobs.Blobs`: a data dir (`Folder`, what the command-line tools use:
data_dir/checkpoints/<id>/...) or the service's shared store (`contract.blobs.RedisBlobs`), so a
checkpoint one machine trains is loaded by any other. Every function takes either a path (the
data dir) or a store. Ids are "v<NNNN>-<method>-<space>-<setting>"; a version is allocated by
creating its `allocated` key only when absent, so two runs never share an id. Each value is
replaced whole (a reader never sees half a file), and meta.json is written last: a run that saves
periodically overwrites its own entry (meta.json's `step` says how far it got). A resumed run gets
a new id whose meta names its `parent`. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model import weights
from model.adapt import AdamState
from model.blobs import Blobs
# the read side, torch-free for the API (re-exported: callers use model.checkpoints for both)
from model.checkpoint_meta import (  # noqa: F401
    _ID, META, CheckpointError, ids, inner_lr, list_checkpoints, read_meta, registry,
)
from model.lm import LM, Params
from model.settings import SHIPPED_DIR

FORMAT = "mamlserve-checkpoint-1"
PARAMS = "params.safetensors"
ADAM = "adam.safetensors"
ALLOCATED = "allocated"
Where = Path | Blobs  # a data dir, or a store whose keys start at checkpoints/
# Checkpoints that ship with the service (model/shipped/checkpoints/<id>/, with the files' sha256
# in meta.json): a worker verifies the one made for its base model and installs it (worker/checkpoints.py).
SHIPPED = SHIPPED_DIR


def _key(ckpt_id: str, name: str) -> str:
    if not _ID.match(ckpt_id):  # ids come from HTTP requests too: never let one walk out of the registry
        raise CheckpointError(f"not a checkpoint id: {ckpt_id!r}")
    return f"{ckpt_id}/{name}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", s).strip("_") or "x"


def new_id(where: Where, method: str, space: str, setting: str) -> str:
    """Allocate the next version: creating its key is the lock, so concurrent runs get distinct ids."""
    reg = registry(where)
    while True:
        versions = [int(_ID.match(i).group(1)) for i in ids(where)]
        ckpt_id = f"v{max(versions, default=0) + 1:04d}-{_slug(method)}-{_slug(space)}-{_slug(setting)}"
        if reg.create(_key(ckpt_id, ALLOCATED), b""):
            return ckpt_id
        # another run took this version first: look again


def _json(data: dict) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode()


def save(where: Where, ckpt_id: str, params: Mapping[str, Tensor], state: AdamState, meta: dict[str, Any]) -> str:
    """Write (or overwrite) a checkpoint's three values; meta.json last, so it marks a complete set."""
    reg = registry(where)
    reg.put(_key(ckpt_id, PARAMS), weights.to_bytes(params, {"format": FORMAT}))
    moments = {f"m/{k}": v for k, v in state.m.items()} | {f"v/{k}": v for k, v in state.v.items()}
    reg.put(_key(ckpt_id, ADAM), weights.to_bytes(moments, {"format": FORMAT}))
    meta = {
        **meta, "id": ckpt_id, "format": FORMAT, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "adam": {"t": state.t, "betas": list(state.betas), "eps": state.eps},
    }
    reg.put(_key(ckpt_id, META), _json(meta))
    return ckpt_id


def update_meta(where: Where, ckpt_id: str, **fields: Any) -> dict[str, Any]:
    """Merge fields into meta.json (the evaluation writes its results back this way)."""
    meta = read_meta(where, ckpt_id)
    for k, v in fields.items():
        if isinstance(v, dict) and isinstance(meta.get(k), dict):
            meta[k] = {**meta[k], **v}
        else:
            meta[k] = v
    registry(where).put(_key(ckpt_id, META), _json(meta))
    return meta


def _tensors(reg: Blobs, ckpt_id: str, name: str, device, dtype=None) -> Params:
    raw = reg.get(_key(ckpt_id, name))
    if raw is None:
        raise CheckpointError(f"checkpoint {ckpt_id!r} lacks {name} in {reg.where}")
    return weights.from_bytes(raw, device, dtype)


def load(where: Where, ckpt_id: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
         ) -> tuple[Params, AdamState, dict[str, Any]]:
    """(params, Adam state, meta) of a checkpoint. Moments are fp32 whatever `dtype` the params get."""
    meta = read_meta(where, ckpt_id)
    reg = registry(where)
    params = _tensors(reg, ckpt_id, PARAMS, device, dtype)
    raw = _tensors(reg, ckpt_id, ADAM, device)
    adam = meta.get("adam", {})
    state = AdamState(
        {k[2:]: v for k, v in raw.items() if k.startswith("m/")},
        {k[2:]: v for k, v in raw.items() if k.startswith("v/")},
        int(adam.get("t", 0)), tuple(adam.get("betas", (0.9, 0.999))), float(adam.get("eps", 1e-8)),
    )
    return params, state, meta


def copy(src: Where, dst: Where, ckpt_id: str) -> None:
    """Copy a checkpoint between registries (a data dir's into the service's), meta.json last."""
    a, b = registry(src), registry(dst)
    for name in (PARAMS, ADAM, META):
        raw = a.get(_key(ckpt_id, name))
        if raw is None:
            raise CheckpointError(f"no checkpoint {ckpt_id!r} in {a.where}")
        b.put(_key(ckpt_id, name), raw)
    b.create(_key(ckpt_id, ALLOCATED), b"")


def digests(where: Where, ckpt_id: str) -> dict[str, str]:
    """sha256 of the checkpoint's tensor files, as `ship` records them in meta.json."""
    reg = registry(where)
    out = {}
    for name in (PARAMS, ADAM):
        raw = reg.get(_key(ckpt_id, name))
        if raw is None:
            raise CheckpointError(f"checkpoint {ckpt_id!r} lacks {name} in {reg.where}")
        out[name] = hashlib.sha256(raw).hexdigest()
    return out


def ship(src: Where, ckpt_id: str, dst: Where = SHIPPED, **fields: Any) -> dict[str, Any]:
    """Copy a checkpoint into the shipped registry, its files' sha256 and `fields` (its evaluation,
    the command that made it) recorded in meta.json."""
    copy(src, dst, ckpt_id)
    return update_meta(dst, ckpt_id, sha256=digests(dst, ckpt_id), **fields)


def verify(where: Where, ckpt_id: str, lm: LM) -> dict[str, Any]:
    """The checkpoint's meta when it can be loaded on `lm`: its files match the sha256 its meta.json
    records (when it records them), it was trained on this model and LoRA layout, and its
    parameters are exactly the ones of its space, shape for shape. CheckpointError says what is wrong."""
    try:
        meta = read_meta(where, ckpt_id)
    except ValueError as e:  # CheckpointError, or a meta.json that is not JSON
        raise CheckpointError(f"checkpoint {ckpt_id}: meta.json cannot be read ({e})") from e
    for name, digest in digests(where, ckpt_id).items():
        if (meta.get("sha256") or {}).get(name, digest) != digest:
            raise CheckpointError(f"checkpoint {ckpt_id}: {name} is damaged (its sha256 {digest[:12]} is not the "
                                  f"{meta['sha256'][name][:12]} that meta.json records)")
    check_compatible(meta, lm)
    try:
        params, _, _ = load(where, ckpt_id)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors refuses a truncated or garbled file
        raise CheckpointError(f"checkpoint {ckpt_id}: its tensors cannot be read ({e})") from e
    own = lm.params("lora" if meta.get("space") == "lora" else "full")
    wrong = sorted(set(own) ^ set(params)) or sorted(k for k in own if own[k].shape != params[k].shape)
    if wrong:
        raise CheckpointError(f"checkpoint {ckpt_id}: its parameters do not fit the model ({len(wrong)} differ, "
                              f"e.g. {wrong[0]})")
    return meta


def lora_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """The layers a LoRA sits on, as absolute indices (None: every layer)."""
    return sorted({i % n_layers for i in layers}) if layers is not None else list(range(n_layers))


def check_compatible(meta: Mapping[str, Any], lm: LM) -> None:
    """A checkpoint only makes sense on the base model (and LoRA layout) it was trained on."""
    base = meta.get("base_model", {})
    if base.get("sha256") != lm.sha256:
        raise CheckpointError(
            f"checkpoint {meta.get('id')} was trained on {base.get('name')} ({str(base.get('sha256'))[:12]}); "
            f"the loaded model is {lm.name} ({lm.sha256[:12]})"
        )
    if meta.get("space") == "lora":
        lora = meta.get("lora", {})
        theirs = lora_layers(lora.get("layers"), lm.n_layers)  # checkpoints from before the field: every layer
        mine = lora_layers(lm.lora.layers, lm.n_layers)
        if lora and (lora.get("r") != lm.lora.r or list(lora.get("targets", [])) != list(lm.lora.targets) or theirs != mine):
            raise CheckpointError(f"checkpoint {meta.get('id')} has LoRA r={lora.get('r')} on {lora.get('targets')} "
                                  f"in layers {theirs}; the model has r={lm.lora.r} on {list(lm.lora.targets)} "
                                  f"in layers {mine}")


def _data_dir(data_dir: Path | None) -> Path:
    from model.settings import get_settings  # a command-line edge: the environment's data dir unless given

    return data_dir or get_settings().data_dir


def main(data_dir: Path | None = None) -> None:
    """List the registry: python -m model.checkpoints list [--data-dir DIR]."""
    for m in list_checkpoints(_data_dir(data_dir)):
        ev = ", ".join(f"{s}: {json.dumps(r)}" for s, r in (m.get("evaluation") or {}).items())
        print(f"{m['id']}\t{m['status']}\tstep {m['step']}/{m.get('total_steps')}\t{m['base_model']['name']}\t{ev}")


def ship_command(ckpt_id: str, evaluation: Path | None = None, command: str | None = None, data_dir: Path | None = None,
                 to: Path = SHIPPED) -> None:
    """Ship a checkpoint with the service: python -m model.checkpoints ship ID --evaluation FILE.json
    --command "how it was made". It lands in model/shipped/ with its files' sha256, the evaluation
    (a JSON object) and the command in meta.json; commit it, and every fresh install starts from it."""
    if evaluation is None or not command:
        raise SystemExit("ship needs --evaluation FILE.json and --command: a shipped checkpoint says how good it is and how it was made")
    meta = ship(_data_dir(data_dir), ckpt_id, to, evaluation=json.loads(evaluation.read_text()), command=command)
    print(f"{meta['id']} shipped to {registry(to).where}")


if __name__ == "__main__":
    import typer

    cli = typer.Typer(add_completion=False)
    cli.command("list")(main)
    cli.command("ship")(ship_command)
    cli()
