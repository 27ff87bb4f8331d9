#!/usr/bin/env bash
# The Celery worker, exactly as serve.sh and docker-compose run it: convert the model once, then
# consume its queues with one prefork child that loads the model (never CUDA in the parent).
# Start as many as you like, on as many machines, against the same two Redis: a worker keeps no
# state on its disk and does nothing to the others when it starts (a run whose own worker dies is
# queued again by the API's reaper; a message lost with it comes back after its queue's
# visibility timeout). MAMLSERVE_QUEUES: the roles it takes (predict, adapt, meta; default all).
# Extra arguments go to `celery worker` (e.g. -n meta@%h: each worker needs a name of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
# Sleeping, not spinning, OpenMP threads: with the cores shared (API, Redis, a second worker, other
# jobs) spinning threads slowed a SmolLM2 prediction from 0.5 s to 11 s on 2 cores.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
[ "${MAMLSERVE_PREPARE:-1}" = 0 ] || "$PY" -m worker.prepare
exec "$PY" -m celery -A worker.celery_app worker -P prefork -c 1 -Q "${MAMLSERVE_QUEUES:-predict,adapt,meta}" \
    --loglevel INFO "$@"
