"""Adapted weights in and out: safetensors bytes, LoRA in the standard PEFT folder format, and
full models in the standard Hugging Face folder format.

No pickle anywhere. PEFT files name tensors without the adapter name
(`...q_proj.lora_A.weight`); in memory peft adds it (`...q_proj.lora_A.default.weight`).
An export's folder also holds `mamlserve.json`: the base model (its Hugging Face id and the
sha256 of its weights), and what predictions add to the weights (prompt format, calibrated prior).
"""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save
from torch import Tensor

from model.lm import ADAPTER, LM, Params

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
INFO = "mamlserve.json"
FULL_WEIGHTS = "model.safetensors"
_PEFT = "base_model.model."  # peft's prefix on the base model's parameter names


class AdapterError(ValueError):
    """An adapter that cannot be served on this base: not a LoRA zip, another base, another layout."""


def to_bytes(params: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in params.items()}, metadata=metadata)


def from_bytes(data: bytes, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Params:
    """The tensors, in sorted key order (as `load`): safetensors' in-memory `load` hands them out in
    an order that changes from process to process (a Rust HashMap's), and callers that reduce over
    a dict (a gradient norm summed tensor by tensor) must not round differently run to run."""
    tensors = st_load(data)
    return {k: tensors[k].to(device, dtype) if dtype else tensors[k].to(device) for k in sorted(tensors)}


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


def _json(x: Any) -> bytes:
    return json.dumps(x, default=list, indent=2, sort_keys=True).encode()


def peft_files(lm: LM, lora: Mapping[str, Tensor], base_id: str | None = None,
               info: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The files of a PEFT adapter folder, as bytes: `base_id` (default: the LM's name) as its
    base_model_name_or_path, and `info` as mamlserve.json when given."""
    cfg = lm.lora.config(lm.n_layers)
    cfg.base_model_name_or_path = base_id or lm.name
    files = {CONFIG: _json(cfg.to_dict()), WEIGHTS: to_bytes({_peft_key(k): v for k, v in lora.items()}, {"format": "pt"})}
    return {**files, INFO: _json(info)} if info is not None else files


def export_peft(lm: LM, lora: Mapping[str, Tensor], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in peft_files(lm, lora).items():
        (folder / name).write_bytes(data)
    return folder


def hf_name(name: str) -> str:
    """A parameter's name in the base model (`model.layers.0.self_attn.q_proj.weight`) from peft's."""
    return name.removeprefix(_PEFT).replace(".base_layer.", ".")


def merged(lm: LM, params: Mapping[str, Tensor]) -> Params:
    """The base model's state dict that `params` (overrides in peft's names: full weights, LoRA or
    both) amount to, every LoRA merged into its layer's weight (W + alpha/r * B @ A), in the base
    model's own names: what `save_pretrained` would write for the model that predicts."""
    full = {**lm.params("full"), **{k: v for k, v in params.items() if ".lora_" not in k}}
    scale = lm.lora.alpha / lm.lora.r
    for a_name in (k for k in params if ".lora_A." in k):
        layer = a_name.split(".lora_A.")[0]
        w = f"{layer}.base_layer.weight"
        b = params[a_name.replace(".lora_A.", ".lora_B.")]
        full[w] = full[w] + scale * (b.float() @ params[a_name].float()).to(full[w].dtype)
    return {hf_name(k): v for k, v in full.items()}


def full_files(lm: LM, state: Mapping[str, Tensor], info: dict[str, Any]) -> dict[str, bytes]:
    """A Hugging Face model folder (config, weights, tokenizer) holding `state`, and mamlserve.json:
    `AutoModelForCausalLM.from_pretrained` loads it with no base model."""
    base = lm.model.get_base_model()
    with tempfile.TemporaryDirectory() as tmp:
        lm.tokenizer.save_pretrained(tmp)
        base.config.save_pretrained(tmp)
        files = {f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.is_file()}
    return {**files, FULL_WEIGHTS: to_bytes(state, {"format": "pt"}), INFO: _json(info)}


def zip_files(files: Mapping[str, bytes]) -> bytes:
    """A zip of a folder's files; safetensors stored as they are (deflating floats saves little and
    takes seconds per hundred MB)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data, compress_type=zipfile.ZIP_STORED if name.endswith(".safetensors") else None)
    return buf.getvalue()


def read_zip(data: bytes, max_bytes: int) -> dict[str, bytes]:
    """The files of an adapter zip (at its top level or in one folder), refusing more than
    max_bytes uncompressed (a zip bomb) and anything that is not a zip."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in z.infolist() if not i.is_dir()]
        size = sum(i.file_size for i in infos)
        if size > max_bytes:
            raise AdapterError(f"the zip holds {size} bytes uncompressed; the limit is {max_bytes}")
        files = {Path(i.filename).name: z.read(i) for i in infos if not Path(i.filename).name.startswith(".")}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"not a readable zip file ({e})") from None
    missing = [n for n in (CONFIG, WEIGHTS) if n not in files]
    if missing:
        raise AdapterError(f"a PEFT adapter zip holds {CONFIG} and {WEIGHTS}; this one lacks {', '.join(missing)}")
    return files


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def check_base(cfg: dict[str, Any], info: dict[str, Any], base: dict[str, str]) -> None:
    """The adapter was made for this base: the same weights' sha256 when it says (a mamlserve export),
    else the same model named in base_model_name_or_path when that is a hub id (a local folder's
    path says nothing here: its tensors' shapes are checked by `fit_lora`)."""
    theirs = info.get("base_model") or {}
    if theirs.get("sha256"):
        if theirs["sha256"] != base["sha256"]:
            raise AdapterError(f"the adapter was made for base {theirs.get('id')!r} with weights sha256 "
                               f"{theirs['sha256'][:16]}...; this service runs {base['id']!r} ({base['sha256'][:16]}...)")
        return
    named = cfg.get("base_model_name_or_path")
    local = not named or named.startswith(("/", ".", "~")) or named.count("/") > 1 or "\\" in named
    if not local and _short(named) not in {_short(base["id"]), _short(base.get("name", base["id"]))}:
        raise AdapterError(f"the adapter was made for base {named!r}; this service runs {base['id']!r}")


def fit_lora(lm: LM, cfg: dict[str, Any], tensors: Mapping[str, Tensor]) -> Params:
    """A PEFT LoRA as this LM's LoRA, exactly: a lower rank is padded with zeros and its scale
    (alpha/r, or alpha/sqrt(r) with rsLoRA) folded into B; layers and modules it leaves out get a
    zero LoRA. Refuses (AdapterError, naming the field) what cannot be expressed so."""
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be served")
    for field, ok in (("use_dora", not cfg.get("use_dora")), ("bias", cfg.get("bias", "none") == "none"),
                      ("modules_to_save", not cfg.get("modules_to_save")), ("alpha_pattern", not cfg.get("alpha_pattern")),
                      ("fan_in_fan_out", not cfg.get("fan_in_fan_out")), ("lora_bias", not cfg.get("lora_bias")),
                      ("trainable_token_indices", not cfg.get("trainable_token_indices"))):
        if not ok:
            raise AdapterError(f"{field} is {cfg.get(field)!r}: this service serves plain LoRA (no DoRA, biases, "
                               "extra modules or per-module alphas)")
    ours = lm.params("lora")
    theirs = {_our_key(k): v for k, v in tensors.items()}
    unknown = sorted(set(theirs) - set(ours))
    if unknown:
        targets = sorted({m.group(1) for k in unknown if (m := re.search(r"\.([^.]+)\.lora_[AB]\.", k))})
        raise AdapterError(f"the adapter has LoRA weights this service's LoRA layout lacks (e.g. {_peft_key(unknown[0])!r}; "
                           f"modules {targets}); this service's LoRA sits on {list(lm.lora.targets)}"
                           + ("" if lm.lora.layers is None else f", layers {list(lm.lora.layers)}"))
    out: Params = {}
    for a_name in (k for k in ours if ".lora_A." in k):
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        a0, b0 = ours[a_name], ours[b_name]
        if a_name not in theirs and b_name not in theirs:
            out[a_name], out[b_name] = torch.zeros_like(a0), torch.zeros_like(b0)
            continue
        if a_name not in theirs or b_name not in theirs:
            raise AdapterError(f"{_peft_key(a_name)} and {_peft_key(b_name)} come in pairs; the adapter has one")
        a, b = theirs[a_name], theirs[b_name]
        r = a.shape[0]
        if a.shape[1:] != a0.shape[1:] or b.shape[0] != b0.shape[0] or b.shape[1] != r:
            raise AdapterError(f"{_peft_key(a_name)} has shape {list(a.shape)} and its B {list(b.shape)}; this base's "
                               f"layer takes A [r, {a0.shape[1]}] and B [{b0.shape[0]}, r]: the adapter is for another base")
        if r > lm.lora.r:
            raise AdapterError(f"the adapter's rank is {r}; this service's LoRA rank (lora_r) is {lm.lora.r}")
        alpha = float(cfg.get("lora_alpha", 8))
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        a_fit, b_fit = torch.zeros_like(a0), torch.zeros_like(b0)
        a_fit[:r] = a.to(a0.dtype)
        b_fit[:, :r] = (b.float() * (scale / (lm.lora.alpha / lm.lora.r))).to(b0.dtype)
        out[a_name], out[b_name] = a_fit, b_fit
    return out


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


def peft_zip(lm: LM, lora: Mapping[str, Tensor], base_id: str | None = None, info: dict[str, Any] | None = None) -> bytes:
    """A zip of the PEFT folder: unzip it and `PeftModel.from_pretrained(base, folder)` loads it."""
    return zip_files(peft_files(lm, lora, base_id, info))
