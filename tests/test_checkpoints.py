"""model/checkpoints.py: the registry works the same in a data dir and in the service's Redis store,
and a checkpoint copies from one to the other unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch

from conftest import RECORDS_PORT
from contract.blobs import RedisBlobs
from model import checkpoints
from model.optim import AdamState

DB = 11
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def shared(redis_servers):
    r = redis.Redis(port=RECORDS_PORT, db=DB)
    r.flushdb()
    yield RedisBlobs(r, chunk_bytes=4096)
    r.flushdb()


def save_one(where, setting: str = "s") -> tuple[str, dict]:
    params = {"w": torch.randn(64, 64)}
    ckpt = checkpoints.new_id(where, "maml", "lora", setting)
    state = AdamState({"w": torch.ones(64, 64)}, {"w": torch.full((64, 64), 2.0)}, 3)
    checkpoints.save(where, ckpt, params, state, {"method": "maml", "space": "lora", "step": 3, "status": "done"})
    return ckpt, params


@pytest.mark.parametrize("backend", ["folder", "redis"])
def test_save_list_load_and_update_a_checkpoint(backend, tmp_path, shared):
    where = tmp_path if backend == "folder" else shared
    a, params = save_one(where)
    b, _ = save_one(where)
    assert (a, b) == ("v0001-maml-lora-s", "v0002-maml-lora-s")  # distinct versions
    assert [m["id"] for m in checkpoints.list_checkpoints(where)] == [a, b]
    got, state, meta = checkpoints.load(where, a)
    assert got["w"].equal(params["w"]) and state.t == 3 and state.v["w"].eq(2).all() and meta["step"] == 3
    checkpoints.update_meta(where, a, evaluation={"s": {"icl": 1.0}})
    assert checkpoints.read_meta(where, a)["evaluation"] == {"s": {"icl": 1.0}}
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint"):
        checkpoints.read_meta(where, "v0042-none")
    with pytest.raises(checkpoints.CheckpointError, match="not a checkpoint id"):
        checkpoints.read_meta(where, "../../etc")


def test_an_allocated_id_without_meta_is_not_listed_but_is_not_reused(shared):
    run = checkpoints.new_id(shared, "maml", "lora", "s")  # a run that has saved nothing yet
    assert checkpoints.list_checkpoints(shared) == []
    assert checkpoints.new_id(shared, "maml", "lora", "s") != run


def test_a_data_dirs_checkpoint_copies_into_the_shared_registry(tmp_path, shared):
    ckpt, params = save_one(tmp_path)
    checkpoints.copy(tmp_path, shared, ckpt)
    assert checkpoints.load(shared, ckpt)[0]["w"].equal(params["w"])
    assert checkpoints.new_id(shared, "maml", "lora", "s") == "v0002-maml-lora-s"


def tiny_checkpoint(where, lm, **meta) -> str:
    """A LoRA checkpoint of the tiny model, with the meta a meta-training run writes."""
    ckpt = checkpoints.new_id(where, "metaicl", "lora", "s")
    params = lm.lora_init(seed=1)
    m = {"method": "metaicl", "space": "lora", "step": 1, "status": "done", "base_model": {"name": lm.name, "sha256": lm.sha256},
         "lora": {"r": lm.lora.r, "alpha": lm.lora.alpha, "targets": list(lm.lora.targets),
                  "layers": checkpoints.lora_layers(lm.lora.layers, lm.n_layers)}, **meta}
    checkpoints.save(where, ckpt, params, AdamState(), m)
    return ckpt


def test_shipping_records_digests_and_verify_refuses_what_does_not_fit(tmp_path):
    from tests.helpers import tiny_lm

    lm = tiny_lm()
    data, shipped = tmp_path / "data", tmp_path / "shipped"
    good = tiny_checkpoint(data, lm)
    subprocess.run([sys.executable, "-m", "model.checkpoints", "ship", good, "--evaluation", _json_file(tmp_path),
                    "--command", "python -m model.meta_train ...", "--data-dir", str(data), "--to", str(shipped)],
                   check=True, cwd=ROOT, capture_output=True)
    meta = checkpoints.verify(shipped, good, lm)
    assert meta["evaluation"] == {"report-k16": {"default": 42.0}} and meta["command"].startswith("python -m model.meta_train")
    assert meta["sha256"] == checkpoints.digests(shipped, good)
    listed = subprocess.run([sys.executable, "-m", "model.checkpoints", "list", "--data-dir", str(shipped)],
                            check=True, cwd=ROOT, capture_output=True, text=True).stdout
    assert good in listed and "42.0" in listed

    # parameters that are not the model's LoRA (another rank under the same meta): refused, named
    lora = {k: v for k, v in lm.lora_init().items()}
    wrong = checkpoints.new_id(data, "metaicl", "lora", "s")
    checkpoints.save(data, wrong, {k: v[:4] if ".lora_A." in k else v for k, v in lora.items()}, AdamState(),
                     checkpoints.read_meta(data, good))
    with pytest.raises(checkpoints.CheckpointError, match="do not fit the model"):
        checkpoints.verify(data, wrong, lm)
    # another base model: refused, naming both
    other = tiny_checkpoint(data, lm, base_model={"name": "tiny", "sha256": "0" * 64})
    with pytest.raises(checkpoints.CheckpointError, match="was trained on tiny"):
        checkpoints.verify(data, other, lm)


def _json_file(tmp_path) -> str:
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps({"report-k16": {"default": 42.0}}))
    return str(path)
