#!/usr/bin/env bash
# Install elastiserve with its test extras into .venv (created if missing) and run the test suite.
# This is the README's test command and exactly what CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/python examples/make_models.py
.venv/bin/ruff check src tests examples bench
.venv/bin/python -m pytest -q "$@"
