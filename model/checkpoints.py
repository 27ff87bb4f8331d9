"""The meta-training checkpoint registry: one versioned folder per run under data_dir/checkpoints.

    data_dir/checkpoints/<id>/
        params.safetensors   the meta-learned parameters, as overrides of the base model
                             (LoRA space: every lora_A/lora_B; full space: every base weight)
        adam.safetensors     the outer Adam moments, keys "m/<name>" and "v/<name>"
        meta.json            method, setting, space, config, base model name and sha256, step,
                             Adam t/betas/eps, status, log history, evaluation results

Ids are "v<NNNN>-<method>-<space>-<setting>"; the version number is allocated by an exclusive
mkdir, so two runs never share a folder. Files are written to a temporary name and renamed:
a reader never sees half a checkpoint, and a run that saves periodically overwrites its own
folder in place (the id names the run; meta.json's `step` says how far it got). A resumed run
gets a new id whose meta names its `parent`. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model import weights
from model.adapt import AdamState
from model.lm import LM, Params

FORMAT = "mamlserve-checkpoint-1"
PARAMS = "params.safetensors"
ADAM = "adam.safetensors"
META = "meta.json"
_ID = re.compile(r"^v(\d{4,})-[A-Za-z0-9_.-]+$")


class CheckpointError(ValueError):
    """No such checkpoint, a damaged one, or one made for another base model."""


def root(data_dir: Path) -> Path:
    return Path(data_dir) / "checkpoints"


def folder(data_dir: Path, ckpt_id: str) -> Path:
    if not _ID.match(ckpt_id):  # ids come from HTTP requests too: never let one walk out of the registry
        raise CheckpointError(f"not a checkpoint id: {ckpt_id!r}")
    return root(data_dir) / ckpt_id


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", s).strip("_") or "x"


def new_id(data_dir: Path, method: str, space: str, setting: str) -> str:
    """Allocate the next version: the mkdir is the lock, so concurrent runs get distinct ids."""
    base = root(data_dir)
    base.mkdir(parents=True, exist_ok=True)
    while True:
        versions = [int(m.group(1)) for p in base.iterdir() if (m := _ID.match(p.name))]
        ckpt_id = f"v{max(versions, default=0) + 1:04d}-{_slug(method)}-{_slug(space)}-{_slug(setting)}"
        try:
            (base / ckpt_id).mkdir()
            return ckpt_id
        except FileExistsError:  # another run took this version first: look again
            continue


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def save(data_dir: Path, ckpt_id: str, params: Mapping[str, Tensor], state: AdamState, meta: dict[str, Any]) -> Path:
    """Write (or overwrite) a checkpoint's three files; meta.json last, so it marks a complete set."""
    out = folder(data_dir, ckpt_id)
    out.mkdir(parents=True, exist_ok=True)
    weights.save(params, out / PARAMS, {"format": FORMAT})
    moments = {f"m/{k}": v for k, v in state.m.items()} | {f"v/{k}": v for k, v in state.v.items()}
    weights.save(moments, out / ADAM, {"format": FORMAT})
    meta = {
        **meta, "id": ckpt_id, "format": FORMAT, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "adam": {"t": state.t, "betas": list(state.betas), "eps": state.eps},
    }
    _write_json(out / META, meta)
    return out


def read_meta(data_dir: Path, ckpt_id: str) -> dict[str, Any]:
    path = folder(data_dir, ckpt_id) / META
    if not path.is_file():
        raise CheckpointError(f"no checkpoint {ckpt_id!r} under {root(data_dir)}")
    return json.loads(path.read_text())


def update_meta(data_dir: Path, ckpt_id: str, **fields: Any) -> dict[str, Any]:
    """Merge fields into meta.json (the evaluation writes its results back this way)."""
    meta = read_meta(data_dir, ckpt_id)
    for k, v in fields.items():
        if isinstance(v, dict) and isinstance(meta.get(k), dict):
            meta[k] = {**meta[k], **v}
        else:
            meta[k] = v
    _write_json(folder(data_dir, ckpt_id) / META, meta)
    return meta


def load(data_dir: Path, ckpt_id: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
         ) -> tuple[Params, AdamState, dict[str, Any]]:
    """(params, Adam state, meta) of a checkpoint. Moments are fp32 whatever `dtype` the params get."""
    meta = read_meta(data_dir, ckpt_id)
    out = folder(data_dir, ckpt_id)
    params = weights.load(out / PARAMS, device, dtype)
    raw = weights.load(out / ADAM, device)
    adam = meta.get("adam", {})
    state = AdamState(
        {k[2:]: v for k, v in raw.items() if k.startswith("m/")},
        {k[2:]: v for k, v in raw.items() if k.startswith("v/")},
        int(adam.get("t", 0)), tuple(adam.get("betas", (0.9, 0.999))), float(adam.get("eps", 1e-8)),
    )
    return params, state, meta


def list_checkpoints(data_dir: Path) -> list[dict[str, Any]]:
    """Every complete checkpoint's meta, oldest version first (a folder without meta.json is skipped)."""
    base = root(data_dir)
    if not base.is_dir():
        return []
    found = []
    for p in base.iterdir():
        m = _ID.match(p.name)
        if m and (p / META).is_file():
            try:
                found.append((int(m.group(1)), json.loads((p / META).read_text())))
            except ValueError:  # a damaged meta.json: not listed rather than breaking the listing
                continue
    return [meta for _, meta in sorted(found, key=lambda x: x[0])]


def load_checkpoint(data_dir: Path, ckpt_id: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                    ) -> tuple[Params, AdamState, dict[str, Any]]:
    return load(data_dir, ckpt_id, device, dtype)


def inner_lr(meta: Mapping[str, Any], mode: str) -> float | None:
    """The lr a checkpoint was meta-trained to be adapted with, when adapting in its own space:
    a meta-learned initialisation is tuned to that step size, and the default one can undo it."""
    lr = meta.get("hyperparameters", {}).get("inner_lr")
    return float(lr) if lr and meta.get("space") == mode else None


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
        if lora and (lora.get("r") != lm.lora.r or list(lora.get("targets", [])) != list(lm.lora.targets)):
            raise CheckpointError(f"checkpoint {meta.get('id')} has LoRA r={lora.get('r')} on {lora.get('targets')}; "
                                  f"the model has r={lm.lora.r} on {list(lm.lora.targets)}")


def main(data_dir: Path | None = None) -> None:
    """List the registry: python -m model.checkpoints [--data-dir DIR]."""
    from model.settings import get_settings

    ddir = data_dir or get_settings().data_dir
    for m in list_checkpoints(ddir):
        ev = ", ".join(f"{s}: icl {r.get('icl', float('nan')):.1f} adapted {r.get('adapted', float('nan')):.1f}"
                       for s, r in (m.get("evaluation") or {}).items())
        print(f"{m['id']}\t{m['status']}\tstep {m['step']}/{m.get('total_steps')}\t{m['base_model']['name']}\t{ev}")


if __name__ == "__main__":
    import typer

    typer.run(main)
