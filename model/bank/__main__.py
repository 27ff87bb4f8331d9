"""The bank's command line: python -m model.bank build | stats | export | settings (see model/bank/__init__.py)."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path

from model.bank.build import BuildConfig, build
from model.bank.catalog import SETTINGS_DIR, export, load_bank


def stats_text(bank, names: list[str] | None = None, summary: bool = False) -> str:
    """Per setting: its tasks (meta-train, then held-out) with kind, label count and split sizes.
    summary: meta-train as counts by source and kind; held-out still task by task."""
    lines = [f"bank {bank.root}: {len(bank.names)} tasks, {len(bank.manifest.get('excluded', {}))} excluded"]
    row = "  {:<3} {:<58} {:<15} {:>6} {:>6} {:>5} {:>5}"
    for s in names or bank.setting_names():
        st = bank.setting(s)
        lines += ["", f"== {s}: {len(st.meta_train)} meta-train, {len(st.held_out)} held-out. {st.description}",
                  row.format("", "task", "kind", "labels", "train", "dev", "test")]
        if summary:
            c = Counter((t["source"], t["kind"]) for n in st.meta_train if (t := bank.manifest["tasks"].get(n)))
            lines.append("  MT  " + ", ".join(f"{src}/{kind} {k}" for (src, kind), k in sorted(c.items())))
        for side, tasks in (("MT", [] if summary else st.meta_train), ("HO", st.held_out)):
            for n in tasks:
                t = bank.manifest["tasks"].get(n)
                if t is None:
                    lines.append(f"  {side}  {n}  (missing from this bank)")
                    continue
                lines.append(row.format(side, n, t["kind"], t["labels"] or "-", t["train"], t["dev"], t["test"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.bank", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fetch the source packages and build data_dir/bank")
    b.add_argument("--data-dir", help="default: settings.data_dir (MAMLSERVE_DATA_DIR)")
    for f in fields(BuildConfig):
        b.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    b.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("stats", help="per setting: tasks with kind, label count, example counts")
    s.add_argument("--data-dir")
    s.add_argument("--setting", action="append", help="only these settings (repeatable)")
    s.add_argument("--summary", action="store_true", help="meta-train side as counts by source and kind")
    e = sub.add_parser("export", help="copy the tasks of some settings into another data dir (to carry a small bank)")
    e.add_argument("--data-dir")
    e.add_argument("--setting", action="append", required=True, help="repeatable")
    e.add_argument("--out", required=True, help="the data dir to write (its bank/ folder)")
    g = sub.add_parser("settings", help="(maintainers) regenerate model/bank/settings/*.json from a built bank")
    g.add_argument("--data-dir")
    g.add_argument("--out", default=str(SETTINGS_DIR))
    g.add_argument("--only", action="append", help="regenerate only these settings (repeatable)")
    a = p.parse_args(argv)
    if a.data_dir:
        data_dir = Path(a.data_dir).expanduser()
    else:  # the CLI's default comes from the environment (MAMLSERVE_DATA_DIR), as the service's does
        from model.settings import get_settings

        data_dir = get_settings().data_dir
    if a.cmd == "build":
        cfg = BuildConfig(**{f.name: getattr(a, f.name) for f in fields(BuildConfig)})
        t0 = time.time()
        build(data_dir, cfg, progress=not a.no_progress)
        print(f"done in {time.time() - t0:.1f} s")
    elif a.cmd == "stats":
        print(stats_text(load_bank(data_dir), a.setting, a.summary))
    elif a.cmd == "export":
        names = export(load_bank(data_dir), a.setting, Path(a.out))
        print(f"exported {len(names)} tasks to {Path(a.out) / 'bank'}")
    else:
        from model.bank.splits import write_settings

        for path in write_settings(load_bank(data_dir), Path(a.out), a.only):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
