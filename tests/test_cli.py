"""The `mamlserve` command as a user runs it (a subprocess), and the client it uses, against the
API as deployed (uvicorn), a real Redis and a real worker: from a CSV to predictions and an
evaluation, the task commands, and errors that say what is wrong."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import KEY, Api
from mamlserve.client import Client, MamlserveError
from model.metrics import accuracy, macro_f1

EXE = str(Path(sys.executable).parent / "mamlserve")
GOOD = ["great fun", "loved it", "a joy", "wonderful", "so good", "brilliant", "superb", "delightful"]
BAD = ["boring", "hated it", "a mess", "terrible", "so bad", "dull", "awful", "tedious"]


@pytest.fixture(scope="module")
def api(worker):
    server = Api(name="cli-api")
    yield server.start()
    server.stop()


def cli(api: str, *args: str, key: str = KEY) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAMLSERVE_URL": api, "MAMLSERVE_API_KEY": key}
    return subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=300)


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def test_from_a_csv_to_predictions_and_an_evaluation(api, tmp_path):
    demos = write_csv(tmp_path / "reviews.csv", [(g, "pos") if i % 2 == 0 else (b, "neg")
                                                 for i, (g, b) in enumerate(zip(GOOD[:6], BAD[:6]))])
    run = cli(api, "tasks", "create", "--demos", str(demos), "--steps", "3", "--wait")
    task_id = ok(run).split()[0]
    assert "options: pos, neg (from the outputs)" in run.stderr and "ready" in run.stderr
    (tmp_path / "new.txt").write_text("\n".join(["what a joy", "so very dull", "", "brilliant fun"]) + "\n")
    run = cli(api, "predict", task_id, "--inputs", str(tmp_path / "new.txt"), "--batch", "2")
    lines = [json.loads(x) for x in ok(run).splitlines()]
    assert [p["input"] for p in lines] == ["what a joy", "so very dull", "brilliant fun"]
    assert all(p["output"] in ("pos", "neg") and {s["option"] for s in p["scores"]} == {"pos", "neg"} for p in lines)
    assert "predicting" in run.stderr and "3/3" in run.stderr  # the progress bar
    held = write_csv(tmp_path / "held.csv", [(g, "pos") for g in GOOD[6:]] + [(b, "neg") for b in BAD[6:]])
    report = json.loads(ok(cli(api, "eval", task_id, "--test", str(held), "--json")))
    with Client(api, KEY) as c:
        preds = [p["output"] for p in c.predict_all(task_id, GOOD[6:] + BAD[6:])]
    golds = ["pos"] * 2 + ["neg"] * 2
    assert report["n"] == 4 and report["macro_f1"] == pytest.approx(macro_f1(preds, golds))
    assert report["accuracy"] == pytest.approx(accuracy(preds, golds))
    assert sum(map(sum, report["confusion"])) == 4 and set(report["labels"]) >= {"pos", "neg"}
    table = ok(cli(api, "eval", task_id, "--test", str(held)))
    assert "macro-F1=" in table and "gold \\ predicted" in table


def test_the_task_commands(api, tmp_path):
    demos = tmp_path / "d.jsonl"
    demos.write_text("\n".join(json.dumps({"input": x, "output": y}) for x, y in
                               [("great fun", "positive"), ("boring", "negative"), ("a joy", "positive"), ("dull", "negative")]))
    task_id = ok(cli(api, "tasks", "create", "--demos", str(demos), "--options", "positive,negative", "--steps", "2")).split()[0]
    assert ok(cli(api, "tasks", "wait", task_id)).strip() == "ready"
    assert task_id in ok(cli(api, "tasks", "list", "--status", "ready"))
    assert json.loads(ok(cli(api, "tasks", "get", task_id)))["status"] == "ready"
    run = cli(api, "tasks", "adapter", task_id, "--out", str(tmp_path / "a.zip"))
    assert "lora" in ok(run) + run.stderr and "adapter_config.json" in zipfile.ZipFile(tmp_path / "a.zip").namelist()
    imported = ok(cli(api, "tasks", "import", str(tmp_path / "a.zip"), "--demos", str(demos))).split()[0]
    assert json.loads(ok(cli(api, "tasks", "get", imported)))["imported"]
    ok(cli(api, "tasks", "delete", imported))
    run = cli(api, "tasks", "get", imported)
    assert run.returncode == 1 and "404" in run.stderr and "not found" in run.stderr
    assert "requests_per_minute" in json.loads(ok(cli(api, "usage")))


def test_mistakes_are_told_plainly(api, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,comment\nhello,there\n")
    run = cli(api, "tasks", "create", "--demos", str(bad))
    assert run.returncode == 1 and "no output column" in run.stderr and "['sentence', 'comment']" in run.stderr
    run = cli(api, "tasks", "list", key="wrong-key")
    assert run.returncode == 1 and "401" in run.stderr and "unknown API key" in run.stderr
    run = cli(api, "predict", "no-such-task", "--inputs", str(bad))
    assert run.returncode == 1 and "404" in run.stderr
    run = cli(api, "tasks", "create", "--demos", str(tmp_path / "missing.csv"))
    assert run.returncode == 1 and "no such file" in run.stderr


def test_the_client_waits_on_events_and_predicts_in_batches(api):
    with Client(api, KEY) as c:
        task = c.create_task([{"input": g, "output": "positive"} for g in GOOD[:3]] +
                             [{"input": b, "output": "negative"} for b in BAD[:3]],
                             options=["positive", "negative"], adaptation={"steps": 20})
        seen = []
        done = c.wait(task["id"], on_change=lambda t: seen.append(t["progress"]["step"]))
        assert done["status"] == "ready" and seen and seen[-1] == 20
        texts = [f"review {i}" for i in range(5)]
        assert [p["input"] for p in c.predict_all(task["id"], texts, batch=2)] == texts
        assert task["id"] in c.models()
        with pytest.raises(MamlserveError) as e:
            c.get_task("no-such-task")
        assert e.value.status == 404 and "not found" in e.value.message
