"""Decision rules scored offline from a bench/adapt_quality.py journal: a language-model variant's
calibrated option scores combined with the TF-IDF + LR peer's log-probabilities, per weight.

    score(option) = log_softmax(llm - prior)(option) + w * log p_tfidf(option)    (model.head.combine)

w = 0 is the LLM variant alone; large w the peer alone. Both entries must be for the same task,
seed and queries (the journal's raw scores and golds). The last line printed is JSON:
{"llm": VARIANT, "weights": {w: mean macro-F1}, "llm_alone": F1, "tfidf_alone": F1}.

    python bench/ensemble.py bench/results/report-n256/journal.jsonl served
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.head import combine  # noqa: E402
from model.metrics import macro_f1, paired  # noqa: E402
from model.recipe import DEFAULT  # noqa: E402

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 1e3)


def entries(path: Path, variant: str) -> dict[tuple[str, str], tuple[dict, dict]]:
    """(task, seed) -> (the LLM variant's entry, the peer's), where both kept their raw scores."""
    by: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        name, _, task, k, seed, _n = e["key"].split("|")
        if "raw" in e and name in (variant, "tfidf_lr"):
            by[(task, f"{k}|{seed}")][name] = e
    return {key: (v[variant], v["tfidf_lr"]) for key, v in by.items() if len(v) == 2}


def combined(llm: dict, peer: dict, w: float) -> list[str]:
    """The LLM entry's calibrated scores joined with the peer's log-probabilities as the service's
    head joins them (`model.head.combine`)."""
    options, shift = llm["options"], llm["prior"] or {}
    out = []
    for row, lp in zip(llm["raw"], peer["raw"]):
        scores = combine({o: s - shift.get(o, 0.0) for o, s in zip(options, row)},
                         {o: max(v, -30.0) for o, v in zip(options, lp)}, w)  # an option the peer never saw: -30
        out.append(max(options, key=scores.__getitem__))
    return out


def main() -> None:
    path, variant = Path(sys.argv[1]), sys.argv[2]
    pairs = entries(path, variant)
    per_task: dict[float, dict[str, list[float]]] = {w: defaultdict(list) for w in WEIGHTS}
    for (task, _), (llm, peer) in sorted(pairs.items()):
        for w in WEIGHTS:
            per_task[w][task].append(100 * macro_f1(combined(llm, peer, w), llm["golds"]))
    mean = {w: sum(sum(v) / len(v) for v in t.values()) / max(len(t), 1) for w, t in per_task.items()}
    for w in WEIGHTS:
        cells = " ".join(f"{t.split('.')[-1][:14]}={sum(v) / len(v):.1f}" for t, v in per_task[w].items())
        print(f"w={w:<7g} mean {mean[w]:.1f}  {cells}")
    # the recipe's weight against the model alone and the head alone, paired by task and seed
    report = {"results": {str(w): {"per_seed": dict(t)} for w, t in per_task.items()}}
    gaps = {}
    for other, name in ((0.0, "llm_alone"), (WEIGHTS[-1], "head_alone")):
        p = paired(report, str(DEFAULT.head), str(other))
        gaps[f"head {DEFAULT.head:g} - {name}"] = {"diff": round(p["diff"], 2), "ci95": [round(x, 2) for x in p["ci95"]],
                                                   "tasks": p["tasks"]}
        print(f"w={DEFAULT.head:g} - {name}: {p['diff']:+.1f} [{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}] over {p['tasks']} tasks")
    print(json.dumps({"llm": variant, "pairs": len(pairs), "weights": {str(w): round(m, 2) for w, m in mean.items()},
                      "llm_alone": round(mean[0.0], 2), "tfidf_alone": round(mean[WEIGHTS[-1]], 2), "paired": gaps}))


if __name__ == "__main__":
    main()
