"""Macro-F1 against the number of demonstrations n, per method: a table and a plot from
bench/adapt_quality.py journals (one per n), on the tasks and seeds every n ran.

Entries run with the head (the recipe's `head`) count as `<variant>+head`, and give `<variant>`
scored offline without it. Entries that kept their raw scores without it also give `<variant>+head`: the variant's calibrated scores
joined with the bag-of-words head (the journal's `tfidf_lr` entry of the same task, seed and
queries) as the service joins them at weight `--head` (`model.head.combine`), scored offline.

    python bench/n_curve.py bench/results/report-k16-raw bench/results/report-n64 \\
        bench/results/report-n256 bench/results/report-n1000 --out bench/results/n-curve

The last line printed is JSON: {"n": [...], "tasks": [...], "f1": {method: {n: F1}}, "seconds": {...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble import combined  # noqa: E402
from model.metrics import macro_f1  # noqa: E402


def rows(folder: Path, head: float) -> list[dict]:
    """(variant, task, n, seed, F1, seconds) per journal entry, plus the offline `+head` ones."""
    entries = []
    for line in (folder / "journal.jsonl").read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    last = {}  # the latest entry per variant, task, n and seed (a re-run config replaces the earlier)
    for e in entries:
        variant, _, task, n, seed, _q = e["key"].split("|")
        last[(variant, task, n, seed)] = e
    out, peers = [], {}
    for e in last.values():
        variant, _, task, n, seed, _q = e["key"].split("|")
        if variant == "tfidf_lr" and "raw" in e:
            peers[(task, n, seed)] = e
        out.append({"variant": variant, "task": task, "n": int(n), "seed": int(seed),
                    "f1": e["metrics"]["macro_f1"], "seconds": e["adapt_s"] + e["predict_s"], "entry": e})
    for r in list(out):
        e, peer = r["entry"], peers.get((r["task"], str(r["n"]), str(r["seed"])))
        if e.get("head"):  # run with the head: its F1 is the +head one; the model alone scored offline
            r["variant"] += "+head"
            alone = combined(e, {"raw": [[0.0] * len(e["options"])] * len(e["raw"])}, 0.0)
            out.append({**r, "variant": r["variant"][: -len("+head")], "f1": 100 * macro_f1(alone, e["golds"])})
        elif peer is not None and r["variant"] not in ("tfidf_lr", "peft_trainer") and "raw" in e:  # ours, not peers
            f1 = 100 * macro_f1(combined(e, peer, head), e["golds"])
            out.append({**r, "variant": r["variant"] + "+head", "f1": f1, "seconds": r["seconds"] + peer["adapt_s"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--head", type=float, default=1.0, help="the head's weight (model.recipe.DEFAULT.head)")
    ap.add_argument("--seeds", default="100", help="comma-separated: the seeds to keep")
    ap.add_argument("--out", type=Path, default=Path("bench/results/n-curve"))
    args = ap.parse_args()
    seeds = {int(s) for s in args.seeds.split(",")}
    every = [r for f in args.folders for r in rows(f, args.head) if r["seed"] in seeds]
    ns = sorted({r["n"] for r in every})
    tasks_at = {n: {r["task"] for r in every if r["n"] == n and r["variant"] == "tfidf_lr"} for n in ns}
    common = sorted(set.intersection(*tasks_at.values()))
    cell: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in every:
        if r["task"] in common:
            cell[r["variant"]][r["n"]].append(r)
    # a method's mean at n only where it ran every common task and seed there
    full = len(common) * len(seeds)
    f1 = {v: {n: sum(r["f1"] for r in rs) / len(rs) for n, rs in by.items() if len(rs) == full} for v, by in cell.items()}
    secs = {v: {n: sum(r["seconds"] for r in rs) / len(rs) for n, rs in by.items() if len(rs) == full} for v, by in cell.items()}
    f1 = {v: d for v, d in f1.items() if d}
    lines = [f"# macro-F1 against n: {len(common)} tasks ({', '.join(common)}), seeds {sorted(seeds)}", "",
             "| method | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for v in sorted(f1, key=lambda v: -max(f1[v].values())):
        lines.append(f"| {v} | " + " | ".join(f"{f1[v][n]:.1f} ({secs[v][n]:.0f} s)" if n in f1[v] else "-" for n in ns) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in sorted(f1):
        xs = sorted(f1[v])
        ax.plot(xs, [f1[v][n] for n in xs], marker="o", label=v, linestyle="--" if "+head" not in v and v != "tfidf_lr" else "-")
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("demonstrations n")
    ax.set_ylabel("macro-F1 (mean over tasks)")
    ax.set_title(f"{len(common)} report tasks, seeds {sorted(seeds)}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(json.dumps({"n": ns, "tasks": common, "f1": {v: {str(n): round(x, 2) for n, x in d.items()} for v, d in f1.items()},
                      "seconds": {v: {str(n): round(x, 1) for n, x in d.items()} for v, d in secs.items() if v in f1}}))


if __name__ == "__main__":
    main()
