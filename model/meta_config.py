"""The meta-training config: what a run depends on, validated without torch, so the API checks a
job's hyperparameters as the worker will build them (model/meta/ runs it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.prompts import Formatter
from model.recipe import DEFAULT, LORA_LAYERS, OUTER_LR

if TYPE_CHECKING:
    from model.lm import LM

METHODS = ("maml", "fomaml", "reptile", "metaicl")
ORDER = {"maml": 2, "fomaml": 1, "reptile": 0, "metaicl": None}  # the inner loop's order (None: no inner loop)


class MetaTrainConfig(BaseModel):
    """Everything a meta-training run depends on; stored whole in the checkpoint's meta.json."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["maml", "fomaml", "reptile", "metaicl"] = "maml"  # = METHODS (and app.schemas' choices)
    space: Literal["lora", "full"] = "lora"
    setting: str = Field("class_to_class", description="a task-bank setting, or 'synthetic' (built in code)")
    base_model: str = Field("smollm2", description="model spec (model.loading.load_lm)")
    steps: int = Field(100, ge=0, description="outer steps in total (a resumed run counts the parent's)")
    tasks_per_step: int = Field(4, ge=1)
    inner_steps: int = Field(1, ge=1, description="inner Adam steps per task (maml, fomaml, reptile)")
    inner_lr: float | None = Field(None, gt=0, description="None: the recipe's lr for the space (model.recipe.DEFAULT)")
    inner_context: Literal["recipe", "sampled"] = Field(
        "recipe", description="'recipe': the test-time recipe's loss, support and query examples all scored in the "
        "prediction prompt (the support set in context, each example's own copy masked); 'sampled': each example "
        "with `context_demos` support examples drawn at random, LM loss (every run before this field existed)")
    outer_lr: float | None = Field(None, gt=0, description="None: model.recipe.OUTER_LR for the space")
    support_size: int = Field(8, ge=2, description="support examples drawn per task")
    support_batch: int = Field(4, ge=1, description="support queries per inner step")
    query_size: int = Field(4, ge=1, description="query examples per task")
    context_demos: int = Field(4, ge=0, description="demonstrations in context of each support/query example "
                               "(inner_context 'sampled')")
    remap: float = Field(0.0, ge=0, le=1, description="share of classification episodes whose labels are replaced by "
                         "random letters or unrelated words (symbol tuning): only the demonstrations tell the mapping")
    shared_moments: bool | None = Field(None, description="one Adam state for inner and outer; None: on for maml/fomaml "
                                        "(reptile: never)")
    max_grad_norm: float | None = Field(1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    prompt_format: str = "direct"
    context_tokens: int = Field(256, ge=32, description="prompt budget of every training sequence")
    grad_checkpointing: bool = False
    batch_tasks: bool = Field(False, description="run a step's tasks as one vmapped batch (not with grad_checkpointing)")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (params stay fp32); ignored on CPU")
    seed: int = 0
    log_every: int = Field(10, ge=1)
    save_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: only at the end or on stop)")
    resume: str | None = Field(None, description="checkpoint id to continue from")
    device: str = "auto"
    data_dir: Path | None = Field(None, description="the bank, the model files and the checkpoint registry (needed "
                                  "unless the caller hands meta_train a model, a task source and a registry)")
    # the LoRA space; a checkpoint only loads on the layout it was trained on (model.lm.LoraSpec)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = ["q_proj", "v_proj"]
    lora_layers: list[int] | None = None if LORA_LAYERS is None else list(LORA_LAYERS)
    tag: str | None = Field(None, description="free text stored in meta.json")

    @model_validator(mode="after")
    def _combinations(self) -> MetaTrainConfig:
        if self.batch_tasks and self.grad_checkpointing:
            raise ValueError("batch_tasks and grad_checkpointing cannot be combined (the checkpointing wrapper "
                             "re-installs parameters per layer, which torch.func.vmap does not see)")
        if self.batch_tasks and self.inner_context == "recipe":
            raise ValueError("batch_tasks needs inner_context 'sampled': scoring in the prediction prompt (a shared "
                             "KV cache, per-row masks built in Python) has no torch.func.vmap form")
        if self.method == "reptile" and self.shared_moments:
            raise ValueError("reptile cannot share Adam moments: its outer 'gradient' is a parameter displacement "
                             "(θ - θ'), not a gradient, and its statistics would precondition the inner steps wrongly")
        return self

    # --- resolved values (defaults that depend on the method, space or settings)
    @property
    def order(self) -> int | None:
        return ORDER[self.method]

    @property
    def shared(self) -> bool:
        if not self.order:  # metaicl has no inner loop; reptile's outer moments are not gradient moments
            return False
        return True if self.shared_moments is None else self.shared_moments

    @property
    def lr_inner(self) -> float:
        return self.inner_lr if self.inner_lr is not None else DEFAULT.lr_for(self.space)

    @property
    def lr_outer(self) -> float:
        if self.outer_lr is not None:
            return self.outer_lr
        return OUTER_LR[self.space]

    @classmethod
    def of(cls, s: Any, **fields: Any) -> MetaTrainConfig:
        """`fields` over what a `Settings` says of the model, the LoRA space, the prompt and the data
        dir: what the service's edges (the CLI, the worker) run with."""
        return cls(**{"base_model": s.base_model, "device": s.device, "data_dir": s.data_dir,
                      "prompt_format": s.prompt_format, "lora_r": s.lora_r, "lora_alpha": s.lora_alpha,
                      "lora_targets": list(s.lora_targets), "lora_layers": s.lora_layers, **fields})

    @property
    def dir(self) -> Path:
        if self.data_dir is None:
            raise ValueError("this meta-training run needs a data_dir (for the bank, the model or the registry)")
        return Path(self.data_dir)

    def formatter(self, lm: LM) -> Formatter:
        return Formatter(lm.encode, self.prompt_format, self.context_tokens)
