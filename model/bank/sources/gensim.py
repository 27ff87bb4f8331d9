"""Word analogies (gensim==4.4.0 test data): one RawTask per relation."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from model.bank.sources.raw import Converted, RawTask, kind_of

GENSIM_FILE = "gensim/test/test_data/questions-words.txt"


def analogy_tasks(text: str) -> list[RawTask]:
    tasks: list[RawTask] = []
    for line in text.splitlines():
        if line.startswith(":"):
            rel = line[1:].strip()
            tasks.append(RawTask(f"gensim.{rel}", "gensim", "generation", [], None, None, f"{GENSIM_FILE}#{rel}"))
        elif line.strip() and tasks:
            a, b, c, d = line.split()
            tasks[-1].rows.append({"input": f"{a} : {b} :: {c} :", "output": d})
    for t in tasks:
        t.kind = kind_of(t.name, False, False)
    return tasks


def gensim_tasks(whl: Path, want: Callable[[str], bool] = lambda n: True) -> Iterator[Converted]:
    with zipfile.ZipFile(whl) as z:
        yield from (t for t in analogy_tasks(z.read(GENSIM_FILE).decode("utf-8")) if want(t.name))
