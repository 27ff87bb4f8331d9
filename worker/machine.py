"""The base model on this machine: its files converted once (prepare_model), how exports name it
(base_info), and the cores torch may use (cores)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from contract.config import model_lock
from model.files import SMOLLM2, base_id, model_folder
from model.lm import LM
from model.settings import Settings


def prepare_model(s: Settings) -> None:
    """Convert the base model once (the GGUF read takes ~20 s) before anything races for it."""
    if s.base_model != "tiny":
        with model_lock(s.data_dir):
            model_folder(s.base_model, s.data_dir)



def base_info(s: Settings, lm: LM) -> dict[str, str]:
    """The base model as exports name it: its Hugging Face id, the sha256 of its weights, and
    where the service keeps it (relative to the data dir: no server path leaves the service)."""
    info = {"id": base_id(s.base_model, s.data_dir), "name": lm.name, "sha256": lm.sha256}
    if s.base_model == SMOLLM2:
        info["folder"] = f"$MAMLSERVE_DATA_DIR/models/{model_folder(s.base_model, s.data_dir).name}"
    return info


def cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity (taskset, cpusets), capped by a cgroup v2
    CPU quota (docker --cpus). torch's default counts every core of the machine, and threads
    beyond the quota only wait for each other."""
    n = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return n

