"""What a user gets: macro-F1 of the service's default adaptation on real tasks it never saw,
side by side with in-context prediction, a PEFT + Trainer peer and a bag-of-words floor.

Protocol (`bench/adapt_tasks.json` names the tasks): held-out classification tasks of the task
bank from several settings, with 2 to 10+ labels, plus label-remapped variants (labels replaced
by letters or unrelated words, so only the demonstrations tell the mapping). Two disjoint
subsets: `search` (recipes are chosen on it) and `report` (the headline figures; never tuned
on). Per task and seed: k label-balanced demonstrations from the train split
(`model.bank.kshot`), the same test queries for every seed and variant (100, or all when
fewer). Every variant sees exactly the same demonstrations and queries:

    icl           in-context prediction, no training (the service's `mode: none` before calibration)
    default       `model.adapt.adapt` with `model.recipe.DEFAULT` (what POST /tasks does with no knobs)
    peft_trainer  the peer a practitioner writes: a fresh PEFT LoRA (r=8, alpha 16, dropout 0.05, q_proj
                  and v_proj: PEFT's defaults for llama) trained by `transformers.Trainer` with the
                  causal-LM loss on the output tokens of "input\\noutput" (no demonstrations in
                  context), AdamW lr 1e-3 with linear decay, batch 4, 10 epochs; its options are then
                  scored by mean log-likelihood per token with no demonstrations in context (its
                  adapter merged into the weights our scorer reads: PeftModel's function, faster)
    tfidf_lr      scikit-learn TF-IDF (word 1-2 grams + char 2-5 grams) + logistic regression: the service's
                  bag-of-words head (`model.head`) alone
    <name>        any recipe given with --recipe NAME='{"loss": "lm", ...}' (overrides of DEFAULT); "mode":
                  "full" adapts the full weights, "checkpoint": ID starts from a meta-trained
                  checkpoint of the data dir's registry (its inner lr unless "lr" is given)

Metrics per variant: macro-F1 and accuracy (0-100), the collapse figures (share of the gold
labels predicted at least once; share of predictions taken by the most-predicted label), the
seconds per task (adaptation + prediction), and for LLM variants the macro-F1 that the same raw
scores give with no calibration and with batch calibration on the test queries themselves (an
oracle: it needs the test set). `margins` are paired differences by task and seed with a 95%
bootstrap interval over tasks (`model.metrics.paired`).

Every result is journaled as it comes (--out DIR/journal.jsonl); the same command resumes.
The last line printed is JSON:
{"k": 16, "subset": "report", "results": {"icl": {...}, "default": {...}, ...}, "margins": {...}}

    python bench/adapt_quality.py --subset report --k 16 --seeds 100,13    # the headline (~75 min on 2 cores)
    python bench/adapt_quality.py --quick --variants icl,a,b --recipe a='{"epochs": 4}' --recipe b='{"lr": 3e-3}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model  # noqa: E402,F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)
import torch  # noqa: E402
from model.adapt import adapt  # noqa: E402
from model.bank import kshot, load_bank  # noqa: E402
from model.calibration import option_prior, prior_of  # noqa: E402
from model.evaluate import fitting  # noqa: E402
from model.head import Head, combine  # noqa: E402
from model.lm import LM, LoraSpec  # noqa: E402
from model.loading import load_lm, model_folder  # noqa: E402
from model.metrics import accuracy, macro_f1, paired  # noqa: E402
from model.prompts import Formatter  # noqa: E402
from model.recipe import DEFAULT, ICL, Recipe  # noqa: E402
from model.retrieval import task_embeddings  # noqa: E402
from model.scoring import predict  # noqa: E402
from model.settings import get_settings  # noqa: E402
from model.task import Example, Task  # noqa: E402

TASKS_FILE = Path(__file__).with_name("adapt_tasks.json")
SEEDS = (100, 13, 21)
LETTERS = [chr(ord("A") + i) for i in range(26)]
# unrelated, single-token-ish English words: a mapping the label's meaning cannot give away
WORDS = ["apple", "river", "chair", "cloud", "pencil", "garden", "window", "tiger", "violin", "bottle",
         "mountain", "candle", "rocket", "basket", "island", "lemon", "mirror", "forest", "hammer", "planet"]
PEER = dict(r=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"), lr=1e-3, epochs=10, batch=4)
log = logging.getLogger("bench.adapt_quality")


# --------------------------------------------------------------------------- tasks
class Remapped:
    """A bank task whose labels are replaced (fixed per task): letters or unrelated words."""

    def __init__(self, task, how: str):
        labels = list(task.options)
        rng = random.Random(f"remap:{task.name}:{how}")
        new = LETTERS[: len(labels)] if how == "letters" else rng.sample(WORDS, len(labels))
        if how == "letters":
            rng.shuffle(new)  # so that the first label is not always "A"
        self.map = dict(zip(labels, new))
        self.base, self.name, self.options, self.instruction = task, f"{task.name}+{how}", new, None

    def split(self, name: str) -> list[Example]:
        return [Example.model_construct(input=e.input, output=self.map[e.output], options=None)
                for e in self.base.split(name)]

    @property
    def train(self) -> list[Example]:
        return self.split("train")


def load_tasks(subset: str, data_dir: Path) -> list:
    spec = json.loads(TASKS_FILE.read_text())[subset]
    bank = load_bank(data_dir)
    out = []
    for entry in spec:
        t = bank.task(entry["task"])
        out.append(Remapped(t, entry["remap"]) if entry.get("remap") else t)
    return out


# --------------------------------------------------------------------------- variants
@dataclass
class Start:
    """A meta-trained checkpoint to start from: its parameters (LoRA init or full weights), its
    Adam moments when it shares them, and the inner lr it was meta-trained with."""

    ckpt_id: str
    params: dict
    state: Any
    lr: float | None


def load_start(data_dir: Path, ckpt_id: str, lm: LM) -> Start:
    from model import checkpoints

    params, state, meta = checkpoints.load(data_dir, ckpt_id, lm.device, lm.dtype)
    checkpoints.check_compatible(meta, lm)
    return Start(ckpt_id, params, state if meta.get("shared_moments") else None, checkpoints.inner_lr(meta, meta["space"]))


def run_llm(lm: LM, fmt: Formatter, task: Task, queries: Sequence[Example], recipe: Recipe, seed: int,
            mode: str = "lora", untrained: dict | None = None, start: Start | None = None) -> dict[str, Any]:
    """Adapt with the recipe (when it trains) and predict; raw scores kept for the calibration analysis.

    `untrained` memoises the raw scores of recipes that train nothing, per prompt (in-context
    prediction with and without calibration scores the same prompts): the second one reuses them
    and is charged the first one's prediction seconds. `start`: begin from a meta-trained
    checkpoint (as the service does with an active one), in context too."""
    t0 = time.perf_counter()
    begin = start.params if start else None
    trained = recipe.epochs > 0  # (min_demos may still make it 0 steps: then the weights are the start's)
    params, prior, epochs, steps, stopped = begin, None, 0.0, 0, None
    embeddings = None
    if trained:
        if start and start.lr and recipe.lr is None:  # the checkpoint's own inner lr, as the service uses it
            recipe = recipe.but(lr=start.lr)
        # the service's time budget per adaptation (it binds from a few hundred demonstrations on)
        a = adapt(lm, task, recipe, mode, start=begin, state=start.state if start else None, seed=seed, fmt=fmt,
                  time_budget_s=get_settings().adapt_time_budget_s)
        params, prior, epochs, embeddings = {**(begin or {}), **a.params}, a.prior, a.epochs, a.embeddings
        steps, stopped = a.steps, a.stopped
    else:
        embeddings = task_embeddings(lm, fmt, task, recipe)  # once, as adaptation time does
        if recipe.calibrate:
            prior = option_prior(lm, task, params, recipe, fmt, embeddings)
    t1 = time.perf_counter()
    # what the raw scores depend on: the prompt (fixed or retrieved), the scoring and the weights
    memo = None if trained or untrained is None else \
        (recipe.predict_demos, recipe.length_norm, start and start.ckpt_id, embeddings is not None and recipe.retrieve)
    if memo in (untrained or {}):
        raw, predict_s = untrained[memo]
    else:
        preds = predict(lm, task, queries, params, recipe.but(calibrate=False), None, fmt, embeddings=embeddings)
        raw, predict_s = [[p.scores[o] for o in task.options] for p in preds], time.perf_counter() - t1
        if memo is not None:
            untrained[memo] = raw, predict_s
    head = None
    if recipe.head:  # the bag-of-words head's log-probabilities, joined to the scores in `metrics`
        head, head_s = head_rows(task, queries, seed, untrained)
        predict_s += head_s
    return {"raw": raw, "prior": prior, "head": head, "head_weight": recipe.head, "epochs": epochs, "steps": steps,
            "stopped": stopped, "adapt_s": t1 - t0, "predict_s": predict_s}


def run_peft(lm: LM, fmt: Formatter, task: Task, queries: Sequence[Example], seed: int) -> dict[str, Any]:
    """The practitioner's loop: PEFT LoRA + transformers.Trainer, causal-LM loss on the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    budget = get_settings().adapt_time_budget_s

    class Budget(TrainerCallback):
        """The service's time budget per adaptation, for the peer too: training stops after the
        step under way once it is spent (10 epochs of 1,000 rows take longer)."""

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            if time.perf_counter() - t0 >= budget:
                control.should_training_stop = True
            return control

    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(model_folder(get_settings().base_model, get_settings().data_dir),
                                                dtype=torch.float32, local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=PEER["r"], lora_alpha=PEER["alpha"], lora_dropout=PEER["dropout"],
                                            target_modules=list(PEER["targets"]), task_type="CAUSAL_LM"))
    rows = []
    for d in task.demonstrations:
        r = fmt.row(d.input, d.output)
        rows.append({"input_ids": r.ctx + r.target, "labels": [-100] * len(r.ctx) + r.target})

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.tensor([b["input_ids"] + [lm.eos_id] * (n - len(b["input_ids"])) for b in batch])
        labels = torch.tensor([b["labels"] + [-100] * (n - len(b["labels"])) for b in batch])
        mask = torch.tensor([[1] * len(b["input_ids"]) + [0] * (n - len(b["input_ids"])) for b in batch])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=PEER["batch"], num_train_epochs=PEER["epochs"],
            learning_rate=PEER["lr"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            logging_strategy="no", save_strategy="no", report_to=[], seed=seed, use_cpu=True,
            disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Budget()])
        trainer.train()
    t1 = time.perf_counter()
    recipe = ICL.but(predict_demos=0)
    raw = predict(lm, task, queries, merged(lm, model), recipe, None, fmt)
    t2 = time.perf_counter()
    done, planned = trainer.state.global_step, trainer.state.max_steps
    return {"raw": [[p.scores[o] for o in task.options] for p in raw], "prior": None,
            "epochs": PEER["epochs"] * done / max(planned, 1), "steps": done,
            "stopped": "time_budget" if done < planned else None, "adapt_s": t1 - t0, "predict_s": t2 - t1}


def merged(lm: LM, peer: Any) -> dict[str, torch.Tensor]:
    """The peer's adapter merged into the weights it adapts (W + alpha/r B A), as overrides our
    scorer takes whatever layers its own LoRA sits on: the function PeftModel computes."""
    own = dict(lm.model.named_parameters())
    mine = dict(peer.named_parameters())
    out = {}
    for n, a in mine.items():
        if ".lora_A." in n:
            module = n.split(".lora_A.")[0]
            b = mine[n.replace(".lora_A.", ".lora_B.")]
            w = f"{module}.base_layer.weight" if f"{module}.base_layer.weight" in own else f"{module}.weight"
            out[w] = (own[w] + PEER["alpha"] / PEER["r"] * b @ a).detach()
    return out


def head_rows(task: Task, queries: Sequence[Example], seed: int, memo: dict | None = None) -> tuple[list | None, float]:
    """The service's bag-of-words head (`model.head.Head`, fit with the adaptation's seed, as the
    worker fits it) on the queries: log-probabilities in the task's option order (None where it
    has nothing to separate), and the seconds it took; computed once per task and seed in `memo`."""
    if memo is not None and "head" in memo:
        return memo["head"]
    t0 = time.perf_counter()
    head = Head.fit(task, seed)
    rows = None if head is None else \
        [[lp[o] for o in task.options] for lp in head.log_probs([q.input for q in queries], task.options)]
    out = rows, time.perf_counter() - t0
    if memo is not None:
        memo["head"] = out
    return out


def run_tfidf(task: Task, queries: Sequence[Example], seed: int, memo: dict | None = None) -> dict[str, Any]:
    """The bag-of-words peer alone: the service's own head."""
    raw, seconds = head_rows(task, queries, seed, memo)
    return {"raw": raw, "prior": None, "epochs": 0, "adapt_s": seconds, "predict_s": 0.0}


# --------------------------------------------------------------------------- metrics
def metrics(options: list[str], raw: list[list[float]], golds: list[str], prior: dict[str, float] | None,
            llm: bool, head: list[list[float]] | None = None, weight: float = 0.0) -> dict[str, float]:
    """`head`: the bag-of-words head's log-probabilities per query, joined as predict joins them
    (`model.head.combine`), whatever the shift."""
    def decide(shift: dict[str, float] | None) -> list[str]:
        shift = shift or {}
        out = []
        for i, row in enumerate(raw):
            scores = {o: row[j] - shift.get(o, 0.0) for j, o in enumerate(options)}
            if head is not None:
                scores = combine(scores, dict(zip(options, head[i])), weight)
            out.append(max(options, key=scores.__getitem__))
        return out

    preds = decide(prior)
    counts = Counter(preds)
    out = {"macro_f1": 100 * macro_f1(preds, golds), "accuracy": 100 * accuracy(preds, golds),
           "labels_predicted_share": 100 * len(set(preds) & set(golds)) / len(set(golds)),
           "top_label_share": 100 * max(counts.values()) / len(preds)}
    if llm:
        out["macro_f1_uncalibrated"] = 100 * macro_f1(decide(None), golds)
        out["macro_f1_test_calibrated"] = 100 * macro_f1(decide(prior_of([dict(zip(options, r)) for r in raw])), golds)
    return out


def summarise(entries: dict[str, dict[str, list[dict]]]) -> dict[str, Any]:
    """Per variant: every metric's mean over tasks of the mean over seeds, plus per-task/seed F1."""
    out = {}
    for v, per_task in entries.items():
        if not per_task:
            continue
        keys = next(iter(per_task.values()))[0]["metrics"].keys()
        res: dict[str, Any] = {}
        for key in keys:
            res[key] = sum(sum(e["metrics"][key] for e in es) / len(es) for es in per_task.values()) / len(per_task)
        res["seconds"] = sum(sum(e["adapt_s"] + e["predict_s"] for e in es) / len(es) for es in per_task.values()) / len(per_task)
        res["adapt_seconds"] = sum(sum(e["adapt_s"] for e in es) / len(es) for es in per_task.values()) / len(per_task)
        res["tasks"] = len(per_task)
        res["per_task"] = {t: sum(e["metrics"]["macro_f1"] for e in es) / len(es) for t, es in per_task.items()}
        res["per_seed"] = {t: [e["metrics"]["macro_f1"] for e in es] for t, es in per_task.items()}
        out[v] = res
    return out


def margins(results: dict[str, Any], pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    report = {"results": results}
    out = {}
    for a, b in pairs:
        if a in results and b in results:
            p = paired(report, a, b)
            out[f"{a}-{b}"] = {"diff": p["diff"], "ci95": p["ci95"], "tasks": p["tasks"], "separated": p["separated"]}
    return out


def markdown(summary: dict[str, Any], k: int, subset: str, seeds: Sequence[int], gaps: dict[str, Any] | None = None) -> str:
    names = list(summary)
    tasks = list(dict.fromkeys(t for v in summary.values() for t in v["per_task"]))
    lines = [f"# adapt_quality: k={k}, subset {subset}, seeds {list(seeds)}", "",
             "| variant | macro-F1 | accuracy | gold labels predicted % | top label % | F1 uncalibrated | F1 test-batch calibrated | s/task |",
             "|---|---|---|---|---|---|---|---|"]
    for v in names:
        r = summary[v]
        f = lambda key: "-" if key not in r else f"{r[key]:.1f}"  # noqa: E731
        lines.append(f"| {v} | {f('macro_f1')} | {f('accuracy')} | {f('labels_predicted_share')} | {f('top_label_share')} "
                     f"| {f('macro_f1_uncalibrated')} | {f('macro_f1_test_calibrated')} | {f('seconds')} |")
    lines += ["", "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{summary[v]['per_task'].get(t, float('nan')):.1f}" for v in names) + " |")
    if gaps:
        lines += ["", "| paired by task and seed | macro-F1 difference | 95% interval over tasks | separated |", "|---|---|---|---|"]
        for pair, g in gaps.items():
            lines.append(f"| {pair.replace('-', ' - ', 1)} | {g['diff']:+.1f} | [{g['ci95'][0]:+.1f}, {g['ci95'][1]:+.1f}] "
                         f"| {'yes' if g['separated'] else 'no'} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def config_key(name: str, recipe: Recipe | None, lora: LoraSpec, mode: str = "lora", k: int = 16,
               ckpt_id: str | None = None) -> str:
    """What a journaled result depends on. `min_demos` counts only where it changes the steps at
    this k, `retrieve` only where there are more demonstrations than it, `head` only where it is
    on (so results from before any existed still match)."""
    fields = recipe.to_dict() if recipe else None
    every_layer = LoraSpec(8, 16, ("q_proj", "v_proj"), None)  # the layout of the first runs: their keys name none
    if fields and (k >= recipe.min_demos or not recipe.epochs):
        del fields["min_demos"]
    if fields and (recipe.retrieve is None or k <= recipe.retrieve):  # retrieval cannot apply (model.retrieval.applies)
        del fields["retrieve"]
    if fields and not recipe.head:  # no head: as before the field existed
        del fields["head"]
    peer = PEER if name == "peft_trainer" else {"solver": "saga"} if name == "tfidf_lr" else None  # (lbfgs before)
    if name == "peft_trainer" and k > 64:  # the time budget cannot bind below (k=64: 160 short steps, ~30 s)
        peer = {**peer, "time_budget_s": get_settings().adapt_time_budget_s}
    body = json.dumps({"name": name, "recipe": fields, "peer": peer}
                      | ({"lora": lora.__dict__} if recipe and recipe.epochs and lora != every_layer and mode == "lora" else {})
                      | ({"mode": mode} if mode != "lora" else {}) | ({"checkpoint": ckpt_id} if ckpt_id else {}),
                      sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", default="report", choices=("search", "report"))
    ap.add_argument("--quick", action="store_true", help="the search subset, 2 seeds (recipe search)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--seeds", default=None, help="comma-separated (default 100,13,21; --quick 100,13)")
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--variants", default="icl,default,peft_trainer,tfidf_lr")
    ap.add_argument("--recipe", action="append", default=[], help="NAME=JSON: a recipe variant (overrides of DEFAULT)")
    ap.add_argument("--tasks", default=None, help="comma-separated task names to keep (of the subset)")
    ap.add_argument("--against", default=None, help="also compare every variant with this one (paired margins)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    s = get_settings()
    data_dir = args.data_dir or s.data_dir
    subset = "search" if args.quick else args.subset
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(SEEDS[:2] if args.quick else SEEDS)
    recipes: dict[str, Recipe] = {"icl": ICL, "default": DEFAULT}
    modes: dict[str, str] = {}
    starts: dict[str, str] = {}  # variant -> checkpoint id
    for spec in args.recipe:
        name, _, body = spec.partition("=")
        fields = json.loads(body)
        modes[name] = fields.pop("mode", "lora")
        if "checkpoint" in fields:
            starts[name] = fields.pop("checkpoint")
        recipes[name] = DEFAULT.but(**fields)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in recipes and v not in ("peft_trainer", "tfidf_lr")]
    if unknown:
        ap.error(f"unknown variants {unknown}: give them with --recipe NAME=JSON")
    out = args.out or Path(f"bench/results/adapt_quality-{subset}-k{args.k}")
    out.mkdir(parents=True, exist_ok=True)
    journal = out / "journal.jsonl"
    known: dict[str, dict] = {}
    if journal.is_file():
        for line in journal.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:  # a killed run's last line
                continue
            known[e["key"]] = e

    lm = load_lm(s.base_model, data_dir, "cpu", LoraSpec.of(s))
    fmt = Formatter(lm.encode, s.prompt_format, s.context_tokens)
    loaded = {c: load_start(data_dir, c, lm) for c in set(starts.values())}
    tasks = load_tasks(subset, data_dir)
    if args.tasks:
        keep = set(args.tasks.split(","))
        tasks = [t for t in tasks if t.name in keep]
    entries: dict[str, dict[str, list[dict]]] = {v: {} for v in variants}
    for bt in tasks:
        for seed in seeds:
            task, queries = fitting(fmt, *kshot(bt, args.k, seed, n_test=args.n_test))
            if task is None:
                log.warning("%s: nothing fits the prompt budget; skipped", bt.name)
                continue
            golds = [q.output for q in queries]
            untrained: dict = {}  # this task and seed's raw scores of recipes that train nothing, and its head
            for v in variants:
                recipe = recipes.get(v)
                key = f"{v}|{config_key(v, recipe, lm.lora, modes.get(v, 'lora'), args.k, starts.get(v))}|{bt.name}|{args.k}|{seed}|{len(queries)}"
                if key not in known:
                    if v == "tfidf_lr":
                        r = run_tfidf(task, queries, seed, untrained)
                    elif v == "peft_trainer":
                        r = run_peft(lm, fmt, task, queries, seed)
                    else:
                        r = run_llm(lm, fmt, task, queries, recipe, seed, modes.get(v, "lora"), untrained,
                                    loaded.get(starts.get(v)))
                    r["metrics"] = metrics(task.options, r["raw"], golds, r["prior"], v != "tfidf_lr", r.get("head"),
                                           r.get("head_weight", 0.0))
                    r["key"] = key
                    r["config"] = {"recipe": recipe.to_dict() if recipe else None, "lora": lm.lora.__dict__ if recipe else None,
                                   "peer": PEER if v == "peft_trainer" else None, "mode": modes.get(v, "lora"),
                                   "checkpoint": starts.get(v)}
                    # the raw scores (and golds) stay: other decision rules (ensembles) can be scored offline
                    r["golds"], r["options"] = golds, list(task.options)
                    with open(journal, "a") as f:
                        f.write(json.dumps(r) + "\n")
                    known[key] = r
                    log.info("%s seed %d %s: F1 %.1f (uncal %.1f, test-cal %.1f) top %.0f%% %.1fs", bt.name, seed, v,
                             r["metrics"]["macro_f1"], r["metrics"].get("macro_f1_uncalibrated", float("nan")),
                             r["metrics"].get("macro_f1_test_calibrated", float("nan")), r["metrics"]["top_label_share"],
                             r["adapt_s"] + r["predict_s"])
                entries[v].setdefault(bt.name, []).append(known[key])
    summary = summarise(entries)
    base = "icl" if "icl" in summary else None
    pairs = [(v, w) for v in summary for w in summary
             if v != w and (w in (base, args.against) or (v == "default" and w != base))]
    result = {"k": args.k, "subset": subset, "seeds": seeds, "n_test": args.n_test, "tasks": [t.name for t in tasks],
              "recipes": {v: recipes[v].to_dict() for v in variants if v in recipes},
              "results": {v: {k: r[k] for k in r if k not in ("per_seed",)} for v, r in summary.items()},
              "margins": margins(summary, pairs)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(summary, args.k, subset, seeds, result["margins"]))
    print(markdown(summary, args.k, subset, seeds, result["margins"]))
    slim = {"k": args.k, "subset": subset,
            "results": {v: {k: round(r[k], 2) for k in ("macro_f1", "accuracy", "labels_predicted_share", "top_label_share", "seconds")}
                        for v, r in summary.items()},
            "margins": result["margins"]}
    print(json.dumps(slim))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
