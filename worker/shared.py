"""`python -m worker.shared`: put what the command-line tools made on one machine's disk into the
service's shared store (contract/blobs.py, beside the records), where every worker reads it.

    python -m worker.shared bank class_to_class [more settings]   # a setting's tasks, for meta-training
    python -m worker.shared checkpoint v0003-maml-lora-class_to_class   # a checkpoint `model.meta_train` wrote
    python -m worker.shared list                                        # what the store holds

Sources are this machine's data dir (`--data-dir`, default MAMLSERVE_DATA_DIR); the store is the
one MAMLSERVE_REDIS_URL names. Each copy is idempotent: run it again after a rebuild.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from contract.blobs import shared
from model import checkpoints
from model.bank.catalog import export, load_bank
from model.settings import get_settings


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m worker.shared", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=None, help="where the bank and checkpoints are (default: settings)")
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("bank", help="a setting's tasks (meta-train and held-out)").add_argument("settings", nargs="+")
    sub.add_parser("checkpoint", help="checkpoints from the data dir's registry").add_argument("ids", nargs="+")
    sub.add_parser("list", help="the store's checkpoints and bank")
    a = ap.parse_args(argv)
    s = get_settings()
    data_dir = a.data_dir or s.data_dir
    store = shared(s)
    if a.what == "bank":
        names = export(load_bank(data_dir), a.settings, store)
        print(f"{len(names)} tasks of {', '.join(a.settings)} in the service's store")
    elif a.what == "checkpoint":
        for ckpt in a.ids:
            checkpoints.copy(data_dir, store, ckpt)
            print(f"{ckpt} in the service's registry")
    else:
        for m in checkpoints.list_checkpoints(store):
            print(f"checkpoint {m['id']}\t{m.get('status')}\tstep {m.get('step')}/{m.get('total_steps')}")
        try:
            bank = load_bank(store)
            print(f"bank: {len(bank.names)} tasks, for {', '.join(bank.manifest.get('exported_for', []))}")
        except FileNotFoundError:
            print("bank: none")


if __name__ == "__main__":
    main()
