"""Meta-training's public names and its command line (`python -m model.meta_train --help`); the code
lives in model/meta/, one module per concern (see model/meta/__init__.py)."""

from model.meta.batching import BatchedTasks
from model.meta.checkpoint import resumed_config, run_meta, setting_fingerprint
from model.meta.cli import main
from model.meta.episodes import Draw, fitting_episode, remap_labels
from model.meta.forward import grad_checkpointing, training_mode
from model.meta.method import TaskMethod, TaskResult
from model.meta.outer import MetaTrainer, initial_params
from model.meta.run import Progress, meta_train
from model.meta.tasks import SynthTask, TaskSource, is_classification, synthetic_source, synthetic_task, task_source
from model.meta_config import METHODS, ORDER, MetaTrainConfig

__all__ = [
    "METHODS", "ORDER", "BatchedTasks", "Draw", "MetaTrainConfig", "MetaTrainer", "Progress", "SynthTask", "TaskMethod",
    "TaskResult", "TaskSource", "fitting_episode", "grad_checkpointing", "initial_params", "is_classification",
    "main", "meta_train", "remap_labels", "resumed_config", "run_meta", "setting_fingerprint",
    "synthetic_source", "synthetic_task", "task_source", "training_mode",
]

if __name__ == "__main__":
    import typer

    typer.run(main)
