"""The one settings object of mamlserve: every knob, read from env vars prefixed MAMLSERVE_.

model/ reads only the model-side fields; app/ and worker/ read the rest. Lists are given
as JSON in the environment (MAMLSERVE_LORA_TARGETS='["q_proj","v_proj"]').
"""

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.recipe import LORA_LAYERS


# The repository's shipped checkpoints (model/shipped/checkpoints/<id>/: model/checkpoints.py ship)
SHIPPED_DIR = Path(__file__).with_name("shipped")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAMLSERVE_", env_file=".env", extra="ignore")

    # --- where things live
    data_dir: Path = Field(Path.home() / ".cache" / "mamlserve", description="this machine's model conversion, logs "
                           "and the command-line tools' bank and checkpoints (the service keeps its state in Redis)")
    shipped_dir: Path | None = Field(SHIPPED_DIR, description="meta-trained checkpoints that ship with the service "
                                     "(a registry folder); a worker installs the one made for its base model and "
                                     "activates it when none was ever chosen. Empty: none")

    @field_validator("shipped_dir", mode="before")
    @classmethod
    def _no_shipped(cls, v: Any) -> Any:
        return None if v in ("", None) else v

    # --- base model: "smollm2" (embedded), "tiny" (random, for tests), a HF folder or a .gguf file
    base_model: str = "smollm2"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # float32 everywhere by default. Measured on an H100 with SmolLM2 (bench/adapt_latency.py):
    # fp32 adapts faster than bf16 (LoRA 0.75 s vs 1.03 s: a 135M model is launch-bound and
    # autocast adds casts), and full mode's small steps (lr 1e-5) round away in bf16 compute
    # (support loss 1.25 -> 1.12 vs 0.60). "auto" (bf16 on CUDA) is for larger models.
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"

    # --- task limits (validated on every task; 422 names the field and the limit)
    max_demonstrations: int = Field(5000, ge=1, description="per task, in a JSON body or an upload (413 beyond)")
    max_options: int = 32
    max_text_tokens: int = 256  # per input / output / option / instruction
    max_text_chars: int = 4000  # cheap guard before tokenizing
    context_tokens: int = 1024  # prompt budget; demonstrations are dropped first to fit
    max_new_tokens: int = 32  # generation tasks

    # --- prompt
    prompt_format: str = "direct"  # direct | channel (MetaICL)

    # --- LoRA space (one config for adaptation and meta-training)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = ["q_proj", "v_proj"]
    # None: every layer; negative indices count from the top (default: model.recipe.LORA_LAYERS)
    lora_layers: list[int] | None = None if LORA_LAYERS is None else list(LORA_LAYERS)

    # --- test-time adaptation: the recipe is model.recipe.DEFAULT; operators may override its
    # fields here, as JSON (MAMLSERVE_ADAPT_RECIPE='{"epochs": 4}'); requests override both
    adapt_mode: Literal["lora", "full", "none"] = "lora"
    adapt_recipe: dict[str, Any] = {}
    adapt_max_steps: int = 400  # a request or recipe asking for more steps is refused (422)
    adapt_time_budget_s: float = Field(300.0, gt=0, description="per adaptation: its training steps stop after the "
                                       "step under way once this many seconds are spent (the task is ready with the "
                                       "steps taken; its progress says so). 5 min: n = 1,000 on 2 cores (issue 17)")

    # --- service (app/ and worker/)
    env: str = "development"  # development | production
    redis_url: str = "redis://127.0.0.1:6379/0"  # broker, results, task records (noeviction, AOF)
    cache_redis_url: str = "redis://127.0.0.1:6380/0"  # adapted weights (allkeys-lru)
    weights_ttl_s: int = 7 * 24 * 3600
    blob_chunk_bytes: int = Field(8 << 20, ge=1024, description="values in Redis (weights, checkpoints, the bank) are "
                                  "stored in chunks of at most this many bytes (a Redis string holds at most 512 MB)")
    worker_lru_size: int = 8
    api_keys: dict[str, str] = {"dev-key": "dev"}  # key -> tenant
    admin_key: str = "dev-admin-key"
    metrics_need_key: bool | None = Field(None, description="/metrics answers only with the admin key in X-API-Key; "
                                          "None: so in production (env=production), open otherwise")
    max_request_bytes: int = 1_000_000
    max_upload_bytes: int = Field(8_000_000, ge=1, description="POST /tasks: a body of demonstrations, JSON or an "
                                  "upload (JSONL, CSV, multipart); 5,000 rows of ~1,500 characters (413 beyond)")
    max_predict_inputs: int = 64
    predict_wait_max_s: float = 60.0
    # per-tenant quotas (app/quotas.py): beyond them a 429 with Retry-After
    max_waiting_predicts: int = Field(32, ge=1, description="per tenant: /predict calls in flight at once (waiting "
                                      "for their task to be ready or for the worker)")
    max_weights_bytes: int = Field(2_000_000_000, ge=0, description="per tenant: bytes of adapted weights its tasks "
                                   "hold (in the cache Redis; imported adapters in the records Redis); an adaptation "
                                   "beyond it fails")
    max_predict_tokens: int = Field(32_768, ge=1, description="per /predict call: tokens scored, over its inputs and "
                                    "each input's options (input + option; input + max_new_tokens to generate)")
    max_requests_per_minute: int = Field(600, ge=1, description="per tenant: authenticated requests in any 60 s")
    max_tasks: int = Field(1000, ge=1, description="per tenant: task records held (DELETE /tasks/{id} frees one)")
    max_adapt_seconds_per_hour: float = Field(3600.0, gt=0, description="per tenant: worker seconds of adaptation "
                                              "in any hour; a new adaptation beyond it waits (429 with Retry-After)")
    max_event_streams: int = Field(16, ge=1, description="per tenant: GET /tasks/{id}/events streams open at once")
    max_adapter_bytes: int = Field(64_000_000, ge=1, description="an adapter zip brought to POST /tasks (413 beyond)")
    max_completion_tokens: int = Field(256, ge=1, description="/v1 completions: the most max_tokens may ask for")
    idempotency_ttl_s: int = Field(24 * 3600, ge=1, description="how long an Idempotency-Key's first answer is kept")
    adapt_time_limit_s: int = 1800
    meta_train_time_limit_s: int = 6 * 3600
    visibility_timeout_s: int = Field(0, ge=0, description="broker redelivery of a message its worker never acknowledged; "
                                      "0: per queue, its task's hard time limit + 10 min (adapt: 40 min, meta: 6 h 10 min)")
    predict_timeout_s: float = 300.0  # how long /predict waits for the worker (a re-adaptation included)
    predict_linger_ms: float = 10.0  # an idle task's first /predict waits this long for concurrent calls to batch with
    torch_threads: int = 0  # the worker's torch threads; 0: the cores it may use (affinity, cgroup quota)

    # --- crash recovery: a run whose worker stopped beating is queued again by the API's reaper
    heartbeat_s: float = Field(1.0, gt=0, description="how often a worker process reports itself and the run it is on")
    worker_dead_after_s: float = Field(10.0, gt=0, description="a worker silent this long is gone (/readyz, the reaper)")
    predict_dead_after_s: float = Field(4.0, gt=0, description="a worker holding a /predict call and silent this long "
                                        "is dead: the call goes to another worker (a prediction is safe to repeat)")
    reap_every_s: float = Field(5.0, gt=0, description="how often the API looks for runs whose worker is gone")
    enqueue_grace_s: float = Field(30.0, gt=0, description="a task not enqueued after this long (its creator died) is enqueued by the reaper")


@lru_cache
def get_settings() -> Settings:
    return Settings()
