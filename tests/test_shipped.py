"""The checkpoint that ships with the service: a fresh install verifies it, installs it and starts new
tasks from it; a damaged or mismatched one is refused, and tasks start from the base model, saying so."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import ADMIN_KEY, auth, own_service, sentiment, wait_for, wait_status
from model import checkpoints
from model.meta_train import MetaTrainConfig, meta_train, synthetic_source
from tests.helpers import tiny_lm

DB = 14
ADMIN = auth(ADMIN_KEY)
pytestmark = pytest.mark.usefixtures("redis_servers")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A registry folder holding one shipped tiny-model checkpoint (a short MetaICL run), as
    `model.checkpoints.ship` writes it."""
    data, dst = tmp_path_factory.mktemp("train"), tmp_path_factory.mktemp("shipped")
    cfg = MetaTrainConfig(setting="synthetic", method="metaicl", steps=3, outer_lr=0.05, tasks_per_step=2,
                          support_size=4, query_size=2, context_tokens=128, data_dir=data)
    ckpt = meta_train(cfg, lm=tiny_lm(), source=synthetic_source())
    checkpoints.ship(data, ckpt, dst, evaluation={"report-k16": {"default": 1.0}}, command="pytest fixture")
    return dst, ckpt


def ready(client) -> dict:
    return wait_for(lambda: (r := client.get("/readyz")).status_code == 200 and r.json(), 60, "the service ready")


def scores(client, task_id: str) -> list[float]:
    r = client.post("/predict", json={"task_id": task_id, "inputs": ["a joy", "dull"]}, headers=auth())
    assert r.status_code == 200, r.text
    return [s["score"] for p in r.json()["predictions"] for s in p["scores"]]


def test_a_fresh_install_starts_new_tasks_from_the_shipped_checkpoint(shipped):
    src, ckpt = shipped
    # machines=True: the worker and the API each on a data dir of their own, both empty
    with own_service(db=DB, machines=True, shipped_dir=str(src)) as service:
        c = service.client
        info = ready(c)["checkpoint"]
        assert info["active"] == ckpt and info["shipped"] == {"id": ckpt, "installed": True, "refused": None}
        listing = c.get("/admin/checkpoints", headers=ADMIN).json()
        item = next(m for m in listing["items"] if m["id"] == ckpt)
        assert item["active"] and item["evaluation"] == {"report-k16": {"default": 1.0}}

        task = c.post("/tasks", json={**sentiment(tag="shipped"), "adaptation": {"mode": "none"}}, headers=auth()).json()
        assert task["checkpoint"] == ckpt
        base = c.post("/tasks", json={**sentiment(tag="shipped"), "checkpoint": "base", "adaptation": {"mode": "none"}},
                      headers=auth()).json()
        wait_status(c, task["id"])
        wait_status(c, base["id"])
        # the same demonstrations, in context only: the shipped weights alone make the difference
        assert scores(c, task["id"]) != pytest.approx(scores(c, base["id"]), abs=1e-6)

        # an admin's choice stands: a worker that starts again does not re-activate it
        assert c.post("/admin/checkpoints/base/activate", headers=ADMIN).status_code == 200
        service.workers[0].stop()
        service.workers[0].start()
        assert ready(c)["checkpoint"]["active"] == "base"


def damage(meta: dict, folder) -> None:
    params = folder / checkpoints.PARAMS
    raw = bytearray(params.read_bytes())
    raw[-8:] = bytes(b ^ 0xFF for b in raw[-8:])  # flip the last tensor bytes: parses, but is not what shipped
    params.write_bytes(bytes(raw))


def truncate(meta: dict, folder) -> None:
    params = folder / checkpoints.PARAMS
    params.write_bytes(params.read_bytes()[:100])
    del meta["sha256"]  # no digest to compare: the file itself must be refused


def other_layout(meta: dict, folder) -> None:
    meta["lora"]["r"] = meta["lora"]["r"] * 2


@pytest.mark.parametrize("fault, why", [(damage, "is damaged"), (truncate, "cannot be read"),
                                        (other_layout, "has LoRA r=16")])
def test_a_faulty_shipped_checkpoint_is_refused_and_tasks_start_from_the_base_model(shipped, tmp_path, fault, why):
    src, ckpt = shipped
    bad = tmp_path / "shipped"
    shutil.copytree(src, bad)
    folder = bad / "checkpoints" / ckpt
    meta = json.loads((folder / checkpoints.META).read_text())
    fault(meta, folder)
    (folder / checkpoints.META).write_text(json.dumps(meta))
    with own_service(db=DB, machines=True, shipped_dir=str(bad)) as service:
        c = service.client
        info = ready(c)["checkpoint"]  # still ready: it serves from the base model
        assert info["active"] == "base"
        assert info["shipped"]["id"] == ckpt and not info["shipped"]["installed"] and why in info["shipped"]["refused"]
        assert ckpt not in [m["id"] for m in c.get("/admin/checkpoints", headers=ADMIN).json()["items"]]
        assert f"shipped checkpoint refused, new tasks start from the base model: checkpoint {ckpt}" in \
            service.workers[0].log.read_text()
        task = c.post("/tasks", json={**sentiment(tag="refused"), "adaptation": {"mode": "none"}}, headers=auth()).json()
        assert task["checkpoint"] == "base"
        wait_status(c, task["id"])
