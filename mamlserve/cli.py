"""The `mamlserve` command: run the service, teach it tasks from your files, predict, evaluate.

    mamlserve serve                                       # the embedded service (scripts/serve.sh)
    mamlserve tasks create --demos reviews.csv --wait     # columns input,output; options from the outputs
    mamlserve predict TASK --inputs new.txt > out.jsonl   # one JSON line per input, a progress bar
    mamlserve eval TASK --test held_out.csv               # macro-F1, accuracy, confusion matrix

The service's URL and key come from --url/--key or MAMLSERVE_URL/MAMLSERVE_API_KEY (the
development key when neither is set). Data files: .csv with a header naming the input and output
columns (input/text/sentence, output/label/answer), .jsonl with {"input", "output"} objects, and
for inputs alone also .txt, one per line.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from tqdm import tqdm

from mamlserve.client import Client, MamlserveError, upload_kind

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False)
tasks_app = typer.Typer(help="Create, import, list, inspect, export and delete tasks.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")

INPUT_COLUMNS = ("input", "text", "sentence", "question", "x")
OUTPUT_COLUMNS = ("output", "label", "answer", "target", "y")
DEV_KEY = "dev-key"


class State:
    url: str | None = None
    key: str | None = None


def client() -> Client:
    return Client(State.url, State.key or os.environ.get("MAMLSERVE_API_KEY") or DEV_KEY)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _column(names: list[str], wanted: tuple[str, ...], what: str, path: Path, required: bool = True) -> str | None:
    lower = {n.strip().lower(): n for n in names}
    found = next((lower[w] for w in wanted if w in lower), None)
    if found is None and required:
        fail(f"{path}: no {what} column; its header has {names}, and the {what} column may be called {', '.join(wanted)}")
    return found


def read_examples(path: Path, need_output: bool = True) -> list[dict[str, str]]:
    """{"input", "output"} rows (output missing when not needed and absent) from .csv, .jsonl or .txt."""
    if not path.is_file():
        fail(f"{path}: no such file")
    rows: list[dict[str, str]] = []
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"{path}:{i}: not JSON ({e})")
                if not isinstance(obj, dict) or "input" not in obj or (need_output and "output" not in obj):
                    fail(f"{path}:{i}: each line is an object with input" + (" and output" if need_output else ""))
                rows.append({k: str(obj[k]) for k in ("input", "output") if k in obj})
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            names = reader.fieldnames or []
            x = _column(names, INPUT_COLUMNS, "input", path)
            y = _column(names, OUTPUT_COLUMNS, "output", path, required=need_output)
            rows = [{"input": r[x], **({"output": r[y]} if y else {})} for r in reader if (r.get(x) or "").strip()]
    elif suffix == ".txt" and not need_output:
        rows = [{"input": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        fail(f"{path}: give a .csv or .jsonl file" + ("" if need_output else " (or .txt, one input per line)"))
    if not rows:
        fail(f"{path}: no rows")
    return rows


def infer_options(demos: list[dict[str, str]]) -> list[str] | None:
    """The distinct outputs when they repeat (a label set), else None (free text to generate)."""
    labels = list(dict.fromkeys(d["output"] for d in demos))
    return labels if 2 <= len(labels) < len(demos) else None


def show(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2))


@app.callback()
def main_options(url: Annotated[Optional[str], typer.Option(help="the service (MAMLSERVE_URL; http://127.0.0.1:8000)")] = None,
                 key: Annotated[Optional[str], typer.Option(help="your API key (MAMLSERVE_API_KEY)")] = None) -> None:
    State.url, State.key = url, key


@app.command()
def serve() -> None:
    """Run the embedded service on this machine: Redis, workers and the API (scripts/serve.sh)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "serve.sh"
    if not script.is_file():
        fail("scripts/serve.sh is not beside this installation: run the service from a checkout of mamlserve, "
             "or with docker compose")
    os.execv(str(script), [str(script)])


def _wait(c: Client, task: dict[str, Any]) -> dict[str, Any]:
    with tqdm(total=task["progress"]["steps"] or None, desc=f"adapting {task['id'][:8]}", unit="step", file=sys.stderr) as bar:
        def progress(t: dict[str, Any]) -> None:
            bar.total = t["progress"]["steps"] or bar.total
            bar.update(t["progress"]["step"] - bar.n)
            if t["progress"].get("loss") is not None:
                bar.set_postfix(loss=f"{t['progress']['loss']:.3f}")

        return c.wait(task["id"], on_change=progress)


@tasks_app.command("create")
def tasks_create(
    demos: Annotated[Path, typer.Option(help="demonstrations: .csv or .jsonl with input and output")],
    options: Annotated[Optional[str], typer.Option(help="the label set, comma-separated; default: the outputs when "
                                                   "they repeat")] = None,
    generation: Annotated[bool, typer.Option("--generation", help="free text: no options")] = False,
    instruction: Annotated[Optional[str], typer.Option()] = None,
    space: Annotated[Optional[str], typer.Option("--space", "--mode", help="the parameters adapted: lora | full | none "
                                                 "(in context only); --mode is its old name")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Adam steps (default: the recipe's)")] = None,
    epochs: Annotated[Optional[float], typer.Option()] = None,
    lr: Annotated[Optional[float], typer.Option()] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="a meta-trained checkpoint; default the active one")] = None,
    wait: Annotated[bool, typer.Option(help="wait until it is ready, with a progress bar")] = False,
) -> None:
    """Teach the service a task from your labelled examples; prints the task (its id first)."""
    rows = read_examples(demos)
    opts = None if generation else [o.strip() for o in options.split(",")] if options else infer_options(rows)
    if options is None and not generation:
        typer.echo(f"options: {', '.join(opts)} (from the outputs)" if opts else
                   "no repeated outputs: a generation task (give --options for a label set)", err=True)
    adaptation = {k: v for k, v in {"space": space, "steps": steps, "epochs": epochs, "lr": lr}.items() if v is not None}
    with client() as c:
        try:
            task = (c.upload_task(demos, kind, opts, instruction, adaptation or None, checkpoint) if (kind := upload_kind(demos))
                    else c.create_task(rows, opts, instruction, adaptation or None, checkpoint))
            typer.echo(task["id"])
            if wait:
                task = _wait(c, task)
        except MamlserveError as e:
            fail(str(e))
    typer.echo(f"{task['status']}: space {task['space']}, {task['steps']} steps, checkpoint {task['checkpoint']}", err=True)


@tasks_app.command("import")
def tasks_import(adapter: Annotated[Path, typer.Argument(help="a PEFT adapter folder, zipped")],
                 demos: Annotated[Path, typer.Option(help="demonstrations (they calibrate the options)")],
                 options: Annotated[Optional[str], typer.Option(help="comma-separated")] = None,
                 instruction: Annotated[Optional[str], typer.Option()] = None) -> None:
    """Serve an adapter trained elsewhere (made for this service's base model); ready at once."""
    rows = read_examples(demos)
    opts = [o.strip() for o in options.split(",")] if options else infer_options(rows)
    with client() as c:
        try:
            typer.echo(c.import_adapter(adapter, rows, opts, instruction)["id"])
        except MamlserveError as e:
            fail(str(e))


@tasks_app.command("list")
def tasks_list(status: Annotated[Optional[list[str]], typer.Option(help="queued | adapting | ready | failed")] = None) -> None:
    """Your tasks, newest first: id, status, space, steps."""
    with client() as c:
        try:
            for t in c.iter_tasks(status):
                typer.echo(f"{t['id']}\t{t['status']}\t{t['space']}\t{t['progress']['step']}/{t['steps']}")
        except MamlserveError as e:
            fail(str(e))


@tasks_app.command("get")
def tasks_get(task_id: str) -> None:
    """One task, as JSON."""
    with client() as c:
        try:
            show(c.get_task(task_id))
        except MamlserveError as e:
            fail(str(e))


@tasks_app.command("wait")
def tasks_wait(task_id: str) -> None:
    """Wait until the task is ready (a progress bar); fails if it failed."""
    with client() as c:
        try:
            task = _wait(c, c.get_task(task_id))
        except MamlserveError as e:
            fail(str(e))
    typer.echo(task["status"])


@tasks_app.command("delete")
def tasks_delete(task_id: str) -> None:
    """Delete the task and its weights."""
    with client() as c:
        try:
            c.delete_task(task_id)
        except MamlserveError as e:
            fail(str(e))


@tasks_app.command("adapter")
def tasks_adapter(task_id: str, out: Annotated[Path, typer.Option(help="the zip to write")],
                  format: Annotated[str, typer.Option(help="auto | lora | full")] = "auto") -> None:
    """Download what the task predicts with: a PEFT adapter or a Hugging Face model folder, zipped."""
    with client() as c:
        try:
            kind = c.download_adapter(task_id, out, format)
        except MamlserveError as e:
            fail(str(e))
    typer.echo(f"{out}: {kind}", err=True)


def _inputs(path: Path) -> list[str]:
    return [r["input"] for r in read_examples(path, need_output=False)]


def _predictions(c: Client, task_id: str, inputs: list[str], batch: int, desc: str):
    with tqdm(total=len(inputs), desc=desc, unit="input", file=sys.stderr) as bar:
        for p in c.predict_all(task_id, inputs, batch):
            bar.update(1)
            yield p


@app.command()
def predict(task_id: str, inputs: Annotated[Path, typer.Option(help=".txt (one per line), .csv or .jsonl")],
            batch: Annotated[int, typer.Option(help="inputs per call")] = 32) -> None:
    """Answer every input: one JSON line each ({input, output, scores}) as the calls return."""
    with client() as c:
        try:
            for p in _predictions(c, task_id, _inputs(inputs), batch, "predicting"):
                typer.echo(json.dumps(p))
        except MamlserveError as e:
            fail(str(e))


def scores(golds: list[str], preds: list[str]) -> tuple[list[str], list[list[int]], float, float]:
    """Labels, confusion matrix (rows gold, columns predicted), accuracy and macro-F1 over the labels."""
    labels = list(dict.fromkeys(golds + preds))
    at = {label: i for i, label in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for g, p in zip(golds, preds):
        m[at[g]][at[p]] += 1
    f1 = []
    for i in range(len(labels)):
        tp, predicted, actual = m[i][i], sum(row[i] for row in m), sum(m[i])
        f1.append(2 * tp / (predicted + actual) if tp else 0.0)
    return labels, m, sum(m[i][i] for i in range(len(labels))) / max(len(golds), 1), sum(f1) / max(len(f1), 1)


@app.command("eval")
def evaluate(task_id: str, test: Annotated[Path, typer.Option(help="held-out .csv or .jsonl with input and output")],
             batch: Annotated[int, typer.Option(help="inputs per call")] = 32,
             as_json: Annotated[bool, typer.Option("--json", help="one JSON object instead of the table")] = False) -> None:
    """Check a task on your own held-out data: macro-F1, accuracy and the confusion matrix."""
    rows = read_examples(test)
    with client() as c:
        try:
            preds = [p["output"] for p in _predictions(c, task_id, [r["input"] for r in rows], batch, "evaluating")]
        except MamlserveError as e:
            fail(str(e))
    labels, m, acc, f1 = scores([r["output"] for r in rows], preds)
    if as_json:
        return show({"n": len(rows), "macro_f1": f1, "accuracy": acc, "labels": labels, "confusion": m})
    typer.echo(f"n={len(rows)}  macro-F1={f1:.4f}  accuracy={acc:.4f}")
    width = max(len(x) for x in labels + ["gold \\ predicted"]) + 2
    typer.echo("gold \\ predicted".ljust(width) + "".join(x[:12].rjust(13) for x in labels))
    for label, row in zip(labels, m):
        typer.echo(label.ljust(width) + "".join(str(n).rjust(13) for n in row))


@app.command()
def usage() -> None:
    """Your use of each quota, against its limit."""
    with client() as c:
        try:
            show(c.usage())
        except MamlserveError as e:
            fail(str(e))


def main() -> None:
    app()
