"""Adapted weights in and out: safetensors bytes, and LoRA in the standard PEFT folder format.

No pickle anywhere. PEFT files name tensors without the adapter name
(`...q_proj.lora_A.weight`); in memory peft adds it (`...q_proj.lora_A.default.weight`).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save
from torch import Tensor

from model.lm import ADAPTER, LM, Params

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def to_bytes(params: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in params.items()}, metadata=metadata)


def from_bytes(data: bytes, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Params:
    return {k: v.to(device, dtype) if dtype else v.to(device) for k, v in st_load(data).items()}


def from_bytes_meta(data: bytes, device: torch.device | str = "cpu") -> tuple[Params, dict[str, str]]:
    """The tensors and the string metadata stored beside them."""
    # safe_open reads only files; the format is an 8-byte little-endian header length, then the
    # JSON header whose "__metadata__" holds the strings
    n = int.from_bytes(data[:8], "little")
    return from_bytes(data, device), json.loads(data[8: 8 + n]).get("__metadata__") or {}


def save(params: Mapping[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, tmp, metadata=metadata)
    tmp.replace(path)


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Params:
    return {k: v.to(device, dtype) if dtype else v.to(device) for k, v in load_file(path).items()}


def load_meta(path: Path, device: torch.device | str = "cpu") -> tuple[Params, dict[str, str]]:
    """The tensors of a safetensors file and its string metadata."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return load(path, device), meta


def _peft_key(name: str) -> str:
    return name.replace(f".{ADAPTER}.", ".")


def _our_key(name: str) -> str:
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.weight", f".{part}.{ADAPTER}.weight")
    return name


def peft_files(lm: LM, lora: Mapping[str, Tensor]) -> dict[str, bytes]:
    """The two files of a PEFT adapter folder, as bytes."""
    cfg = lm.lora.config(lm.n_layers)
    cfg.base_model_name_or_path = lm.name
    config = json.dumps(cfg.to_dict(), default=list, indent=2, sort_keys=True).encode()
    return {CONFIG: config, WEIGHTS: to_bytes({_peft_key(k): v for k, v in lora.items()}, {"format": "pt"})}


def export_peft(lm: LM, lora: Mapping[str, Tensor], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in peft_files(lm, lora).items():
        (folder / name).write_bytes(data)
    return folder


def import_peft(lm: LM, folder: Path) -> Params:
    """LoRA weights from a PEFT folder, checked against this LM's LoRA layout."""
    cfg = json.loads((folder / CONFIG).read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{folder} holds a {cfg.get('peft_type')} adapter, not LoRA")
    params = {_our_key(k): v.to(lm.device, lm.dtype) for k, v in load_file(folder / WEIGHTS).items()}
    missing = set(lm.lora_names) - set(params)
    if missing or set(params) - set(lm.lora_names):
        raise ValueError(f"adapter does not match the model's LoRA layout (r={lm.lora.r}, targets={lm.lora.targets})")
    return params


def peft_zip(lm: LM, lora: Mapping[str, Tensor]) -> bytes:
    """A zip of the PEFT folder: unzip it and `PeftModel.from_pretrained(base, folder)` loads it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in peft_files(lm, lora).items():
            z.writestr(name, data)
    return buf.getvalue()
