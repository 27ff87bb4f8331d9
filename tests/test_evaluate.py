"""Held-out evaluation on the tiny model: protocol, aggregation, reports, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model import checkpoints
from model.evaluate import checkpoint_variant, evaluate, record, summarise, write_report
from model.meta_train import MetaTrainConfig, meta_train, synthetic_source
from model.prompts import Formatter
from tests.helpers import tiny_lm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def test_summary_mean_and_worst_over_seeds():
    s = summarise({"a": [10.0, 30.0], "b": [50.0, 70.0]})
    assert s["mean"] == 40.0 and s["worst"] == 30.0 and s["per_task"] == {"a": 20.0, "b": 60.0}


def test_evaluate_base_and_checkpoints_writes_reports(lm, tmp_path):
    source = synthetic_source()
    kw = dict(setting="synthetic", steps=2, tasks_per_step=2, support_size=6, query_size=3, context_tokens=128,
              data_dir=tmp_path, inner_lr=1e-2, outer_lr=1e-2)
    ids = [meta_train(MetaTrainConfig(method=m, **kw), lm=lm, source=source) for m in ("maml", "metaicl")]
    variants = [checkpoint_variant(lm, tmp_path, c, None, [t.name for t in source.held_out]) for c in ids]
    with pytest.raises(checkpoints.CheckpointError, match="meta-trained on"):  # a held-out task it has seen
        checkpoint_variant(lm, tmp_path, ids[0], None, [source.meta_train[0].name])
    assert variants[0].state is not None and variants[1].state is None  # moments only where they were shared
    report = evaluate(lm, source, variants, k=4, seeds=[1, 2], n_test=6, adapt_steps=1, max_tasks=2,
                      fmt=Formatter(lm.encode, budget=128))
    res = report["results"]
    assert set(res) == {"base/zero_shot", "base/icl", "base/adapted"} | {f"{c}/{m}" for c in ids for m in ("icl", "adapted")}
    for r in res.values():
        assert 0 <= r["worst"] <= r["mean"] <= 100
        assert all(len(v) == 2 for v in r["per_seed"].values()) and len(r["per_task"]) == 2
    paths = write_report(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["setting"] == "synthetic"
    assert "| base |" in paths["markdown"].read_text()
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record(report, tmp_path, ids)
    ev = checkpoints.read_meta(tmp_path, ids[0])["evaluation"]["synthetic"]
    assert ev["icl"] == res[f"{ids[0]}/icl"]["mean"] and ev["k"] == 4


def test_cli_meta_train_then_evaluate(tmp_path):
    """`python -m model.meta_train` in a subprocess, then the evaluation CLI on its checkpoint."""
    env = {**os.environ, "MAMLSERVE_DATA_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "model.meta_train", "--setting", "synthetic", "--model", "tiny",
                          "--method", "fomaml", "--steps", "2", "--tasks-per-step", "2", "--context-tokens", "128"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    ckpt = run.stdout.strip().splitlines()[-1]
    assert ckpt.startswith("v0001-fomaml-lora-synthetic")
    out = tmp_path / "report"
    # the evaluation CLI's function in-process (a second interpreter start would double the test's time)
    from model.evaluate import main

    main(setting="synthetic", checkpoint=[ckpt], model="tiny", k=4, seeds="1", n_test=4, max_tasks=1, adapt_steps=1,
         context_tokens=128, out=out, device="cpu", data_dir=tmp_path)
    assert (out / "results.png").is_file() and f"{ckpt}/adapted" in json.loads((out / "results.json").read_text())["results"]
    assert checkpoints.read_meta(tmp_path, ckpt)["evaluation"]["synthetic"]["k"] == 4
