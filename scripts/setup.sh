#!/usr/bin/env bash
# Set-up on a fresh machine: .venv with the project and its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import mistral_jax, train, torch, transformers, pytest, xdist, gguf, accelerate, matplotlib, peft, fastapi, uvicorn, openai, trl" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  # torch first and pinned: 2.13.0 is a CPU build; an unpinned torch pulls a multi-GB CUDA one.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e '.[test]'
fi
# libtpu for train.plan's TPU targets (compile-only, no TPU needed), apart from site-packages:
# importable, it makes every JAX start print TPU-runtime warnings on stderr (train/plan/targets.py)
[ -f .venv/libtpu/libtpu/libtpu.so ] || .venv/bin/pip install -q --no-deps --target .venv/libtpu 'libtpu==0.0.42.1'
