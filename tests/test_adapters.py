"""Adapters out and in, through a real worker (tiny model): an export loads where users load it
(PEFT on the base's Hugging Face folder, or transformers alone for a full model) and scores as the
service does; an adapter made elsewhere is checked against the base, served at once and exactly."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from conftest import auth, sentiment, wait_status
from model.head import Head, combine
from model.prompts import Formatter
from model.task import Example, Task
from model.tiny import tiny_config, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("worker")
INPUTS = ["what a joy", "so dull and boring", "brilliant acting"]
OPTIONS = ["positive", "negative"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """The base model as a Hugging Face folder, as a user has it."""
    folder = tmp_path_factory.mktemp("base")
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def create(client, body: dict, key: str = "test-key-tenant-a") -> dict:
    r = client.post("/tasks", json=body, headers=auth(key))
    assert r.status_code in (200, 202), r.text
    return r.json()


def service_scores(client, task_id: str, inputs=INPUTS) -> list[dict[str, float]]:
    r = client.post("/predict", json={"task_id": task_id, "inputs": inputs}, headers=auth())
    assert r.status_code == 200, r.text
    return [{s["option"]: s["score"] for s in p["scores"]} for p in r.json()["predictions"]]


def export(client, task_id: str, folder: Path, fmt: str = "auto") -> dict:
    r = client.get(f"/tasks/{task_id}/adapter", params={"format": fmt}, headers=auth())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip" and int(r.headers["content-length"]) == len(r.content)
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(folder)
    info = json.loads((folder / "mamlserve.json").read_text())
    assert info["format"] == r.headers["x-mamlserve-export"]
    return info


@torch.no_grad()
def scores_of(model, tokenizer, info: dict, demos: list[dict], inputs=INPUTS) -> list[dict[str, float]]:
    """What the service's scores are, computed with plain transformers: each option's mean (or summed)
    log-likelihood after the prompt the export's recipe describes, minus the exported prior, joined
    with the bag-of-words head the recipe names (fit on the demonstrations: no weights to export)."""
    fmt = Formatter(lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], info["prompt_format"])
    recipe, prior = info["recipe"], info["prior"] or {}

    shown = demos if recipe["predict_demos"] is None else demos[: recipe["predict_demos"]]
    out = []
    for x in inputs:
        rows = fmt.candidates(x, info["options"])
        prefix, _ = fmt.prefix(info["instruction"], [Example(**d) for d in shown], max(len(r.ctx) + len(r.target) for r in rows))
        got = {}
        for o, r in zip(info["options"], rows):
            ids = prefix + r.ctx + r.target
            logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            start = len(prefix) + len(r.ctx)
            lp = sum(float(logp[start - 1 + j, t]) for j, t in enumerate(r.target))
            got[o] = (lp / len(r.target) if recipe["length_norm"] else lp) - prior.get(o, 0.0)
        out.append(got)
    if recipe.get("head"):
        out = [combine(got, lp, recipe["head"]) for got, lp in zip(out, head_log_probs(demos, info["options"], inputs))]
    return out


def head_log_probs(demos: list[dict], options: list[str], inputs=INPUTS) -> list[dict[str, float]]:
    """The bag-of-words head the service fits on the demonstrations (it exports no weights), on `inputs`."""
    return Head.fit(Task(demonstrations=demos, options=options)).log_probs(inputs, options)


def close(a: list[dict[str, float]], b: list[dict[str, float]]) -> bool:
    return all(x.keys() == y.keys() and all(abs(x[k] - y[k]) <= 1e-4 for k in x) for x, y in zip(a, b))


def save_checkpoint(space: str) -> str:
    """A meta-trained checkpoint in the service's registry, made directly: a LoRA with B off zero, or
    full weights moved off the base."""
    from conftest import settings
    from helpers import tiny_lm
    from model import checkpoints
    from model.optim import AdamState
    from contract.blobs import shared

    lm = tiny_lm()
    registry = shared(settings())
    g = torch.Generator().manual_seed(7)
    if space == "lora":
        params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in lm.lora_init(3).items()}
    else:
        params = {k: v + 0.02 * torch.randn(v.shape, generator=g) if "q_proj" in k else v for k, v in lm.params("full").items()}
    ckpt = checkpoints.new_id(registry, "test", space, "adapters")
    checkpoints.save(registry, ckpt, params, AdamState(), {"space": space, "method": "test", "setting": "adapters",
                     "base_model": {"name": lm.name, "sha256": lm.sha256}, "lora": {"r": lm.lora.r, "targets": list(lm.lora.targets)}})
    return ckpt


def test_a_lora_export_loads_with_peft_on_the_base_folder_and_scores_as_the_service(client, base_folder, tmp_path):
    body = {**sentiment(tag="export-lora"), "adaptation": {"steps": 3}}
    task = create(client, body)
    wait_status(client, task["id"])
    info = export(client, task["id"], tmp_path)
    assert info["format"] == "lora" and info["base_model"]["id"] == "tiny"
    from helpers import tiny_lm
    assert info["base_model"]["sha256"] == tiny_lm().sha256  # the base's hash travels with the adapter
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), tmp_path).eval()
    theirs = scores_of(model, AutoTokenizer.from_pretrained(base_folder), info, body["demonstrations"])
    ours = service_scores(client, task["id"])
    assert close(theirs, ours), (theirs, ours)
    assert info["prior"] and any(abs(v) > 1e-6 for v in info["prior"].values())  # calibrated: the prior matters


def test_a_task_on_a_lora_checkpoint_exports_its_adapted_lora(client, base_folder, tmp_path):
    ckpt = save_checkpoint("lora")
    body = {**sentiment(tag="export-ckpt-lora"), "checkpoint": ckpt, "adaptation": {"steps": 2}}
    task = create(client, body)
    wait_status(client, task["id"])
    info = export(client, task["id"], tmp_path)
    assert info["format"] == "lora" and info["checkpoint"] == ckpt
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), tmp_path).eval()
    assert close(scores_of(model, AutoTokenizer.from_pretrained(base_folder), info, body["demonstrations"]),
                 service_scores(client, task["id"]))


@pytest.mark.parametrize("how", ["full-mode", "lora-on-a-full-checkpoint"])
def test_weights_a_lora_cannot_hold_export_as_a_model_folder_that_scores_as_the_service(client, tmp_path, how):
    if how == "full-mode":
        body = {**sentiment(tag="export-full"), "adaptation": {"mode": "full", "steps": 2, "lr": 1e-3}}
    else:
        body = {**sentiment(tag="export-ckpt-full"), "checkpoint": save_checkpoint("full"), "adaptation": {"steps": 2}}
    task = create(client, body)
    wait_status(client, task["id"])
    r = client.get(f"/tasks/{task['id']}/adapter", params={"format": "lora"}, headers=auth())
    assert r.status_code == 409 and "a LoRA cannot hold" in r.json()["detail"] and "format=full" in r.json()["detail"]
    info = export(client, task["id"], tmp_path)
    assert info["format"] == "full" and (tmp_path / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # on its own: no base model needed
    theirs = scores_of(model, AutoTokenizer.from_pretrained(tmp_path), info, body["demonstrations"])
    assert close(theirs, service_scores(client, task["id"]))
    base = scores_of(tiny_model(), tiny_tokenizer(), info, body["demonstrations"])
    assert not close(base, theirs)  # the export does carry the task's own weights


def test_an_in_context_task_on_the_base_has_nothing_to_export(client):
    task = create(client, {**sentiment(tag="export-none"), "adaptation": {"mode": "none"}})
    r = client.get(f"/tasks/{task['id']}/adapter", headers=auth())
    assert r.status_code == 409 and "no weights of its own" in r.json()["detail"]


def zipped(folder: Path) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in folder.iterdir():
            z.write(f, f"adapter/{f.name}")  # in a folder, as zipping a folder makes it
    return base64.b64encode(buf.getvalue()).decode()


def test_an_exported_adapter_imported_again_is_ready_at_once_and_answers_alike(client, tmp_path, records):
    body = {**sentiment(tag="reimport"), "adaptation": {"steps": 3}}
    first = create(client, body)
    wait_status(client, first["id"])
    export(client, first["id"], tmp_path)
    again = {**sentiment(tag="reimport"), "adapter": zipped(tmp_path)}
    r = client.post("/tasks", json=again, headers=auth())
    assert r.status_code == 202, r.text
    task = r.json()
    assert task["status"] == "ready" and task["imported"] and task["usage"]["adapt_seconds"] == 0
    assert close(service_scores(client, task["id"]), service_scores(client, first["id"]))
    assert client.post("/tasks", json=again, headers=auth()).status_code == 200  # the same import: the same task
    # it holds weights against the quota until deleted
    held = lambda: int(records.hget("ms:usage:tenant-a", "weights_bytes") or 0)  # noqa: E731
    before = held()
    assert client.delete(f"/tasks/{task['id']}", headers=auth()).status_code == 204
    assert held() < before


def peft_adapter(folder: Path, config: LoraConfig, model=None, base_name: str | None = None) -> Path:
    """An adapter made with PEFT itself, its B moved off zero so that it changes the model."""
    peft_model = get_peft_model(model or tiny_model(), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(folder)
    if base_name is not None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base_name}))
    return folder


def test_a_peft_adapter_of_lower_rank_on_fewer_layers_is_served_exactly(client, base_folder, tmp_path):
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj"], layers_to_transform=[1], lora_dropout=0.0)
    peft_adapter(tmp_path, config, base_name=str(base_folder))
    body = {**sentiment(tag="foreign"), "adapter": zipped(tmp_path)}
    task = create(client, body)
    assert task["status"] == "ready"
    ours = service_scores(client, task["id"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), tmp_path).eval()
    # the language model's scores alone; the service's add its head's log-probabilities below
    info = {"prompt_format": "direct", "recipe": {**task["recipe"], "head": 0}, "options": OPTIONS, "instruction": None,
            "prior": None}
    theirs = scores_of(model, AutoTokenizer.from_pretrained(base_folder), info, body["demonstrations"])
    fresh = create(client, {**sentiment(tag="foreign"), "adaptation": {"mode": "none"}})  # the same task with no adapter
    plain = service_scores(client, fresh["id"])
    assert not close(plain, ours)  # the adapter changes the answers
    # The service subtracts the prior it calibrated with this adapter on the demonstrations and adds
    # the head (model.head.combine): with the adapter's weights served exactly, the margin between
    # the options, less the head's, differs from the plain model's by the prior's, the same for every input.
    head = head_log_probs(body["demonstrations"], OPTIONS)
    w = task["recipe"]["head"]
    margin = lambda d: d["positive"] - d["negative"]  # noqa: E731
    shifts = [margin(o) - w * margin(h) - margin(t) for o, h, t in zip(ours, head, theirs)]
    assert max(shifts) - min(shifts) <= 1e-4, shifts


def other_base_adapter(folder: Path) -> Path:
    cfg = tiny_config()
    cfg.hidden_size, cfg.intermediate_size = 32, 64
    return peft_adapter(folder, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), model=LlamaForCausalLM(cfg))


@pytest.mark.parametrize("case,field_msg", [
    ("another base's shapes", "for another base"),
    ("another base named", "was made for base 'HuggingFaceTB/SmolLM2-360M'"),
    ("another base's hash", "sha256"),
    ("a higher rank", "rank is 16"),
    ("DoRA", "use_dora"),
    ("not a zip", "not a readable zip"),
    ("no adapter_config.json", "lacks adapter_config.json"),
    ("not base64", "not base64"),
    ("adaptation too", "leave adaptation out"),
])
def test_an_adapter_that_cannot_be_served_here_is_a_422_saying_why(client, tmp_path, case, field_msg):
    folder = tmp_path / "a"
    data = None
    if case == "another base's shapes":
        other_base_adapter(folder)
    elif case == "another base named":
        peft_adapter(folder, LoraConfig(r=8, target_modules=["q_proj"]), base_name="HuggingFaceTB/SmolLM2-360M")
    elif case == "another base's hash":
        peft_adapter(folder, LoraConfig(r=8, target_modules=["q_proj"]))
        (folder / "mamlserve.json").write_text(json.dumps({"base_model": {"id": "tiny", "sha256": "0" * 64}}))
    elif case == "a higher rank":
        peft_adapter(folder, LoraConfig(r=16, target_modules=["q_proj"]))
    elif case == "DoRA":
        peft_adapter(folder, LoraConfig(r=8, target_modules=["q_proj"], use_dora=True))
    elif case == "not a zip":
        data = base64.b64encode(b"PK\x03\x04 this is no zip").decode()
    elif case == "no adapter_config.json":
        peft_adapter(folder, LoraConfig(r=8, target_modules=["q_proj"]))
        (folder / "adapter_config.json").unlink()
    elif case == "not base64":
        data = "@@@ not base64 @@@"
    else:
        peft_adapter(folder, LoraConfig(r=8, target_modules=["q_proj"]))
    body = {**sentiment(tag=f"bad-{case}"), "adapter": data or zipped(folder)}
    if case == "adaptation too":
        body["adaptation"] = {"steps": 2}
    r = client.post("/tasks", json=body, headers=auth())
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"][:2] == ["body", "adaptation" if case == "adaptation too" else "adapter"]
    assert field_msg in err["msg"], err["msg"]
