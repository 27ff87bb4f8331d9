#!/usr/bin/env bash
# The Celery worker, exactly as serve.sh and docker-compose run it: convert the model once, put
# back what a killed worker left unacknowledged (the first worker on the broker only), then
# consume the queues with one prefork child that loads the model (never CUDA in the parent).
# Extra arguments go to `celery worker` (e.g. -n meta@%h for a second worker).
set -euo pipefail
cd "$(dirname "$0")/.."
# Sleeping, not spinning, OpenMP threads: with the cores shared (API, Redis, a second worker, other
# jobs) spinning threads slowed a SmolLM2 prediction from 0.5 s to 11 s on 2 cores.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
[ "${MAMLSERVE_PREPARE:-1}" = 0 ] || "$PY" -m worker.prepare
# Skip with MAMLSERVE_RECOVER=0 when another worker shares the broker (its running tasks look the same).
[ "${MAMLSERVE_RECOVER:-1}" = 0 ] || "$PY" -m worker.recover
exec "$PY" -m celery -A worker.celery_app worker -P prefork -c 1 -Q "${MAMLSERVE_QUEUES:-predict,adapt,meta}" \
    --loglevel INFO "$@"
