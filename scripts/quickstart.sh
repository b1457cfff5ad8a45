#!/usr/bin/env bash
# Quickstart: install elastiserve into .venv, generate the example models, serve them with the
# engine on loopback, send requests with NVIDIA's tritonclient, and stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[all]'
.venv/bin/python examples/make_models.py
HTTP_PORT=${HTTP_PORT:-8000} GRPC_PORT=${GRPC_PORT:-8001} METRICS_PORT=${METRICS_PORT:-8002}
.venv/bin/elastiserve serve --model-repository=examples/models \
  --http-address=127.0.0.1 --http-port="$HTTP_PORT" --grpc-address=127.0.0.1 --grpc-port="$GRPC_PORT" \
  --metrics-address=127.0.0.1 --metrics-port="$METRICS_PORT" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server exited" >&2; exit 1; }
  sleep 0.2
done
.venv/bin/python examples/client.py --http "127.0.0.1:$HTTP_PORT" --grpc "127.0.0.1:$GRPC_PORT"
echo "metrics: $(curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | grep -c '^nv_') nv_* samples at http://127.0.0.1:$METRICS_PORT/metrics"
