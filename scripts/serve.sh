#!/usr/bin/env bash
# Run the whole embedded service on this machine: two redis-servers, one Celery worker, uvicorn.
# Installs what is missing on first run (.venv, the package, SmolLM2, redis-server). Ctrl-C stops all.
#
# Environment (all optional):
#   MAMLSERVE_HOST / MAMLSERVE_PORT      where the API listens (127.0.0.1 / 8000)
#   MAMLSERVE_REDIS_PORT                 records + broker redis (6379): AOF on, noeviction
#   MAMLSERVE_CACHE_PORT                 weights cache redis (6380): allkeys-lru
#   MAMLSERVE_CACHE_MAXMEMORY            the cache's memory cap (1gb)
#   MAMLSERVE_META_WORKER=1              two workers: one for predict,adapt and one for meta, so a
#                                        meta-training run never delays predictions (the model is
#                                        then loaded twice, and the two share the CPU/GPU)
#   MAMLSERVE_*                          every setting of model/settings.py (data dir, keys, model...)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

HOST=${MAMLSERVE_HOST:-127.0.0.1}
PORT=${MAMLSERVE_PORT:-8000}
REDIS_PORT=${MAMLSERVE_REDIS_PORT:-6379}
CACHE_PORT=${MAMLSERVE_CACHE_PORT:-6380}
say() { echo "[serve] $*" >&2; }

# --- install what is missing (redis-server, .venv with the project, SmolLM2): one install path for all
scripts/setup.sh >&2
PY=$ROOT/.venv/bin/python

# --- settings every process shares
DATA=$("$PY" -c "from model.settings import get_settings; print(get_settings().data_dir)")
export MAMLSERVE_REDIS_URL=${MAMLSERVE_REDIS_URL:-redis://127.0.0.1:$REDIS_PORT/0}
export MAMLSERVE_CACHE_REDIS_URL=${MAMLSERVE_CACHE_REDIS_URL:-redis://127.0.0.1:$CACHE_PORT/0}
mkdir -p "$DATA/redis/records" "$DATA/redis/cache" "$DATA/logs"

PIDS=()
stop() {
    trap - INT TERM EXIT
    [ -n "${STOPPED:-}" ] && return; STOPPED=1
    say "stopping"
    # API first (no new work), then the worker (TERM: finish the current task), then Redis (AOF flushed).
    [ -n "${API_PID:-}" ] && kill -TERM "$API_PID" 2>/dev/null || true
    for pid in ${WORKER_PID:-} ${META_PID:-}; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in ${WORKER_PID:-} ${META_PID:-}; do
        for _ in $(seq 1 "${MAMLSERVE_STOP_WAIT_S:-30}"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        # Still busy (a long run): a cold stop; the task runs again on the next start (acks_late + recover).
        kill -QUIT "$pid" 2>/dev/null || true
    done
    wait ${API_PID:-} ${WORKER_PID:-} ${META_PID:-} 2>/dev/null || true
    for p in "${REDIS_PORTS[@]:-}"; do [ -n "$p" ] && redis-cli -p "$p" shutdown >/dev/null 2>&1 || true; done
    wait 2>/dev/null || true
    say "stopped"
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

start_redis() {  # port dir args...
    local port=$1 dir=$2; shift 2
    if redis-cli -p "$port" ping >/dev/null 2>&1; then
        say "something already answers on port $port: stop it or set MAMLSERVE_REDIS_PORT / MAMLSERVE_CACHE_PORT"
        exit 1
    fi
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize no --logfile "$dir/redis.log" "$@" &
    REDIS_PORTS+=("$port")
    for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && return; sleep 0.1; done
    say "redis-server on $port did not start; see $dir/redis.log"; exit 1
}
REDIS_PORTS=()
start_redis "$REDIS_PORT" "$DATA/redis/records" --appendonly yes --appendfsync everysec --maxmemory-policy noeviction
# The cache keeps an RDB snapshot: weights survive a restart instead of being adapted again.
start_redis "$CACHE_PORT" "$DATA/redis/cache" --appendonly no --save "300 1" \
    --maxmemory "${MAMLSERVE_CACHE_MAXMEMORY:-1gb}" --maxmemory-policy allkeys-lru
say "redis: records+broker on $REDIS_PORT (AOF, noeviction), weights cache on $CACHE_PORT (LRU)"

# --- the worker (converts the model once; the model loads in its pool process) and the API
if [ "${MAMLSERVE_META_WORKER:-0}" = 1 ]; then
    # half the cores each (at least one), so training and predictions do not fight over them
    THREADS=${MAMLSERVE_TORCH_THREADS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}
    MAMLSERVE_TORCH_THREADS=$THREADS MAMLSERVE_QUEUES=predict,adapt \
        scripts/worker.sh -n serve@%h --logfile "$DATA/logs/worker.log" &
    WORKER_PID=$!
    MAMLSERVE_TORCH_THREADS=$THREADS MAMLSERVE_QUEUES=meta MAMLSERVE_RECOVER=0 \
        scripts/worker.sh -n meta@%h --logfile "$DATA/logs/meta-worker.log" &
    META_PID=$!
else
    MAMLSERVE_QUEUES=predict,adapt,meta scripts/worker.sh --logfile "$DATA/logs/worker.log" &
    WORKER_PID=$!
fi
MAMLSERVE_HOST=$HOST MAMLSERVE_PORT=$PORT scripts/api.sh &
API_PID=$!

URL="http://$HOST:$PORT"
for _ in $(seq 1 300); do
    "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$URL/readyz" 2>/dev/null && break
    kill -0 "$API_PID" 2>/dev/null && kill -0 "$WORKER_PID" 2>/dev/null || { say "a process died during startup"; exit 1; }
    sleep 0.5
done
KEY=$("$PY" -c "from model.settings import get_settings; print(next(iter(get_settings().api_keys)))")
cat <<MSG

  mamlserve is up at $URL   (docs: $URL/docs, worker log: $DATA/logs/worker.log)

  # teach it a task from a few examples (returns its id)
  curl -s -X POST $URL/tasks -H 'X-API-Key: $KEY' -H 'Content-Type: application/json' -d '{
    "demonstrations": [{"input": "I loved this film", "output": "positive"},
                       {"input": "a dull, boring mess", "output": "negative"},
                       {"input": "wonderful acting", "output": "positive"},
                       {"input": "I want my money back", "output": "negative"}],
    "options": ["positive", "negative"]}'
  # then ask it (wait_s waits for the adaptation to finish)
  curl -s -X POST $URL/predict -H 'X-API-Key: $KEY' -H 'Content-Type: application/json' \\
    -d '{"task_id": "<id>", "inputs": ["what a great movie"], "wait_s": 60}'

  Ctrl-C stops everything.
MSG
wait -n $API_PID $WORKER_PID ${META_PID:-} || true
say "a service process exited"
