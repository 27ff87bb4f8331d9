"""What one worker process holds: the model, loaded once, and an LRU of tasks' weights and prefixes.

Weights are looked up in order: this process's LRU, then the blob stores every machine reaches
(contract/blobs.py: adapted LoRA weights and full-mode deltas in the cache Redis under a key with the
configuration's fingerprint, imported adapters beside the records), then adapted again from the
record's demonstrations, so an evicted task answers as if nothing happened. Nothing a task needs
is on this machine's disk. Exports and imports of a task's weights: worker/adapters.py.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from contract.blobs import store_of, weights_cache
from contract.demos import DemosGone, task_json
from contract.config import fingerprint, service_config
from contract.store import BASE, Store, task_weights_key, weights_key
from model import weights
from model.adapt import Adapted, adapt, start_params
from model.calibration import option_prior
from model.generation import Piece, Sampling, stream
from model.head import Head
from model.lm import LM, LoraSpec, Params
from model.loading import load_lm
from model.optim import AdamState
from model.prefix import encode_prefix, in_context
from model.prompts import Formatter, Row, longest
from model.recipe import Recipe
from model.retrieval import applies, embed, task_embeddings
from model.scoring import Prediction, predict, query_rows
from model.settings import Settings
from model.task import Query, Task
from worker import checkpoints
from worker.entry import EMBEDDINGS, Entry, _meta, _prior, _split, _with_embeddings  # noqa: F401 (EMBEDDINGS: read here by tests)
from worker.machine import base_info, cores, prepare_model

log = logging.getLogger(__name__)


def lora_spec(s: Settings) -> LoraSpec:
    return LoraSpec.of(s)


def recipe_of(rec: dict[str, Any]) -> Recipe:
    """The record's recipe; records written before recipes existed adapted with fixed steps of the LM loss."""
    if rec.get("recipe"):  # recipes stored before min_demos trained any number; before retrieve, a fixed
        return Recipe(**{"min_demos": 0, "retrieve": None, "head": 0.0, **rec["recipe"]})  # prompt; before head, none
    steps = rec.get("steps", 0)
    return Recipe(loss="lm", epochs=1.0 if steps else 0.0, batch_size=4, context_demos=4, lr=rec.get("lr"),
                  predict_demos=None, calibrate=False, min_demos=0, min_steps=steps, max_steps=steps)


class Refused(Exception):
    """What was asked cannot be done for this task (409), and why."""


class Misrouted(Exception):
    """A task of another configuration reached this worker (the API sends it elsewhere)."""


class Runtime:
    def __init__(self, s: Settings, worker: str = ""):
        """worker: the name this process's counters carry in /metrics."""
        self.s = s
        # two workers on one machine: set torch_threads to split the cores, or they fight over them
        torch.set_num_threads(s.torch_threads or cores())
        prepare_model(s)
        dtype = None if s.dtype == "auto" else getattr(torch, s.dtype)
        self.lm: LM = load_lm(s.base_model, s.data_dir, s.device, lora_spec(s), dtype=dtype)
        self.fmt = Formatter(self.lm.encode, s.prompt_format, s.context_tokens)
        self.store = Store.from_url(s.redis_url, worker)
        self.config = service_config(s, self.lm.sha256)
        self.fingerprint = fingerprint(self.config)
        self.lru: OrderedDict[str, Entry] = OrderedDict()
        self.tasks: OrderedDict[str, Task] = OrderedDict()  # record hash -> its task, demonstrations read once
        self.ckpts: OrderedDict[str, tuple[Params, AdamState | None]] = OrderedDict()
        self.base = base_info(s, self.lm)
        try:  # before the first heartbeat: /readyz reports no worker until the shipped checkpoint is settled
            self.shipped = checkpoints.install_shipped(s, self.lm, self.store)
        except Exception:  # Redis unreachable: tasks still run; the next worker start installs it
            log.warning("could not install the shipped checkpoint", exc_info=True)
            self.shipped = None

    # --- checkpoints
    def checkpoint_state(self, ckpt: str) -> tuple[Params, AdamState | None]:
        if ckpt == BASE:
            return {}, None
        if ckpt not in self.ckpts:
            self.ckpts[ckpt] = checkpoints.load(self.s, ckpt, self.lm)
            while len(self.ckpts) > 2:
                self.ckpts.popitem(last=False)
        self.ckpts.move_to_end(ckpt)
        return self.ckpts[ckpt]

    def checkpoint(self, ckpt: str) -> Params:
        return self.checkpoint_state(ckpt)[0]

    # --- tasks
    def task(self, rec: dict[str, Any]) -> Task:
        """The record's task, its demonstrations read from the store once per process (a record's
        hash fixes its content, so the copy kept never goes stale)."""
        got = self.tasks.get(rec["hash"])
        if got is None:
            try:
                got = self.tasks[rec["hash"]] = Task.model_validate(task_json(self.s, rec))
            except DemosGone as e:
                raise Refused(str(e)) from None
            while len(self.tasks) > 4 * max(1, self.s.worker_lru_size):
                self.tasks.popitem(last=False)
        self.tasks.move_to_end(rec["hash"])
        return got

    # --- weights
    def _remember(self, digest: str, entry: Entry) -> Entry:
        self.lru[digest] = entry
        self.lru.move_to_end(digest)
        while len(self.lru) > max(1, self.s.worker_lru_size):
            self.lru.popitem(last=False)
        return entry

    def forget(self, digest: str) -> None:
        self.lru.pop(digest, None)

    def _full_start(self, ck: Params) -> tuple[Params, Params]:
        return start_params(self.lm, "full", ck)

    def _names(self, mode: str) -> list[str]:
        return self.lm.lora_names if mode == "lora" else self.lm.full_names

    def run_adaptation(self, rec: dict[str, Any], on_step: Callable[[int, int, float], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> Adapted:
        """Adapt the record's task within the setting adapt_time_budget_s (the loop stops at it)."""
        task = self.task(rec)
        ck, state = self.checkpoint_state(rec["checkpoint"])
        return adapt(
            self.lm, task, recipe_of(rec), mode=rec["mode"], start=ck or None, seed=rec.get("seed", 0),
            state=state if state is not None and rec["mode"] != "none" and set(state.m) <= set(self._names(rec["mode"])) else None,
            fmt=self.fmt, on_step=on_step, time_budget_s=self.s.adapt_time_budget_s, should_stop=should_stop,
        )

    def check_configuration(self, rec: dict[str, Any]) -> None:
        """A task's weights are made and used under one configuration: refuse another's (the API
        never routes one here; a record from before fingerprints has none and is this one's)."""
        fp = rec.get("fingerprint")
        if fp and fp != self.fingerprint:
            raise Misrouted(f"task {rec['id']} belongs to configuration {fp}; this worker runs {self.fingerprint}")

    def store_weights(self, rec: dict[str, Any], result: Adapted) -> dict[str, Any]:
        """Store adapted weights (LoRA, or the full-mode delta from the starting point; the options'
        prior in the same safetensors' metadata) where every worker finds them; returns the record
        fields that point at them."""
        digest, ckpt = rec["hash"], rec["checkpoint"]
        ck = self.checkpoint(ckpt)
        key = weights_key(self.fingerprint, ckpt, digest)
        if result.mode == "lora":
            weights_cache(self.s).put(key, weights.to_bytes(_with_embeddings(result.params, result.embeddings),
                                                            _meta(result.prior)))
            self._remember(digest, Entry({**ck, **result.params}, result.params, result.prior, embeddings=result.embeddings))
            return {"weights_key": key}
        fixed, start = self._full_start(ck)
        weights_cache(self.s).put(key, weights.to_bytes(_with_embeddings(result.delta(start), result.embeddings),
                                                        _meta(result.prior)))
        self._remember(digest, Entry({**fixed, **result.params}, result.params, result.prior,
                                     embeddings=result.embeddings))
        return {"weights_key": key}

    def _blob(self, rec: dict[str, Any]) -> tuple[Params, dict[str, str]] | None:
        key = task_weights_key(rec)
        data = store_of(self.s, key).get(key)
        if data is None:
            log.info("task %s: weights %s not found (evicted, or never stored)", rec["id"], key)
            return None
        log.info("task %s: weights %s read from the %s (%d bytes)", rec["id"], key,
                 "records Redis" if key.startswith("imported/") else "cache Redis", len(data))
        return weights.from_bytes_meta(data, self.lm.device)

    def load_weights(self, rec: dict[str, Any]) -> Entry | None:
        """The task's weights from the LRU or the blob stores; None when they are gone. An in-context
        task has no weights: its prior (when its recipe calibrates) is computed here."""
        self.check_configuration(rec)
        digest, ckpt = rec["hash"], rec["checkpoint"]
        if digest in self.lru:
            self.lru.move_to_end(digest)
            self.store.count("weights_hit_memory")
            return self.lru[digest]
        ck = self.checkpoint(ckpt)
        if rec["mode"] == "none":
            recipe = recipe_of(rec)
            task = self.task(rec)
            emb = task_embeddings(self.lm, self.fmt, task, recipe)
            prior = option_prior(self.lm, task, ck or None, recipe, self.fmt, emb) if recipe.calibrate else None
            return self._remember(digest, Entry(dict(ck), {}, prior, embeddings=emb))
        got = self._blob(rec)
        if got is None:
            if rec.get("imported"):  # nothing could adapt it again
                raise Refused("the imported adapter's weights are gone from the service: delete the task and import "
                              "the adapter again")
            self.store.count("weights_miss")
            return None
        self.store.count("weights_hit_store" if rec.get("imported") else "weights_hit_cache")
        tensors, emb = _split(got[0])
        meta = got[1]
        if rec["mode"] == "lora":
            return self._remember(digest, Entry({**ck, **tensors}, tensors, _prior(meta), embeddings=emb))
        fixed, start = self._full_start(ck)
        full = {k: start[k] + d.to(start[k].dtype) for k, d in tensors.items()}
        return self._remember(digest, Entry({**fixed, **full}, full, _prior(meta), embeddings=emb))

    def ensure_weights(self, rec: dict[str, Any]) -> Entry:
        """The task's weights, adapted again from its demonstrations when they were evicted."""
        entry = self.load_weights(rec)
        if entry is not None:
            return entry
        log.info("task %s: weights gone, adapting again", rec["id"])
        t0 = time.monotonic()
        result = self.run_adaptation(rec)
        self.store.observe_adaptation(time.monotonic() - t0)
        self.store.add_adapt_seconds(rec["tenant"], time.monotonic() - t0)
        self.store.count("readaptations")
        self.store_weights(rec, result)  # under the key the record names already
        return self.lru[rec["hash"]]

    def drop_weights(self, rec: dict[str, Any]) -> None:
        self.forget(rec["hash"])
        key = task_weights_key(rec)
        store_of(self.s, key).delete(key)

    # --- prediction
    def _prefix(self, entry: Entry, task: Task, recipe: Recipe, rows: list[Row]):
        """The prompt prefix (instruction + the recipe's demonstrations that fit beside the rows),
        encoded once per task and count of demonstrations."""
        shown = in_context(task, recipe)
        ids, used = self.fmt.prefix(shown.instruction, shown.demonstrations, longest(rows))
        prefix = entry.prefixes.get(used)
        if prefix is None:
            with torch.no_grad():
                prefix = entry.prefixes[used] = encode_prefix(self.lm, ids, entry.params or None, used)
        return prefix

    def _retrieving(self, entry: Entry, task: Task, recipe: Recipe, rows: list[Row]) -> bool:
        """Whether these rows' queries get their own demonstrations (Recipe.retrieve); the
        embeddings computed now where the adaptation did not (a query longer than it foresaw)."""
        if not applies(self.fmt, task, recipe, longest(rows)):
            return False
        if entry.embeddings is None:
            entry.embeddings = embed(self.lm, [d.input for d in task.demonstrations])
        return True

    def predict(self, rec: dict[str, Any], queries: list[Query]) -> list[Prediction]:
        task = self.task(rec)
        recipe = recipe_of(rec)
        entry = self.ensure_weights(rec)
        n_new = self.s.max_new_tokens
        per_query = query_rows(self.fmt, task, queries, n_new)  # encoded once: they size the prefix, then are scored
        rows = [r for rs in per_query for r in rs]
        if recipe.head and not entry.head_fit:
            entry.head, entry.head_fit = Head.fit(task, rec.get("seed", 0)), True  # the adaptation's seed
        if self._retrieving(entry, task, recipe, rows):  # a prefix per chosen set, built by predict
            return predict(self.lm, task, queries, params=entry.params or None, recipe=recipe, prior=entry.prior,
                           fmt=self.fmt, max_new_tokens=n_new, embeddings=entry.embeddings, rows=per_query,
                           head=entry.head)
        prefix = self._prefix(entry, task, recipe, rows)
        return predict(self.lm, task, queries, params=entry.params or None, recipe=recipe, prior=entry.prior,
                       fmt=self.fmt, prefix=prefix, max_new_tokens=n_new, rows=per_query, head=entry.head)

    def generate(self, rec: dict[str, Any], text: str, sp: Sampling,
                 stopped: Callable[[], bool] = lambda: False) -> Iterator[Piece]:
        """Generated text for one input, in pieces (model.generation.stream), with the task's weights and prefix."""
        task = self.task(rec)
        entry = self.ensure_weights(rec)
        ctx = self.fmt.row(text, "").ctx
        prefix = self._prefix(entry, task, recipe_of(rec), [Row(ctx, [0] * sp.max_tokens)])
        return stream(self.lm, prefix, ctx, entry.params or None, sp, stopped)
