#!/usr/bin/env bash
# The HTTP API, exactly as serve.sh and docker-compose run it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec "$PY" -m uvicorn app.main:app --host "${MAMLSERVE_HOST:-127.0.0.1}" --port "${MAMLSERVE_PORT:-8000}" \
    --log-level info --proxy-headers "$@"
