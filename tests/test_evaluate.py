"""Held-out evaluation on the tiny model: protocol, aggregation, reports, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model import checkpoints
from model.bank.sampling import kshot
from model.evaluate import checkpoint_variant, evaluate, fitting, score
from model.meta_train import MetaTrainConfig, meta_train, synthetic_source
from model.metrics import paired, summarise
from model.prompts import Formatter
from model.report import record, write_report
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
    from model.evaluate_cli import main

    main(setting="synthetic", checkpoint=[ckpt], model="tiny", k=4, seeds="1", n_test=4, max_tasks=1, adapt_steps=1,
         context_tokens=128, out=out, device="cpu", data_dir=tmp_path)
    assert (out / "results.png").is_file() and f"{ckpt}/adapted" in json.loads((out / "results.json").read_text())["results"]
    assert checkpoints.read_meta(tmp_path, ckpt)["evaluation"]["synthetic"]["k"] == 4


def _report(per_seed_a: dict[str, list[float]], per_seed_b: dict[str, list[float]]) -> dict:
    return {"results": {"a/icl": summarise(per_seed_a), "b/icl": summarise(per_seed_b)}}


def test_paired_difference_interval_and_verdict():
    tasks = [f"t{i}" for i in range(6)]
    base = {t: [10.0 * i, 10.0 * i + 4] for i, t in enumerate(tasks)}
    better = {t: [x + 5 for x in v] for t, v in base.items()}
    c = paired(_report(better, base), "a/icl", "b/icl")
    assert c["diff"] == pytest.approx(5.0) and c["ci95"] == pytest.approx([5.0, 5.0]) and c["separated"]
    assert c["tasks"] == 6
    # a gain on half the tasks and an equal loss on the others: the interval spans 0
    mixed = {t: [x + (8 if i % 2 else -8) for x in base[t]] for i, t in enumerate(tasks)}
    c = paired(_report(mixed, base), "a/icl", "b/icl")
    assert c["diff"] == pytest.approx(0.0) and c["ci95"][0] < 0 < c["ci95"][1] and not c["separated"]
    # too few tasks to resample: no verdict, however consistent the difference
    few = {t: base[t] for t in tasks[:3]}
    assert not paired(_report({t: [x + 5 for x in v] for t, v in few.items()}, few), "a/icl", "b/icl")["separated"]


def test_journal_resumes_an_interrupted_evaluation(lm, tmp_path, monkeypatch):
    import model.evaluate as ev

    source = synthetic_source()
    kw = dict(k=4, seeds=[1, 2], n_test=6, adapt_steps=1, max_tasks=2, fmt=Formatter(lm.encode, budget=128))
    journal = tmp_path / "journal.jsonl"
    full = evaluate(lm, source, [], journal=journal, **kw)["results"]
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 * 3  # the protocol, then tasks x seeds x rows
    # a run killed mid-write: the last scores are missing, the last line is cut short
    journal.write_text("\n".join(lines[:8]) + "\n" + lines[8][:10])
    calls = []
    real = ev.score
    monkeypatch.setattr(ev, "score", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = evaluate(lm, source, [], journal=journal, **kw)["results"]
    assert len(calls) == 12 - 7  # only what the journal lacked (7 complete scores survived) was scored again
    assert again == full
    assert all(json.loads(x) for x in journal.read_text().splitlines())  # the cut line is gone
    calls.clear()
    assert evaluate(lm, source, [], journal=journal, **kw)["results"] == full and not calls
    with pytest.raises(ValueError, match="another evaluation"):  # another protocol never mixes in
        evaluate(lm, source, [], journal=journal, **{**kw, "seeds": [1, 3]})


def test_gold_probability_rises_with_the_gold_options_score(lm, monkeypatch):
    source = synthetic_source()
    task = source.held_out[0]
    ktask, queries = fitting(Formatter(lm.encode, budget=128), *kshot(task, 4, 1, n_test=6))
    fmt = Formatter(lm.encode, budget=128)
    f1, prob = score(lm, ktask, queries, None, fmt, True)
    assert 0 <= f1 <= 100 and 0 < prob < 100
    # push every query's gold option to the top: its probability must approach 100
    import model.evaluate as ev
    from model.scoring import Prediction

    def oracle(lm_, task_, queries_, **kw):
        return [Prediction(q.output, {o: (0.0 if o == q.output else -30.0) for o in task_.options_for(q)}) for q in queries_]

    monkeypatch.setattr(ev, "predict", oracle)
    f1, prob = score(lm, ktask, queries, None, fmt, True)
    assert f1 == 100.0 and prob > 99.9
