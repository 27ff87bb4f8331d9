"""Demonstrations uploaded as JSONL, CSV or a multipart file (app/uploads.py), the max_demonstrations
limit (413), bad rows named by line (422) with nothing stored, and demonstrations kept once in the
durable blob store, referenced by key from the task record (contract/demos.py)."""

from __future__ import annotations

import json

import pytest

from conftest import auth, sentiment, settings, wait_status

LIMIT = settings().max_demonstrations
OPTS = {"options": ["positive", "negative"]}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def csv_of(rows: list[dict]) -> bytes:
    import csv
    import io

    out = io.StringIO()
    w = csv.DictWriter(out, ["input", "output"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return out.getvalue().encode()


def rows(n: int, tag: str) -> list[dict]:
    return [{"input": f"{tag} review {i}", "output": "positive" if i % 2 else "negative"} for i in range(n)]


def upload(client, data: bytes, kind: str, **params):
    return client.post("/tasks", content=data, params={**OPTS, **params}, headers={**auth(), "content-type": kind})


def stored(records) -> tuple[int, int, int]:
    """(task records, demonstration values, their reference sets): what an error must leave as it was."""
    return (len(records.keys("ms:task:*")), len(records.keys("ms:blob:demos/*")), len(records.keys("ms:demos_refs:*")))


def test_jsonl_csv_and_multipart_are_the_json_task(client, records):
    demos = rows(12, "same") + [{"input": 'a "quoted", two-line\nreview', "output": "positive"}]
    r = client.post("/tasks", json={"demonstrations": demos, **OPTS, "adaptation": {"space": "none"}}, headers=auth())
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    for data, kind in ((jsonl(demos), "application/jsonl"), (csv_of(demos), "text/csv; charset=utf-8")):
        r = upload(client, data, kind, space="none")
        assert r.status_code == 200 and r.json()["id"] == task_id, r.text  # the same content: the same task
    form = {"task": json.dumps({**OPTS, "adaptation": {"space": "none"}})}
    r = client.post("/tasks", files={"demonstrations": ("d.csv", csv_of(demos), "text/csv")}, data=form, headers=auth())
    assert r.status_code == 200 and r.json()["id"] == task_id, r.text
    r = client.post("/tasks", files={"demonstrations": ("d.jsonl", jsonl(demos))}, data=form, headers=auth())
    assert r.status_code == 200 and r.json()["id"] == task_id, r.text
    rec = client.app.state.store.task(task_id)
    assert "demonstrations" not in rec["task"] and rec["n_demos"] == len(demos) and rec["demos_key"].startswith("demos/")


def test_same_upload_twice_is_one_task(client, records):
    data = jsonl(rows(20, "twice"))
    first = upload(client, data, "application/jsonl", space="none")
    before = stored(records)
    again = upload(client, data, "application/jsonl", space="none")
    assert (first.status_code, again.status_code) == (202, 200) and first.json()["id"] == again.json()["id"]
    assert stored(records) == before


def test_over_the_limit_is_413_and_nothing_stored(client, records):
    before = stored(records)
    for data, kind in ((jsonl(rows(LIMIT + 1, "big")), "application/jsonl"), (csv_of(rows(LIMIT + 1, "big")), "text/csv")):
        r = upload(client, data, kind)
        assert r.status_code == 413, r.text
        assert r.json()["detail"] == f"{LIMIT + 1} demonstrations; the limit is {LIMIT} (max_demonstrations)"
    r = client.post("/tasks", json={"demonstrations": rows(LIMIT + 1, "big"), **OPTS}, headers=auth())
    assert r.status_code == 413 and "max_demonstrations" in r.json()["detail"]
    big = b"x" * (settings().max_upload_bytes + 1)
    r = upload(client, big, "text/csv")
    assert r.status_code == 413 and "max_upload_bytes" in r.json()["detail"]
    assert stored(records) == before


@pytest.mark.parametrize("data,kind,message", [
    (csv_of(rows(15, "bad")) + b"only an input\n", "text/csv", "line 17: missing column output"),
    (b"input,label\nx,positive\n", "text/csv", "line 1: unknown column 'label'"),
    (csv_of(rows(3, "bad")) + b" ,positive\n", "text/csv", "line 5: input: input must not be empty"),
    (csv_of(rows(3, "bad")) + b"x,positive,extra\n", "text/csv", "line 5: 3 fields; the header has 2"),
    (jsonl(rows(2, "bad")) + b"\n{not json}\n", "application/jsonl", "line 4: not JSON"),
    (jsonl(rows(2, "bad")) + b'{"input": "x"}\n', "application/jsonl", "line 3: missing key output"),
    (jsonl(rows(2, "bad")) + b'["x", "y"]\n', "application/jsonl", "line 3: not a JSON object"),
    (jsonl(rows(2, "bad")) + b'{"input": "x", "output": "maybe"}\n', "application/jsonl",
     "line 3: output 'maybe' is not one of the options ['positive', 'negative']"),
    (csv_of(rows(6, "bad")) + b"x,maybe\n", "text/csv", "line 8: output 'maybe' is not one of the options"),
    (b"\xff\xfe", "text/csv", "not UTF-8"),
    (b"", "application/jsonl", "no rows"),
])
def test_bad_rows_are_422_naming_the_line_and_nothing_stored(client, records, data, kind, message):
    before = stored(records)
    r = upload(client, data, kind)
    assert r.status_code == 422, r.text
    assert any(message in e["msg"] for e in r.json()["detail"]), r.json()
    assert stored(records) == before


def test_bad_fields_of_an_upload_are_4xx(client, records):
    data = jsonl(rows(4, "fields"))
    r = upload(client, data, "application/jsonl", steps="many")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "steps"]
    r = client.post("/tasks", content=data, params={"options": "positive"}, headers={**auth(), "content-type": "application/jsonl"})
    assert r.status_code == 422 and "at least 2 entries" in r.text
    r = client.post("/tasks", files={"demonstrations": ("d.txt", data)}, headers=auth())
    assert r.status_code == 422 and "CSV" in r.text
    r = client.post("/tasks", files={"demonstrations": ("d.jsonl", data)}, data={"task": "{"}, headers=auth())
    assert r.status_code == 422 and "not JSON" in r.text
    r = client.post("/tasks", files={"demonstrations": ("d.jsonl", data)}, params=OPTS, headers=auth())
    assert r.status_code == 422 and "task" in r.text


def test_deleting_the_last_task_that_holds_demonstrations_deletes_them(client, records):
    data = jsonl(rows(8, "shared"))
    a = upload(client, data, "application/jsonl", space="none").json()["id"]
    b = upload(client, data, "application/jsonl", space="none", seed=1).json()["id"]
    key = client.app.state.store.task(a)["demos_key"]
    assert a != b and client.app.state.store.task(b)["demos_key"] == key  # one value for both
    assert client.delete(f"/tasks/{a}", headers=auth()).status_code == 204
    assert records.exists(f"ms:blob:{key}")
    assert client.delete(f"/tasks/{b}", headers=auth()).status_code == 204
    assert not records.exists(f"ms:blob:{key}") and not records.exists(f"ms:demos_refs:{key}")


def test_a_record_from_before_demos_key_still_predicts(client, worker):
    """Records written before demonstrations were kept apart hold them inline in `task`."""
    store = client.app.state.store
    task_id = client.post("/tasks", json={**sentiment(8, "old-layout"), "adaptation": {"space": "none"}},
                          headers=auth()).json()["id"]
    rec = store.task(task_id)
    inline = {**rec["task"], "demonstrations": sentiment(8, "old-layout")["demonstrations"]}
    store.r.hset(f"ms:task:{task_id}", "task", json.dumps(inline))
    store.r.hdel(f"ms:task:{task_id}", "demos_key", "n_demos")
    r = client.post("/predict", json={"task_id": task_id, "inputs": ["loved it"]}, headers=auth())
    assert r.status_code == 200 and r.json()["predictions"][0]["output"] in OPTS["options"], r.text
    assert client.delete(f"/tasks/{task_id}", headers=auth()).status_code == 204


def test_a_large_upload_adapts_and_predicts(client, worker, records):
    r = upload(client, csv_of(rows(1000, "large")), "text/csv", steps=2)
    assert r.status_code == 202, r.text
    task = wait_status(client, r.json()["id"], timeout=300)
    assert task["progress"]["steps"] == 2
    raw = records.hgetall(f"ms:task:{task['id']}")
    assert len(b"".join(raw.values())) < 2000 and b"large review" not in b"".join(raw.values())  # only the key
    r = client.post("/predict", json={"task_id": task["id"], "inputs": ["large review 7"]}, headers=auth())
    assert r.status_code == 200 and r.json()["predictions"][0]["output"] in OPTS["options"], r.text
