"""An evaluation report written out: results.json, results.md (`markdown`) and results.png (`chart`),
and each checkpoint's summary into its meta.json (`record`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model import checkpoints


def markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    names = list(dict.fromkeys(r.split("/")[0] for r in res))
    lines = [f"# Held-out evaluation: {report['setting']}", "",
             f"{len(report['tasks'])} tasks, k={report['k']}, seeds {report['seeds']}, "
             f"{report['adapt_steps']} adaptation steps, model {report['model']['name']}. "
             "Macro-F1 (classification) or accuracy, 0-100; mean over tasks of the mean / worst seed.", "",
             "| variant | 0-shot | in context (mean) | in context (worst) | adapted (mean) | adapted (worst) "
             "| gold p, in context | gold p, adapted |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(key: str, what: str) -> str:
        r = res.get(key, {})
        val = r.get("gold_prob", {}).get("mean") if what == "gold_prob" else r.get(what)
        return "-" if val is None else f"{val:.1f}"

    for n in names:
        lines.append(f"| {n} | {cell(n + '/zero_shot', 'mean')} | {cell(n + '/icl', 'mean')} | {cell(n + '/icl', 'worst')} "
                     f"| {cell(n + '/adapted', 'mean')} | {cell(n + '/adapted', 'worst')} "
                     f"| {cell(n + '/icl', 'gold_prob')} | {cell(n + '/adapted', 'gold_prob')} |")
    if report.get("comparisons"):
        lines += ["", "Paired differences (row a minus row b, by task and seed; 95% bootstrap interval over tasks):", "",
                  "| a | b | metric | difference | 95% interval | separated |", "|---|---|---|---|---|---|"]
        for c in report["comparisons"]:
            ci = "-" if c["ci95"] is None else f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"
            diff = "-" if c["diff"] is None else f"{c['diff']:+.1f}"
            lines.append(f"| {c['a']} | {c['b']} | {c['metric']} | {diff} | {ci} | {'yes' if c['separated'] else 'no'} |")
    lines += ["", "Per task (mean over seeds):", "", "| task | " + " | ".join(res) + " |", "|---|" + "---|" * len(res)]
    for t in report["tasks"]:
        lines.append(f"| {t} | " + " | ".join(f"{res[r]['per_task'].get(t, float('nan')):.1f}" for r in res) + " |")
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    keys = list(res)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys) + 2), 4.5))
    colors = {"zero_shot": "#999999", "icl": "#4C72B0", "adapted": "#DD8452"}
    xs = range(len(keys))
    nan = float("nan")  # a row with no scored task (every task skipped) draws nothing
    ax.bar(xs, [nan if res[k]["mean"] is None else res[k]["mean"] for k in keys],
           color=[colors.get(k.split("/")[-1], "#55A868") for k in keys])
    ax.scatter(xs, [nan if res[k]["worst"] is None else res[k]["worst"] for k in keys], color="black", marker="_", s=300, zorder=3, label="worst seed")
    ax.set_xticks(list(xs), [_short(k) for k in keys], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("macro-F1 / accuracy (0-100)")
    ax.set_title(f"held-out tasks of {report['setting']} (k={report['k']}, {len(report['seeds'])} seeds)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(key: str) -> str:
    """'v0003-maml-lora-class_to_class/icl' -> 'v0003-maml-lora icl' (the setting is in the title)."""
    name, mode = key.rsplit("/", 1)
    return f"{'-'.join(name.split('-')[:3])} {mode}"


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "chart": out / "results.png"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["markdown"].write_text(markdown(report))
    chart(report, paths["chart"])
    return paths


def record(report: dict[str, Any], data_dir: Path, ckpt_ids: Sequence[str]) -> None:
    """Write each checkpoint's summary into its meta.json."""
    for c in ckpt_ids:
        summary = {m: report["results"][f"{c}/{m}"]["mean"] for m in ("icl", "adapted") if f"{c}/{m}" in report["results"]}
        summary |= {f"{m}_worst": report["results"][f"{c}/{m}"]["worst"] for m in ("icl", "adapted") if f"{c}/{m}" in report["results"]}
        summary |= {"k": report["k"], "seeds": report["seeds"], "tasks": len(report["tasks"]),
                    "adapt_steps": report["adapt_steps"], "adapt_lr": report.get("adapt_lrs", {}).get(c),
                    "base_icl": report["results"]["base/icl"]["mean"]}
        checkpoints.update_meta(data_dir, c, evaluation={report["setting"]: summary})
