"""The settings: how the committed files in settings/ were made, and the check that they are disjoint.

`python -m model.bank settings` regenerates them from a built bank (the build is deterministic,
so every machine builds the same bank). Per setting: held-out tasks are drawn with a fixed seed
from the held-out pool (at most two per task family, each with a test split of at least 16),
then every meta-train candidate that shares an input text with the held-out side is dropped,
so no task and no input is on both sides (MetaICL's seven settings, adapted to these sources).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model.bank.catalog import SPLITS, Bank, Setting


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    held: Callable[[dict], bool]  # on the manifest's per-task summary
    train: Callable[[dict], bool]
    n_held: int | None  # None: every eligible task is held out
    names: tuple[str, ...] = ()  # held out by name instead of by `held` (those present in the bank)
    family_apart: bool = False  # no meta-train task of a held-out task's family (translations, variants)


def _cls(t: dict) -> bool:
    return t["labels"] > 0 and t["kind"] != "QA"


def _total(t: dict) -> int:
    return t["train"] + t["dev"] + t["test"]


USER_TASKS = (
    "bigbench.intent_recognition", "bigbench.multiemo.all_sentence_en", "evals.sarcasm", "rotten_tomatoes.subjectivity",
    "rotten_tomatoes.sentiment", "bigbench.social_support", "wordnet.lexname_noun", "wordnet.lexname_verb",
    "bigbench.fact_checker.politifact", "bigbench.fact_checker.fever", "evals.bias_detection", "wordnet.part_of_speech",
    "bigbench.metaphor_boolean", "bigbench.emojis_emotion_prediction", "bigbench.irony_identification",
    "evals.portuguese-sarcasm", "bigbench.fact_checker.covid19_scientific", "bigbench.sports_understanding",
)

RULES = [
    Rule("class_to_class", "classification (one label set, QA with lettered answers aside) -> unseen classification tasks",
         lambda t: _cls(t), lambda t: _cls(t), 20),
    Rule("non_class_to_class", "tasks without a label set -> unseen classification tasks",
         lambda t: _cls(t), lambda t: t["labels"] == 0, 20),
    Rule("non_nli_to_nli", "everything but NLI -> NLI",
         lambda t: t["kind"] == "NLI", lambda t: t["kind"] != "NLI", None),
    Rule("non_qa_to_qa", "everything but QA -> QA",
         lambda t: t["kind"] == "QA", lambda t: t["kind"] != "QA", 20),
    Rule("non_paraphrase_to_paraphrase",
         "everything but paraphrase -> paraphrase (meaning-preserving rewrites and synonyms: the packages hold no "
         "MRPC/QQP-style paraphrase identification task)",
         lambda t: t["kind"] == "paraphrase", lambda t: t["kind"] != "paraphrase", None),
    Rule("hr_to_lr", "high-resource (>= 5000 train examples) -> low-resource (< 300 examples in all)",
         lambda t: _total(t) < 300, lambda t: t["train"] >= 5000, 20),
    Rule("unseen_source", "BIG-bench only -> OpenAI evals tasks (a source never seen in meta-training)",
         lambda t: t["source"] == "evals", lambda t: t["source"] == "bigbench", 24),
    Rule("user_tasks",
         "everything else -> text classification of the kind users bring (sentiment, emotion, intent, sarcasm, "
         "subjectivity, support, fact-checking, bias, metaphor, word senses and parts of speech); no meta-train task "
         "of a held-out task's family (the other multiemo languages are translations of the same opinions)",
         lambda t: False, lambda t: True, None, names=USER_TASKS, family_apart=True),
    # The evaluation's own split (bench/adapt_tasks.json holds user_tasks' held-out side and one NLI task
    # held out in non_nli_to_nli, which user_tasks meta-trains on): meta-train on the union of every
    # setting's meta-train tasks, less any task that shares a family or an input text with those.
    Rule("union_to_user_tasks",
         "the union of every setting's meta-train tasks -> the tasks of bench/adapt_tasks.json (user_tasks' "
         "held-out side and bigbench.presuppositions_as_nli); no meta-train task of a held-out task's family",
         lambda t: False, lambda t: True, None, names=USER_TASKS + ("bigbench.presuppositions_as_nli",),
         family_apart=True),
]
MIN_TEST = 16
PER_FAMILY = 2
MAX_CONFLICTS = 3  # a sampled held-out task that would evict more meta-train tasks than this is skipped


def family(name: str) -> str:
    return ".".join(name.split(".")[:2])


def task_inputs(bank: Bank, name: str, cache: dict | None = None) -> set[int]:
    """The task's input texts (stripped), as in-process hashes: equal texts always hash equal, so a
    shared text is never missed (a collision could only add a false alarm); ints keep a whole bank in memory."""
    if cache is not None and name in cache:
        return cache[name]
    out = set()
    for s in SPLITS:
        with open(bank.root / name / f"{s}.jsonl", encoding="utf-8") as f:
            out.update(hash(json.loads(line)["input"].strip()) for line in f if line.strip())
    if cache is not None:
        cache[name] = out
    return out


def check_disjoint(bank: Bank, st: Setting, cache: dict | None = None) -> list[str]:
    """Problems with a setting on this bank (empty when it is clean)."""
    problems = [f"task {n} is on both sides" for n in sorted(set(st.meta_train) & set(st.held_out))]
    present = set(bank.names)
    problems += [f"task {n} is not in the bank" for n in st.meta_train + st.held_out if n not in present]
    held: set[int] = set()
    for n in st.held_out:
        if n in present:
            held |= task_inputs(bank, n, cache)
    for n in st.meta_train:
        if n in present and (k := len(task_inputs(bank, n, cache) & held)):
            problems.append(f"meta-train task {n} shares {k} input(s) with the held-out side")
    return problems


def make_setting(bank: Bank, rule: Rule, inputs: dict[str, set[int]]) -> Setting:
    """inputs: every task's input texts (write_settings reads them once for all rules)."""
    tasks = bank.manifest["tasks"]
    if rule.names:
        pool = sorted(n for n in rule.names if n in tasks and tasks[n]["test"] >= MIN_TEST)
    else:
        pool = sorted(n for n, t in tasks.items() if rule.held(t) and t["test"] >= MIN_TEST)
    train_pool = sorted(n for n, t in tasks.items() if rule.train(t))
    if rule.n_held is None:
        held = pool
    else:
        random.Random(rule.name).shuffle(pool)
        held, fams = [], Counter()
        for n in pool:
            if len(held) == rule.n_held:
                break
            if fams[family(n)] >= PER_FAMILY:
                continue
            if sum(1 for m in train_pool if m != n and inputs[m] & inputs[n]) > MAX_CONFLICTS:
                continue
            held.append(n)
            fams[family(n)] += 1
    held_inputs = set().union(*(inputs[n] for n in held))
    held_families = {family(n) for n in held} if rule.family_apart else set()
    clash = [n for n in train_pool if n not in held and (inputs[n] & held_inputs or family(n) in held_families)]
    meta_train = [n for n in train_pool if n not in held and n not in clash]
    shared = "inputs (or a family)" if rule.family_apart else "inputs"
    desc = rule.description + (f". {len(clash)} meta-train candidates dropped for sharing {shared} with held-out tasks" if clash else "")
    return Setting(rule.name, meta_train, sorted(held), desc)


def write_settings(bank: Bank, out: Path, only: list[str] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    inputs = {n: task_inputs(bank, n) for n in bank.names}
    for rule in RULES:
        if only and rule.name not in only:
            continue
        st = make_setting(bank, rule, inputs)
        path = out / f"{rule.name}.json"
        path.write_text(json.dumps({"name": st.name, "description": st.description, "bank_build_key": bank.manifest["build_key"],
                                    "meta_train": st.meta_train, "held_out": st.held_out}, indent=1) + "\n")
        paths.append(path)
    return paths
