"""BIG-bench (bigbench==1.0.0 sdist): its task.json files to RawTasks."""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator

from model.bank.sources.raw import MAX_LABELS, Converted, Excluded, RawTask, kind_of


def _with_shared_options(rows: list[dict]) -> tuple[list[dict], list[str] | None]:
    """If every example has the same option set, hoist it to the task (a classification task)."""
    sets = {frozenset(r["options"]) for r in rows if "options" in r}
    if len(sets) != 1 or not all("options" in r for r in rows):
        return rows, None
    options = rows[0]["options"]
    return [{"input": r["input"], "output": r["output"]} for r in rows], list(options)


# bigbench-1.0.0/bigbench/benchmark_tasks/<task>[/<subtask>]/task.json
BB_ROOT = "bigbench/benchmark_tasks/"
# multiemo ships every language 10 times (all/hotels/medicine/products/school x sentence/text): the
# hotel..school slices are subsets of "all", and the text level repeats the sentences.
BB_SKIP = [(re.compile(r"^bigbench\.multiemo\.(?!all_sentence_)"), "subset or re-cut of multiemo all_sentence_<lang>")]


def bigbench_name(member: str) -> str | None:
    if not member.endswith("/task.json") or BB_ROOT not in member:
        return None
    return "bigbench." + member.split(BB_ROOT, 1)[1][: -len("/task.json")].replace("/", ".")


def bigbench_task(name: str, d: dict) -> Converted:
    examples = d.get("examples") or []
    if not examples:
        return Excluded(name, "no inline examples (parent of subtasks, or a programmatic task)")
    mc = all(isinstance(e.get("target_scores"), dict) and e["target_scores"] for e in examples)
    rows, dropped = [], Counter()
    for e in examples:
        inp = str(e.get("input", ""))
        if mc:
            ts = e["target_scores"]
            top = max(ts.values())
            best = [o for o, v in ts.items() if v == top]
            if len(best) != 1 or top <= 0:  # no single correct option: cannot score it as one label
                dropped["no_single_answer"] += 1
                continue
            rows.append({"input": inp, "output": best[0], "options": [str(o) for o in ts]})
        else:
            t = e.get("target")
            t = t[0] if isinstance(t, list) and t else t  # several references: keep the first
            if not isinstance(t, str | int | float):
                dropped["no_target"] += 1
                continue
            rows.append({"input": inp, "output": str(t)})
    if mc and rows and max(len(r["options"]) for r in rows) > MAX_LABELS:
        # e.g. dyck_languages lists all 84 possible answers: score it as generation of the answer
        rows = [{"input": r["input"], "output": r["output"]} for r in rows]
        mc = False
    rows, options = _with_shared_options(rows)
    kind = kind_of(name, options is not None, mc and options is None)
    return RawTask(name, "bigbench", kind, rows, options, (d.get("task_prefix") or "").strip() or None,
                   d.get("name", name), dropped)


def bigbench_tasks(tar, want: Callable[[str], bool] = lambda n: True) -> Iterator[Converted]:
    """Stream the sdist (a path or a binary file object) once; only task.json members are parsed."""
    with (tarfile.open(fileobj=tar, mode="r|gz") if hasattr(tar, "read") else tarfile.open(tar, "r|gz")) as tf:
        for m in tf:
            name = bigbench_name(m.name)
            if name is None or not want(name):
                continue
            skip = next((why for rx, why in BB_SKIP if rx.match(name)), None)
            if skip:
                yield Excluded(name, skip)
                continue
            task = bigbench_task(name, json.load(tf.extractfile(m)))
            if isinstance(task, RawTask):
                task.origin = m.name
            yield task
