"""OpenAI evals (evals==3.0.1.post1 wheel): its registry jsonl files to RawTasks."""

from __future__ import annotations

import json
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from model.bank.sources.raw import MAX_LABELS, Converted, Excluded, RawTask, kind_of

# evals/registry/data/<eval>/<file>.jsonl, chat-style input + ideal
EV_ROOT = "evals/registry/data/"
FEW_SHOT = re.compile(r"/few_?shot[^/]*\.jsonl$")  # sarcasm/few_shot.jsonl: demos for samples.jsonl


def evals_name(member: str, files_in_dir: int) -> str:
    """evals.<folder path>, plus the file stem when the file shares its folder with other jsonl files."""
    parts = member[len(EV_ROOT):-len(".jsonl")].split("/")
    return "evals." + ".".join(parts if files_in_dir > 1 else parts[:-1])


def _content(m) -> str | None:
    c = m.get("content") if isinstance(m, dict) else None
    return c if isinstance(c, str) else None  # list content = images / tool parts: not text


def evals_task(name: str, lines: list[str], origin: str = "") -> Converted:
    rows, systems, dropped = [], [], Counter()
    for line in lines:
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            dropped["bad_json"] += 1
            continue
        ideal = r.get("ideal") if isinstance(r, dict) else None
        ideal = ideal[0] if isinstance(ideal, list) and ideal else ideal  # several accepted answers: first
        inp = r.get("input") if isinstance(r, dict) else None
        if not isinstance(ideal, str) or not ideal.strip() or inp is None:
            dropped["no_input_or_ideal"] += 1
            continue
        if isinstance(inp, str):
            system, user = "", inp
        elif isinstance(inp, list):
            # named turns ("example_user"...) are the eval's own few-shot demos: the bank samples its
            # own. Unnamed system turns instruct; the user turns after the last assistant turn are
            # the query; a row made of system turns only is all query.
            turns = [m for m in inp if isinstance(m, dict) and "name" not in m]
            sys_msgs = [_content(m) for m in turns if m.get("role") == "system"]
            last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=-1)
            users = [_content(m) for m in turns[last + 1:] if m.get("role") == "user"]
            if None in users or None in sys_msgs:
                dropped["non_text_input"] += 1
                continue
            system, user = "\n".join(sys_msgs).strip(), "\n".join(users)
        else:
            dropped["non_text_input"] += 1
            continue
        rows.append({"input": user, "output": ideal.strip()})
        systems.append(system)
    if not rows:
        return Excluded(name, "no usable rows (a model-graded or solver eval without input/ideal)")
    # one system prompt for all rows -> the task's instruction; varying ones belong to the input
    instruction = systems[0] or None if len(set(systems)) == 1 else None
    if instruction is None:
        rows = [{"input": f"{s}\n\n{r['input']}" if s and r["input"] else s or r["input"], "output": r["output"]}
                for r, s in zip(rows, systems)]
    labels = Counter(r["output"] for r in rows)
    if len(labels) == 1:
        return Excluded(name, f"every answer is {next(iter(labels))!r}: nothing to learn")
    # few distinct answers, each seen several times -> a label set (classification); else generation
    options = sorted(labels) if len(labels) <= MAX_LABELS and len(rows) >= 5 * len(labels) else None
    return RawTask(name, "evals", kind_of(name, options is not None, False), rows, options, instruction, origin, dropped)


def evals_tasks(whl: Path, want: Callable[[str], bool] = lambda n: True) -> Iterator[Converted]:
    with zipfile.ZipFile(whl) as z:
        files = sorted(n for n in z.namelist() if n.startswith(EV_ROOT) and n.endswith(".jsonl"))
        pools = [n for n in files if FEW_SHOT.search(n)]
        files = [n for n in files if n not in pools]
        for n in pools:
            if want(name := evals_name(n, 2)):
                yield Excluded(name, "few-shot pool of the eval beside it (no input/ideal)")
        per_dir = Counter(n.rsplit("/", 1)[0] for n in files)
        for n in files:
            name = evals_name(n, per_dir[n.rsplit("/", 1)[0]])
            if want(name):
                yield evals_task(name, z.read(n).decode("utf-8", "replace").splitlines(), n)
