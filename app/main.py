"""The FastAPI app: validates, authorizes and enqueues; the Celery worker does the model work."""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager

import kombu.exceptions
import redis
import redis.asyncio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import metrics
from app.adaptations import job_sender, reap_forever, sender
from app.batcher import Batcher
from app.errors import http_error, invalid_request, over_quota, respond
from app.openapi import service_openapi
from app.quotas import OverQuota, Quotas
from app.watcher import StatusWatcher
from app.limits import BodyLimit, Larger
from app.routes import admin, health, predict, tasks, usage, v1
from app.routing import Router
from contract.config import fingerprint, local_config, model_lock
from contract.queues import PREDICT, make_celery
from contract.store import Store
from model.bank.catalog import setting_names
from model.settings import Settings, get_settings
from model.tokens import count_tokens, fast_tokenizer

EXAMPLE_KEYS = Settings.model_fields["api_keys"].default
EXAMPLE_ADMIN_KEY = Settings.model_fields["admin_key"].default


def check_keys(s: Settings) -> None:
    """Outside development the example keys would let anyone in: refuse to start with them."""
    if s.env == "development":
        return
    if set(s.api_keys) & set(EXAMPLE_KEYS) or s.admin_key == EXAMPLE_ADMIN_KEY or not s.admin_key:
        raise RuntimeError(
            f"MAMLSERVE_ENV={s.env} but the example API keys are configured: set MAMLSERVE_API_KEYS "
            "(JSON {key: tenant}) and MAMLSERVE_ADMIN_KEY to secrets of your own"
        )
    if any(len(k) < 16 for k in s.api_keys) or len(s.admin_key) < 16:
        raise RuntimeError(f"MAMLSERVE_ENV={s.env}: API keys must be at least 16 characters")


class TokenCounter:
    """Counts tokens with the base model's tokenizer (model/tokens.py: no torch), loaded on first use
    (the API never loads the model)."""

    def __init__(self, s: Settings):
        self.s = s
        self.tok = None
        self.lock = threading.Lock()

    def __call__(self, text: str) -> int:
        with self.lock:  # a fast tokenizer used from several threads can fail with "Already borrowed"
            if self.tok is None:
                with model_lock(self.s.data_dir):  # its folder may still be converting (contract/config.py)
                    self.tok = fast_tokenizer(self.s.base_model, self.s.data_dir)
            return count_tokens(self.tok, text)


def create_app(s: Settings | None = None) -> FastAPI:
    s = s or get_settings()
    check_keys(s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.count_tokens("warm up")  # load the tokenizer before the first request
        # The configuration this API creates tasks for: tasks go to workers that run it (contract/config.py).
        app.state.config = local_config(s)
        app.state.fingerprint = fingerprint(app.state.config)
        reaper = asyncio.create_task(reap_forever(
            app.state.store, sender(app.state.celery, app.state.fingerprint),
            job_sender(app.state.celery, app.state.fingerprint), every_s=s.reap_every_s,
            dead_after_s=s.worker_dead_after_s, enqueue_grace_s=s.enqueue_grace_s))
        yield
        reaper.cancel()
        await app.state.replies.aclose()
        app.state.store.r.close()
        app.state.cache.close()

    app = FastAPI(
        title="mamlserve",
        version="0.1.0",
        description="Teach a language model a new task from a handful of examples (MAML-en-LLM).",
        lifespan=lifespan,
    )
    app.state.settings = s
    app.state.config, app.state.fingerprint = {}, None  # set when the app starts (lifespan)
    app.state.store = Store.from_url(s.redis_url)
    app.state.cache = redis.Redis.from_url(s.cache_redis_url)
    app.state.celery = make_celery(s)
    app.state.count_tokens = TokenCounter(s)

    app.state.replies = redis.asyncio.Redis.from_url(s.redis_url, decode_responses=True)
    app.state.watcher = StatusWatcher(app.state.store)
    app.state.quotas = Quotas(app.state.replies)

    app.state.router = router = Router(app.state.celery, app.state.replies, s)

    async def send(task_id: str, route: str, groups: list) -> list:
        return (await router.call(route, PREDICT, [task_id, groups]))["groups"]

    app.state.batcher = Batcher(send, s.predict_linger_ms / 1000, s.max_predict_inputs, router.lanes)
    for module in (tasks, predict, v1, usage, admin, health):
        app.include_router(module.router)
    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    @app.exception_handler(kombu.exceptions.OperationalError)
    async def unavailable(request, exc):  # after tenacity's retries: say so instead of a bare 500
        return respond(request, 503, f"the service's Redis is unavailable ({type(exc).__name__}); retry",
                       {"Retry-After": "2"})

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.openapi = lambda: app.openapi_schema or setattr(app, "openapi_schema", service_openapi(app, s, setting_names())) \
        or app.openapi_schema
    app.add_exception_handler(OverQuota, over_quota)
    metrics.setup(app, app.state.store, s.env == "production" if s.metrics_need_key is None else s.metrics_need_key)
    adapter_b64 = 4 * -(-s.max_adapter_bytes // 3)
    tasks_limit = Larger(s.max_upload_bytes + adapter_b64, "max_upload_bytes + max_adapter_bytes, base64-encoded",
                         "adapter", s.max_upload_bytes, "max_upload_bytes")
    app.add_middleware(BodyLimit, max_bytes=s.max_request_bytes, larger={("POST", "/tasks"): tasks_limit})
    return app


app = create_app()
