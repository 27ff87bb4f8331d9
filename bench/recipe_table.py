"""Every configuration a bench/adapt_quality.py journal holds, one row each: the table of the
recipe search. Rows are compared with in-context prediction on the same tasks and seeds (the
journal's `icl` entries), so configurations run on different task subsets stay comparable.

    python bench/recipe_table.py bench/results/search-k16/journal.jsonl > bench/results/recipes-k16.md
    python bench/recipe_table.py --against 'default|f4a93b2768d2' bench/results/report-k16/journal.jsonl

`--against CONFIG` (a row's "variant|hash", or a variant name when one row has it) adds each
row's paired macro-F1 difference from that configuration, over the tasks and seeds both ran,
with a 95% bootstrap interval over tasks (`model.metrics.paired`): how configurations run in
different processes (another LoRA layout, another code version) are compared.
The last line printed is JSON: {"rows": N, "best": {...}, "against": {...}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.metrics import paired  # noqa: E402
from model.recipe import DEFAULT, LORA_LAYERS  # noqa: E402


def load(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def describe(config: dict | None) -> str:
    if not config:
        return ""
    if config.get("recipe") is None and not config.get("peer"):
        return "no LM: TF-IDF + logistic regression (the floor)"
    if config.get("peer"):
        return "PEFT LoRA + transformers.Trainer: " + ", ".join(f"{k} {v}" for k, v in config["peer"].items())
    recipe = config.get("recipe") or {}
    base = DEFAULT.to_dict()
    if recipe.get("lr") == DEFAULT.lr_for(config.get("mode") or "lora"):
        recipe = {**recipe, "lr": base["lr"]}  # the default's lr, written out
    parts = [f"{k}={v}" for k, v in recipe.items() if base.get(k) != v]
    lora = config.get("lora") or {}
    layers = lora.get("layers")
    if lora and recipe.get("epochs") and (list(layers or []) != list(LORA_LAYERS or []) or list(lora.get("targets") or [])
                                          != ["q_proj", "v_proj"] or lora.get("r") != 8):
        where = "every layer" if layers is None else f"layers {list(layers)}"
        parts.append(f"lora r={lora.get('r')} on {','.join(lora.get('targets') or [])}, {where}")
    return ", ".join(parts) or "(the default)"


def versus(a: list[dict], b: list[dict]) -> dict:
    """Paired macro-F1 of runs a minus runs b over the (task, seed)s both have."""
    scores = [{(e["_ts"][0], e["_ts"][2]): e["metrics"]["macro_f1"] for e in es} for es in (a, b)]
    common = sorted(set(scores[0]) & set(scores[1]))
    per = [{}, {}]
    for task, seed in common:
        for side, sc in zip(per, scores):
            side.setdefault(task, []).append(sc[(task, seed)])
    return paired({"results": {"a": {"per_seed": per[0]}, "b": {"per_seed": per[1]}}}, "a", "b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("journals", nargs="+", type=Path, help="bench/adapt_quality.py journal.jsonl files")
    parser.add_argument("--against", help="a row's 'variant|hash', or a variant name: paired differences from it")
    args = parser.parse_args()
    against = args.against
    entries = [e for p in args.journals for e in load(p)]
    icl = {}
    groups: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        variant, cfg, task, k, seed, n = e["key"].split("|")
        e["_ts"] = (task, k, seed)
        groups[f"{variant}|{cfg}|k{k}"].append(e)
        if variant == "icl":
            icl[(task, k, seed)] = e["metrics"]["macro_f1"]
    rows = []
    for name, es in groups.items():
        f1 = [e["metrics"]["macro_f1"] for e in es]
        paired = [e["metrics"]["macro_f1"] - icl[e["_ts"]] for e in es if e["_ts"] in icl]
        tasks = {e["_ts"][0] for e in es}
        rows.append({
            "config": name, "k": name.rsplit("k", 1)[1], "runs": len(es), "tasks": len(tasks),
            "macro_f1": statistics.mean(f1), "vs_icl": statistics.mean(paired) if paired else None,
            "top_label": statistics.mean(e["metrics"]["top_label_share"] for e in es),
            "seconds": statistics.mean(e["adapt_s"] + e["predict_s"] for e in es),
            "what": describe(es[-1].get("config")),
        })
    rows.sort(key=lambda r: (r["k"], -(r["vs_icl"] if r["vs_icl"] is not None else -1e9)))
    ref = None
    if against:
        found = [g for g in groups if g.startswith(against + "|") or g.rsplit("|", 1)[0] == against]
        if len(found) != 1:
            sys.exit(f"--against {against!r} matches {len(found)} configurations: {found}")
        ref = found[0]
        for r in rows:
            r["vs_against"] = versus(groups[r["config"]], groups[ref])
    extra = f" vs {ref.split('|')[0]} (paired, 95% interval) |" if ref else ""
    print(f"| configuration | k | task-seeds (tasks) | macro-F1 | vs in-context, same runs |{extra} top label % | s/task "
          "| what differs from the default |")
    print("|---|---|---|---|---|" + ("---|" if ref else "") + "---|---|---|")
    for r in rows:
        vs = "-" if r["vs_icl"] is None else f"{r['vs_icl']:+.1f}"
        cmp = ""
        if ref:
            v = r["vs_against"]
            cmp = " - |" if v["diff"] is None else f" {v['diff']:+.1f} [{v['ci95'][0]:+.1f}, {v['ci95'][1]:+.1f}] ({v['tasks']} tasks) |"
        print(f"| {r['config'].split('|')[0]} | {r['k']} | {r['runs']} ({r['tasks']}) | {r['macro_f1']:.1f} | {vs} |{cmp} "
              f"{r['top_label']:.0f} | {r['seconds']:.0f} | {r['what']} |")
    # the best of the configurations run on at least half the tasks any configuration ran on
    most = max((r["tasks"] for r in rows), default=0)
    best = max((r for r in rows if r["vs_icl"] is not None and not r["config"].startswith("icl|") and 2 * r["tasks"] >= most),
               key=lambda r: r["vs_icl"], default=None)
    print(json.dumps({"rows": len(rows), "best": {k: v for k, v in best.items() if k != "vs_against"} if best else None,
                      "against": {r["config"]: r["vs_against"] for r in rows} if ref else None}))


if __name__ == "__main__":
    main()
