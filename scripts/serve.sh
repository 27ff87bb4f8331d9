#!/usr/bin/env bash
# Run the whole embedded service on this machine: two redis-servers, Celery workers, uvicorn,
# each supervised (started again whenever it exits). Installs what is missing on first run (.venv,
# the package, SmolLM2, redis-server). Ctrl-C stops all.
#
# Workers: by default one for predictions (role predict) and one for adaptations and meta-training
# (adapt, meta), so that one tenant's adaptation never holds another tenant's predictions; each
# loads the model. MAMLSERVE_META_WORKER=1 gives meta-training a third worker of its own.
# MAMLSERVE_WORKERS=N instead starts N workers that each take every role (the API spreads
# predictions over them and sends a dead one's calls to another; they share the cores).
#
# Environment (all optional):
#   MAMLSERVE_HOST / MAMLSERVE_PORT      where the API listens (127.0.0.1 / 8000)
#   MAMLSERVE_REDIS_PORT                 records + broker redis (6379): AOF on, noeviction
#   MAMLSERVE_CACHE_PORT                 weights cache redis (6380): allkeys-lru
#   MAMLSERVE_CACHE_MAXMEMORY            the cache's memory cap (1gb)
#   MAMLSERVE_META_WORKER=1              a third worker, for meta-training alone
#   MAMLSERVE_WORKERS=N                  N workers, each on every queue (instead of the two above)
#   MAMLSERVE_*                          every setting of model/settings.py (data dir, keys, model...)
# Each process's pid is in $MAMLSERVE_DATA_DIR/run/<name>.pid, its log in .../logs/<name>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

HOST=${MAMLSERVE_HOST:-127.0.0.1}
PORT=${MAMLSERVE_PORT:-8000}
REDIS_PORT=${MAMLSERVE_REDIS_PORT:-6379}
CACHE_PORT=${MAMLSERVE_CACHE_PORT:-6380}
say() { echo "[serve] $*" >&2; }
N=${MAMLSERVE_WORKERS:-0}  # 0: the predict worker and the adapt worker
case $N in ""|*[!0-9]*) say "MAMLSERVE_WORKERS must be a number of workers, not '$N'"; exit 1;; esac

# --- install what is missing (redis-server, .venv with the project, SmolLM2): one install path for all
scripts/setup.sh >&2
PY=$ROOT/.venv/bin/python

# --- settings every process shares
DATA=$("$PY" -c "from model.settings import get_settings; print(get_settings().data_dir)")
export MAMLSERVE_REDIS_URL=${MAMLSERVE_REDIS_URL:-redis://127.0.0.1:$REDIS_PORT/0}
export MAMLSERVE_CACHE_REDIS_URL=${MAMLSERVE_CACHE_REDIS_URL:-redis://127.0.0.1:$CACHE_PORT/0}
RUN=$DATA/run
mkdir -p "$DATA/redis/records" "$DATA/redis/cache" "$DATA/logs" "$RUN"
rm -f "$RUN"/*.pid "$RUN/stopping"

pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }

# supervise NAME CMD...: run CMD, and run it again a second after it exits, until serve.sh stops.
supervise() {
    local name=$1; shift
    (
        trap '' INT  # Ctrl-C reaches every process of the terminal: serve.sh stops them in order
        while [ ! -e "$RUN/stopping" ]; do
            "$@" &
            echo $! > "$RUN/$name.pid"
            code=0; wait $! || code=$?
            sleep 1
            [ -e "$RUN/stopping" ] && break
            say "$name exited ($code): starting it again"
        done
    ) &
    SUPERVISORS+=($!)
}
SUPERVISORS=()
SERVICES=()

stop() {
    trap - INT TERM EXIT
    [ -n "${STOPPED:-}" ] && return; STOPPED=1
    say "stopping"
    touch "$RUN/stopping"
    # API first (no new work), then the workers (TERM: finish the current task), then Redis (AOF flushed).
    kill -TERM "$(pid_of api)" 2>/dev/null || true
    local workers=()
    for name in "${SERVICES[@]}"; do case $name in *worker|worker-*) workers+=("$(pid_of "$name")");; esac; done
    for pid in "${workers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${workers[@]}"; do
        for _ in $(seq 1 "${MAMLSERVE_STOP_WAIT_S:-30}"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        # Still busy (a long run): a cold stop; the run is queued again (acks_late: its message goes back).
        kill -QUIT "$pid" 2>/dev/null || true
    done
    for p in "$REDIS_PORT" "$CACHE_PORT"; do redis-cli -p "$p" shutdown >/dev/null 2>&1 || true; done
    wait "${SUPERVISORS[@]}" 2>/dev/null || true
    rm -f "$RUN"/*.pid
    say "stopped"
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

ping_redis() { redis-cli -p "$1" ping >/dev/null 2>&1; }
start_redis() {  # name port dir args...
    local name=$1 port=$2 dir=$3; shift 3
    if ping_redis "$port"; then
        say "something already answers on port $port: stop it or set MAMLSERVE_REDIS_PORT / MAMLSERVE_CACHE_PORT"
        exit 1
    fi
    supervise "$name" redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize no --logfile "$dir/redis.log" "$@"
    for _ in $(seq 1 50); do ping_redis "$port" && return; sleep 0.1; done
    say "redis-server on $port did not start; see $dir/redis.log"; exit 1
}
start_redis redis-records "$REDIS_PORT" "$DATA/redis/records" --appendonly yes --appendfsync everysec --maxmemory-policy noeviction
# The cache keeps an RDB snapshot: weights survive a restart instead of being adapted again.
start_redis redis-cache "$CACHE_PORT" "$DATA/redis/cache" --appendonly no --save "300 1" \
    --maxmemory "${MAMLSERVE_CACHE_MAXMEMORY:-1gb}" --maxmemory-policy allkeys-lru
say "redis: records+broker on $REDIS_PORT (AOF, noeviction), weights cache on $CACHE_PORT (LRU)"

# --- the workers (the model converted once, before both start) and the API
"$PY" -m worker.prepare >&2
# A quarter of the cores (at least one) for predictions, the rest for training, so that neither
# starves the other; a meta-training worker shares the training half.
CORES=$(nproc)
PREDICT_THREADS=${MAMLSERVE_PREDICT_THREADS:-$(( CORES / 4 > 0 ? CORES / 4 : 1 ))}
TRAIN_THREADS=$(( CORES - PREDICT_THREADS > 0 ? CORES - PREDICT_THREADS : 1 ))
worker() {  # name roles threads
    SERVICES+=("$1")
    supervise "$1" env MAMLSERVE_QUEUES="$2" MAMLSERVE_TORCH_THREADS="${MAMLSERVE_TORCH_THREADS:-$3}" \
        MAMLSERVE_PREPARE=0 scripts/worker.sh -n "$1@%h" --logfile "$DATA/logs/$1.log"
}
if [ "$N" -gt 0 ]; then
    EACH=$(( CORES / N > 0 ? CORES / N : 1 ))
    for i in $(seq 1 "$N"); do worker "worker-$i" predict,adapt,meta "$EACH"; done
else
    worker predict-worker predict "$PREDICT_THREADS"
    if [ "${MAMLSERVE_META_WORKER:-0}" = 1 ]; then
        HALF=$(( TRAIN_THREADS / 2 > 0 ? TRAIN_THREADS / 2 : 1 ))
        worker adapt-worker adapt "$HALF"
        worker meta-worker meta "$HALF"
    else
        worker adapt-worker adapt,meta "$TRAIN_THREADS"
    fi
fi
SERVICES+=(api)
supervise api env MAMLSERVE_HOST="$HOST" MAMLSERVE_PORT="$PORT" scripts/api.sh

URL="http://$HOST:$PORT"
sleep 1  # the supervisors have written their first pid files
FIRST=(); for name in "${SERVICES[@]}"; do FIRST+=("$(pid_of "$name")"); done
for _ in $(seq 1 300); do
    "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$URL/readyz" 2>/dev/null && break
    for pid in "${FIRST[@]}"; do kill -0 "$pid" 2>/dev/null || { say "a process died during startup"; exit 1; }; done
    sleep 0.5
done
KEY=$("$PY" -c "from model.settings import get_settings; print(next(iter(get_settings().api_keys)))")
cat <<MSG

  mamlserve is up at $URL   (docs: $URL/docs, logs: $DATA/logs)

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
wait "${SUPERVISORS[@]}"
