"""Request and response bodies. The task itself is model.task.Task, the schema model/ shares."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from contract.records import JobState, TaskStatus
from model.task import Query, Task

Status = TaskStatus  # the routes' name for it


class Error(BaseModel):
    detail: str


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """Errors under /v1, in OpenAI's shape."""

    error: OpenAIErrorBody


class Adaptation(BaseModel):
    """How to adapt. Nothing needs to be given: the recipe (`model.recipe.DEFAULT`, with the
    operator's MAMLSERVE_ADAPT_RECIPE overrides) sets the loss, the epochs, the lr and the
    calibration, and its steps follow from the number of demonstrations (none below the recipe's
    min_demos, 5: there, calibrated in-context prediction did better). A field given here
    overrides the recipe's; `epochs` or `steps` trains whatever the number."""

    model_config = ConfigDict(extra="forbid", strict=True)  # JSON's true is not 1

    space: Literal["lora", "full", "none"] | None = Field(
        None, validation_alias=AliasChoices("space", "mode"),
        description="the parameters adapted: lora | full | none (in context only); default lora. `mode`, its old name, "
        "is accepted too")
    epochs: float | None = Field(None, ge=0, le=1000, description="passes over the demonstrations; default: the recipe's")
    steps: int | None = Field(None, ge=0, description="exact number of Adam steps (overrides epochs); at most the setting adapt_max_steps")
    lr: float | None = Field(None, gt=0, le=1, description="learning rate; default: the checkpoint's meta-training inner lr "
                              "when adapting in the space it was meta-trained in, else the recipe's lr for the mode")
    head: float | None = Field(None, ge=0, le=100, description="weight of the bag-of-words head (TF-IDF + logistic "
                               "regression fit on every demonstration) whose log-probabilities join the options' scores; "
                               "0: the language model alone; default: the recipe's")
    seed: int = Field(0, ge=0, le=2**31 - 1)


class TaskCreate(Task):
    """A task to learn: demonstrations (+ instruction, options), how to adapt, and from which checkpoint."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "demonstrations": [
            {"input": "I loved this film", "output": "positive"},
            {"input": "a dull, boring mess", "output": "negative"},
            {"input": "wonderful acting", "output": "positive"},
            {"input": "I want my money back", "output": "negative"},
        ],
        "options": ["positive", "negative"],
        "adaptation": {"space": "lora"},
    }]})

    adaptation: Adaptation = Field(default_factory=Adaptation)
    checkpoint: str | None = Field(None, max_length=200, description="meta-trained checkpoint id; default: the active one, else the base model")
    adapter: str | None = Field(None, description="instead of adapting: a PEFT LoRA adapter folder, zipped and base64-"
                                "encoded (at most max_adapter_bytes zipped), made for this service's base model. The "
                                "task is ready at once and served with it; its demonstrations calibrate the options' "
                                "prior. adaptation and checkpoint must then be left out")


class Progress(BaseModel):
    step: int = 0
    steps: int = 0
    epoch: float = 0.0
    epochs: float = 0.0
    loss: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    eta_s: float | None = Field(None, description="while adapting: seconds left for the training steps (the mean "
                                "step time so far x the steps left, at most the time budget's rest); null otherwise")
    stopped: str | None = Field(None, description="why training ended before the planned steps: time_budget (the "
                                "setting adapt_time_budget_s; step says how many ran of steps); null: all ran")


class TaskUsage(BaseModel):
    adapt_seconds: float | None = Field(None, description="worker seconds the adaptation took (0 for an imported adapter; "
                                        "null until it is done)")


class TaskInfo(BaseModel):
    id: str
    status: Status
    status_url: str
    error: str | None = None
    space: str = Field(description="the parameters adapted: lora | full | none (in context only)")
    mode: str = Field(description="the same as space, under its old name (kept for clients that read it)")
    steps: int
    epochs: float
    lr: float
    recipe: dict[str, Any] = Field(default_factory=dict, description="every choice the adaptation made (model.recipe.Recipe)")
    checkpoint: str
    imported: bool = Field(False, description="served with an adapter brought to POST /tasks, not adapted here")
    progress: Progress
    usage: TaskUsage = Field(default_factory=TaskUsage)
    attempts: int = 0
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None


class TaskPage(BaseModel):
    items: list[TaskInfo]
    total: int
    offset: int
    limit: int
    next_offset: int | None


def _as_query(v: Any) -> Any:
    return {"input": v} if isinstance(v, str) else v


# A text or a Query; the errors then name the Query's fields, not the union's branches.
QueryIn = Annotated[Query, BeforeValidator(_as_query),
                    WithJsonSchema({"anyOf": [{"type": "string"}, Query.model_json_schema()]})]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON's true is not 1

    task_id: str = Field(min_length=1, max_length=64)
    inputs: list[QueryIn] = Field(min_length=1, description="texts, or {input, options} for per-query options")
    wait_s: float = Field(0, ge=0, description="wait up to this long (at most predict_wait_max_s) for the task to be ready")


class OptionScore(BaseModel):
    option: str
    score: float = Field(description="the option's log-likelihood (mean per token, or the sum, as the task's recipe "
                                     "says) minus its calibrated prior when the recipe calibrates; the highest wins")


class PredictionOut(BaseModel):
    input: str
    output: str
    scores: list[OptionScore] | None = Field(None, description="every option's score; null for generation")


class PredictUsage(BaseModel):
    tokens_scored: int = Field(description="tokens the worker scored for this call: each input with each of its "
                               "options, or with max_new_tokens to generate (what max_predict_tokens limits)")


class PredictResponse(BaseModel):
    task_id: str
    predictions: list[PredictionOut]
    usage: PredictUsage


class MetaTrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON's true is not 1

    setting: str = Field(min_length=1, max_length=100, description="task-bank setting to meta-train on")
    method: Literal["maml", "fomaml", "reptile", "metaicl"] = "maml"  # = model.meta_train.METHODS
    space: Literal["lora", "full"] = "lora"
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="overrides of the meta-training config")


class JobInfo(BaseModel):
    id: str
    state: JobState
    status_url: str
    setting: str
    method: str
    space: str
    hyperparameters: dict[str, Any]
    progress: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    error: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    usage: dict[str, float | None] = Field(default_factory=dict, description="seconds: how long the run took (so far)")


class JobPage(BaseModel):
    items: list[JobInfo]
    total: int
    offset: int
    limit: int
    next_offset: int | None


class Checkpoint(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    active: bool = False


class Checkpoints(BaseModel):
    active: str
    items: list[Checkpoint]
