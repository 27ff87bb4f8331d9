"""The task bank's catalog, on disk or in a blob store: one entry per task (task.json +
train/dev/test.jsonl), a manifest, and the settings (named meta-train / held-out splits).

Layout under data_dir/bank (or under bank/ in the service's shared store: `model.blobs`):
    manifest.json              build key, config, source hashes, per-task counts, exclusions
    <task>/task.json           BankTask metadata (no examples)
    <task>/{train,dev,test}.jsonl   one Example per line: {"input", "output", "options"?}
Settings are committed JSON files in model/bank/settings/ (see splits.py for how they were made).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from model.blobs import Blobs, Folder, blobs_at
from model.task import Example

Kind = Literal["classification", "multiple-choice", "QA", "NLI", "paraphrase", "generation"]
SPLITS = ("train", "dev", "test")
SETTINGS_DIR = Path(__file__).parent / "settings"


class TaskMeta(BaseModel):
    """What task.json holds: everything about a task except its examples."""

    name: str
    source: str  # bigbench | evals | rotten_tomatoes | gensim | wordnet
    licence: str
    kind: Kind
    options: list[str] | None = None  # fixed label set; None when options are per example or absent
    instruction: str | None = None
    origin: str = ""  # file inside the source package, for provenance
    counts: dict[str, int] = Field(default_factory=dict)  # train/dev/test + raw/dropped_* from the build
    build_key: str = ""

    @property
    def n_labels(self) -> int:
        return len(self.options) if self.options else 0

    @property
    def is_classification(self) -> bool:
        """MetaICL's sense: one fixed label set for the whole task."""
        return self.options is not None


class BankTask:
    """A task of the bank: metadata plus lazily read splits of Examples."""

    def __init__(self, blobs: Blobs, name: str):
        self.blobs, self._name = blobs, name
        self.meta = TaskMeta.model_validate_json(self._read("task.json"))

    def _read(self, file: str) -> bytes:
        raw = self.blobs.get(f"{self._name}/{file}")
        if raw is None:
            raise FileNotFoundError(f"task {self._name!r} lacks {file} in {self.blobs.where}")
        return raw

    def __repr__(self) -> str:
        return f"BankTask({self.name!r}, {self.kind}, {self.meta.counts})"

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def options(self) -> list[str] | None:
        return self.meta.options

    @property
    def instruction(self) -> str | None:
        return self.meta.instruction

    def split(self, name: str) -> list[Example]:
        return self._splits[name]

    @cached_property
    def _splits(self) -> dict[str, list[Example]]:
        # model_construct: examples were validated at build time; re-validating 16k rows is slow.
        # Lines split on bytes: str.splitlines would also cut at U+2028, U+0085 and the like,
        # which JSON leaves unescaped inside strings (reviews have them).
        return {s: [Example.model_construct(**json.loads(line)) for line in self._read(f"{s}.jsonl").split(b"\n")
                    if line.strip()] for s in SPLITS}

    @property
    def train(self) -> list[Example]:
        return self.split("train")

    @property
    def dev(self) -> list[Example]:
        return self.split("dev")

    @property
    def test(self) -> list[Example]:
        return self.split("test")


@dataclass(frozen=True)
class Setting:
    name: str
    meta_train: list[str]
    held_out: list[str]
    description: str = ""


def read_setting(path: Path) -> Setting:
    d = json.loads(path.read_text())
    return Setting(d["name"], d["meta_train"], d["held_out"], d.get("description", ""))


def setting_names(folder: Path = SETTINGS_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.json"))


class Bank:
    """The built bank: task metadata is read up front, examples only when a task's split is used.
    `root` is its folder, or a store whose keys start at the bank's (`root` is then None)."""

    def __init__(self, root: Path | Blobs, settings_dir: Path = SETTINGS_DIR):
        self.blobs = blobs_at(root)
        self.root = self.blobs.root if isinstance(self.blobs, Folder) else None
        self.settings_dir = settings_dir
        raw = self.blobs.get("manifest.json")
        if raw is None:
            where = self.root if self.root is not None else self.blobs.where
            raise FileNotFoundError(f"no bank at {where}: run `python -m model.bank build`")
        self.manifest = json.loads(raw)
        self._tasks: dict[str, BankTask] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.manifest["tasks"])

    def task(self, name: str) -> BankTask:
        if name not in self._tasks:
            if name not in self.manifest["tasks"]:
                raise KeyError(f"task {name!r} is not in the bank at {self.root or self.blobs.where}")
            self._tasks[name] = BankTask(self.blobs, name)
        return self._tasks[name]

    def tasks(self, names: list[str] | None = None) -> list[BankTask]:
        return [self.task(n) for n in (self.names if names is None else names)]

    def setting_names(self) -> list[str]:
        return setting_names(self.settings_dir)

    def setting(self, name: str) -> Setting:
        path = self.settings_dir / f"{name}.json"
        if not path.is_file():
            raise KeyError(f"no setting {name!r}; known: {', '.join(self.setting_names())}")
        return read_setting(path)


def export(bank: Bank, settings: list[str], data_dir: Path | Blobs) -> list[str]:
    """Copy the tasks that settings use (meta-train and held-out) into data_dir/bank (a folder, or
    the service's shared store), with a manifest of those tasks alone: a bank small enough to carry
    to a machine that cannot build one (an offline GPU box, an image), or for the service's workers
    to meta-train on from any machine. Returns the task names."""
    names = sorted({n for name in settings for st in [bank.setting(name)] for n in st.meta_train + st.held_out})
    dest = blobs_at(data_dir).under("bank")
    for n in names:
        task = bank.task(n)  # KeyError naming the task when the bank lacks it
        for file in ("task.json", *(f"{s}.jsonl" for s in SPLITS)):
            dest.put(f"{n}/{file}", task._read(file))
    there = json.loads(dest.get("manifest.json") or b"{}")  # a setting exported before stays
    if there.get("build_key") != bank.manifest.get("build_key"):
        there = {}
    tasks = {**there.get("tasks", {}), **{n: bank.manifest["tasks"][n] for n in names}}
    manifest = {**bank.manifest, "tasks": tasks, "n_tasks": len(tasks), "excluded": [],
                "exported_for": sorted({*there.get("exported_for", []), *settings})}
    dest.put("manifest.json", json.dumps(manifest, indent=1).encode())  # last: it marks the tasks complete
    return names


def load_bank(data_dir: Path | Blobs, settings_dir: Path = SETTINGS_DIR) -> Bank:
    """The bank under data_dir/bank, or under bank/ in a store."""
    return Bank(blobs_at(data_dir).under("bank"), settings_dir)  # a folder stays a Folder (Bank.root)


# --- small file helpers (atomic writes: an interrupted build never leaves a half file behind)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def example_row(e: Example) -> dict:
    return e.model_dump(exclude_none=True)
