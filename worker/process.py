"""This worker process: its name (ME), node and roles, its queues (chosen at startup), its model
(runtime(), loaded once), and the heartbeat that says which run it is on.

Each process beats a heartbeat (contract/store.py WORKERS): its model and configuration
fingerprint, its node (whose direct queue reaches it), its roles, and the run it is on. The API
reads them to route calls (app/routing.py), for /readyz, and to queue again a run whose own
worker stopped beating (app/adaptations.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager
from typing import Any

from celery.signals import celeryd_after_setup, worker_process_init, worker_process_shutdown

from contract.config import fingerprint, local_config
from contract.queues import QUEUES, direct, queue
from model.settings import get_settings
from worker.runtime import Runtime

log = logging.getLogger(__name__)
S = get_settings()

_runtime: Runtime | None = None
_stop = threading.Event()
_beat_lock = threading.Lock()
_on: dict[str, str] = {}  # the task (or job) and run this process is on, sent with every heartbeat
ME = ""  # this process in the heartbeats: host:pid
NODE = ""  # the Celery worker this process belongs to (its direct queue's name), set before the pool forks
ROLES: list[str] = list(QUEUES)  # the roles it was started with (-Q)
_parent = 0  # a pool child's Celery parent process (0: not a pool child)


@celeryd_after_setup.connect
def _queues(sender: str, instance, **_: Any) -> None:
    """Replace the roles given with -Q by this worker's queues: `adapt.<fingerprint>` and
    `meta.<fingerprint>`, shared with the workers of the same configuration, and its direct
    queue for the API's calls (contract/queues.py). In the parent, before the pool forks: the
    children inherit NODE and ROLES; the fingerprint needs no model loaded (its files' hash)."""
    global NODE, ROLES
    NODE = sender
    queues = instance.app.amqp.queues
    ROLES = [r for r in QUEUES if r in (queues.consume_from or QUEUES)]
    fp = fingerprint(local_config(S))
    for name in list(queues.consume_from or queues):
        queues.deselect(name)
    queues.select_add(direct(NODE))  # first: the queue order is the priority order
    for role in ("adapt", "meta"):
        if role in ROLES:
            queues.select_add(queue(role, fp))
    log.info("worker %s: roles %s, configuration %s", NODE, ",".join(ROLES), fp)


def runtime() -> Runtime:
    """The process's model, loaded on first use (the solo pool sends no worker_process_init)."""
    global _runtime, ME
    if _runtime is None:
        ME = f"{socket.gethostname()}:{os.getpid()}"
        _runtime = Runtime(get_settings(), NODE or ME)
        threading.Thread(target=_heartbeat, args=(_runtime,), daemon=True).start()
    return _runtime


def _model_info(rt: Runtime) -> dict[str, Any]:
    return {"model": rt.lm.name, "sha256": rt.lm.sha256, "device": str(rt.lm.device), "node": NODE,
            "roles": ROLES, "fingerprint": rt.fingerprint, "config": rt.config}


def _beat(rt: Runtime) -> None:
    # Under the lock: a beat never carries an older run than one written before it.
    with _beat_lock:
        rt.store.beat(ME, {**_model_info(rt), **_on})


def _heartbeat(rt: Runtime) -> None:
    """Tell /readyz that a process with the model loaded is alive, and the reaper which run it is on.
    A pool child whose Celery parent was killed exits: nothing would take its calls or acknowledge
    its message, and it must not look alive (the API routes calls by heartbeat)."""
    while not _stop.is_set():
        if _parent and os.getppid() != _parent:
            log.error("the worker's parent process %d is gone: exiting", _parent)
            os._exit(1)
        try:
            _beat(rt)
        except Exception:  # Redis away for a moment: the next beat tries again
            log.warning("heartbeat failed", exc_info=True)
        _stop.wait(S.heartbeat_s)
    rt.store.gone(ME)


@contextmanager
def running(rt: Runtime, task_id: str, run: str | None):
    """The heartbeat says this run (of a task, or a meta-training job's) from before the caller
    claims it until after it has let it go."""
    global _on
    with _beat_lock:
        _on = {"task": task_id, "run": run}
    _beat(rt)
    try:
        yield
    finally:
        with _beat_lock:
            _on = {}
        try:
            _beat(rt)
        except Exception:  # the heartbeat thread says it within heartbeat_s
            log.warning("heartbeat failed", exc_info=True)


@worker_process_init.connect
def _load_model(**_: Any) -> None:
    # In the pool child, never the parent: CUDA must not be initialised before the fork.
    global _parent
    _parent = os.getppid()
    runtime()


@worker_process_shutdown.connect
def _unload(**_: Any) -> None:
    _stop.set()
