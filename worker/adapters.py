"""A task's weights out and in: exported as a PEFT adapter or a Hugging Face model folder (zipped),
and a PEFT adapter zip checked against this base and stored for a task being imported."""

from __future__ import annotations

import json
from typing import Any

import torch

from contract.blobs import shared
from contract.store import BASE, imported_key
from model import weights
from model.calibration import option_prior
from model.retrieval import task_embeddings
from worker.entry import Entry, _meta, _with_embeddings
from worker.runtime import Refused, Runtime, recipe_of


def _info(rt: Runtime, rec: dict[str, Any], entry: Entry, kind: str) -> dict[str, Any]:
    task = rec["task"]
    return {"format": kind, "base_model": rt.base, "task_id": rec["id"], "checkpoint": rec["checkpoint"],
            "mode": rec["mode"], "prompt_format": rt.s.prompt_format, "recipe": recipe_of(rec).to_dict(),
            "instruction": task.get("instruction"), "options": task.get("options"), "prior": entry.prior}


def export(rt: Runtime, rec: dict[str, Any], kind: str = "auto") -> tuple[str, bytes]:
    """What the task predicts with, zipped: `lora`, a PEFT adapter folder on the base model, or
    `full`, a Hugging Face model folder (its full-mode weights, or a full-space checkpoint's, any
    LoRA merged in). `auto`: the LoRA where one holds all of it. Refused (with why) where the
    task has no weights of its own, or a LoRA cannot hold what it predicts with."""
    if rec["mode"] == "none" and rec["checkpoint"] == BASE:
        raise Refused(f"this task runs in context on the base model {rt.base['id']!r}: it has no weights of its "
                      "own to export (its instruction and demonstrations are the whole task)")
    entry = rt.ensure_weights(rec)
    lora_names = set(rt.lm.lora_names)
    changes_base = any(k not in lora_names for k in entry.params)
    if kind == "lora" and changes_base:
        why = "it was adapted in full mode" if rec["mode"] == "full" else \
            f"it starts from checkpoint {rec['checkpoint']}, meta-trained in the full space"
        raise Refused(f"a LoRA cannot hold what this task predicts with: {why}, which changes the base model's own "
                      "weights; ask for format=full (a Hugging Face model folder)")
    kind = ("full" if changes_base else "lora") if kind == "auto" else kind
    info = _info(rt, rec, entry, kind)
    if kind == "full":
        return kind, weights.zip_files(weights.full_files(rt.lm, weights.merged(rt.lm, entry.params), info))
    lora = {n: entry.params[n] if n in entry.params else torch.zeros_like(p) for n, p in rt.lm.params("lora").items()}
    return kind, weights.peft_zip(rt.lm, lora, rt.base["id"], info)


def import_adapter(rt: Runtime, rec: dict[str, Any], data: bytes, max_bytes: int) -> dict[str, Any]:
    """Check a PEFT adapter zip against this base and store it beside the records for the task
    (a record not created yet): the record fields that point at it. AdapterError says what does
    not fit."""
    rt.check_configuration(rec)
    files = weights.read_zip(data, max_bytes)
    try:
        cfg = json.loads(files[weights.CONFIG])
        info = json.loads(files.get(weights.INFO, b"{}"))
        if not isinstance(cfg, dict) or not isinstance(info, dict):
            raise ValueError("not a JSON object")
        tensors = weights.from_bytes(files[weights.WEIGHTS])
    except Exception as e:  # noqa: BLE001 (JSON, UTF-8 and safetensors each raise their own)
        raise weights.AdapterError(f"the adapter's files are unreadable: {type(e).__name__}: {e}") from None
    weights.check_base(cfg, info, rt.base)
    lora = {k: v.to(rt.lm.device) for k, v in weights.fit_lora(rt.lm, cfg, tensors).items()}
    recipe, task = recipe_of(rec), rt.task(rec)
    ck = rt.checkpoint(rec["checkpoint"])
    emb = task_embeddings(rt.lm, rt.fmt, task, recipe)
    prior = option_prior(rt.lm, task, {**ck, **lora}, recipe, rt.fmt, emb) if recipe.calibrate else None
    key, blob = imported_key(rec["hash"]), weights.to_bytes(_with_embeddings(lora, emb), _meta(prior))
    shared(rt.s).put(key, blob)
    return {"weights_key": key, "weights_bytes": len(blob)}

