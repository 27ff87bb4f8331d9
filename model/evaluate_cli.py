"""The held-out evaluation's command line (`python -m model.evaluate --help`): load the model and the
checkpoints, run `model.evaluate.evaluate`, write the report and record each checkpoint's scores."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from model.bank.sampling import SEEDS
from model.evaluate import checkpoint_variant, evaluate
from model.lm import LM
from model.meta_train import task_source
from model.prompts import Formatter
from model.report import markdown, record, write_report


def shortest_tasks(lm: LM, tasks: list, n: int | None) -> list:
    """The n tasks with the shortest rows (median tokens of input + longest option over the first
    32 test examples): a short prompt budget would drop most queries of the others."""
    def size(t) -> float:
        rows = sorted(len(lm.encode(e.input)) + max(len(lm.encode(o)) for o in (t.options or e.options or [e.output]))
                      for e in t.test[:32])
        return rows[len(rows) // 2] if rows else float("inf")

    ranked = sorted(tasks, key=lambda t: (size(t), t.name))
    return ranked[:n] if n else ranked


def main(
    setting: str = "class_to_class",
    checkpoint: list[str] = [],  # noqa: B006 (typer reads the default)
    model: str | None = None,
    k: int = 16,
    seeds: str = ",".join(map(str, SEEDS)),
    n_test: int | None = None,
    max_tasks: int | None = None,
    adapt_steps: int | None = None,
    adapt_lr: float | None = None,
    adapt_batch: int | None = None,
    context_demos: int | None = None,
    shortest: bool = False,
    settings_dir: Path | None = None,
    context_tokens: int | None = None,
    out: Path | None = None,
    journal: Path | None = None,
    device: str | None = None,
    data_dir: Path | None = None,
) -> None:
    """Evaluate the base model and checkpoints on a setting's held-out tasks; print where the report went.

    adapt_lr: test-time lr for every variant (default: each checkpoint's meta-training inner lr,
    the settings' adapt lr for the base). --shortest: take the max_tasks held-out tasks with the
    shortest examples rather than the first ones (for short prompt budgets). journal: a file scores
    are appended to as they come; the same command with the same journal resumes where it stopped."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from model.settings import get_settings

    s = get_settings()  # the CLI's defaults come from the environment (MAMLSERVE_*), as the service's do
    ddir = data_dir or s.data_dir
    from model.loading import load_for_autocast

    lm = load_for_autocast(model or s.base_model, ddir, device or s.device)  # as in meta-training
    source = task_source(setting, ddir, settings_dir)
    if shortest:
        source.held_out = shortest_tasks(lm, source.held_out, max_tasks)
    names = [t.name for t in source.held_out]
    variants = [checkpoint_variant(lm, ddir, c, adapt_lr, names) for c in checkpoint]
    fmt = Formatter(lm.encode, s.prompt_format, context_tokens or s.context_tokens)
    report = evaluate(lm, source, variants, k, [int(x) for x in seeds.split(",")], n_test, adapt_steps,
                      base_lr=adapt_lr, fmt=fmt, max_tasks=max_tasks, adapt_batch=adapt_batch,
                      context_demos=context_demos, journal=journal)
    out = out or ddir / "eval" / f"{setting}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = write_report(report, out)
    record(report, ddir, checkpoint)
    print(markdown(report))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
