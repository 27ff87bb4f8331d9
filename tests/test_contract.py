"""The contract between app/ and worker/ (contract/): neither imports the other, the API loads no
torch, and the API counts tokens as the worker's tokenizer does."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, settings

SIDES = {"app": {"worker"}, "worker": {"app"}, "contract": {"app", "worker"}, "model": {"app", "worker", "contract"}}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports, at any depth of its code (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(SIDES))
def test_no_import_crosses_between_the_api_and_the_worker(package):
    wrong = {str(f.relative_to(ROOT)): sorted(imported_packages(f) & SIDES[package])
             for f in sorted((ROOT / package).rglob("*.py"))}
    assert {f: w for f, w in wrong.items() if w} == {}


def test_the_api_loads_no_torch():
    """Importing the app, and counting tokens with it, loads neither torch nor transformers."""
    code = ("import sys; import app.main, contract.queues, contract.records, contract.blobs; "
            "n = app.main.app.state.count_tokens('what a great movie'); "
            "print(n, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    env = {"PATH": "/usr/bin:/bin", "MAMLSERVE_BASE_MODEL": "tiny", "MAMLSERVE_DATA_DIR": str(settings().data_dir)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n, loaded = out.stdout.strip().split(" ", 1)
    assert int(n) > 0 and loaded == "[]"


TEXTS = ["what a great movie", "  leading spaces\tand tabs\n\nnewlines", "Ünïcödé — “quotes” 日本語 🙂",
         "<|im_start|>user hi<|im_end|>", "a" * 300, "1234567 89.5e-3", "", " ", "don't can't I'm"]


def counts_agree(base_model: str) -> None:
    from app.main import TokenCounter
    from model.loading import load_tokenizer

    s = settings(base_model=base_model)
    api, worker = TokenCounter(s), load_tokenizer(s.base_model, s.data_dir)
    assert [api(t) for t in TEXTS] == [len(worker(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]


def test_the_api_counts_tokens_as_the_worker_does():
    counts_agree("tiny")


@pytest.mark.slow
def test_the_api_counts_smollm2_tokens_as_the_worker_does():
    counts_agree("smollm2")
