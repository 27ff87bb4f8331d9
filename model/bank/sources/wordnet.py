"""WordNet 3.0 data.<pos> files, parsed directly (no NLTK): synonym, definition, antonym,
hypernym, category and part-of-speech RawTasks."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from model.bank.sources.raw import Converted, RawTask, kind_of

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
