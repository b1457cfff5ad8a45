#!/usr/bin/env bash
# Quickstart: install elastiserve into .venv, generate the example models, start the platform
# (control plane + gateway) on loopback, deploy examples/service.json (the seed's EAS spec with a
# local model repository), predict through the gateway with the service token, then stop
# everything (instances included).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[all]'
.venv/bin/python examples/make_models.py
ES=.venv/bin/elastiserve
STATE="$(mktemp -d -t elastiserve-quickstart.XXXXXX)"
API_PORT=${API_PORT:-8470} GATEWAY_PORT=${GATEWAY_PORT:-8480}
export ELASTISERVE_HOME="$STATE" ELASTISERVE_ENDPOINT="http://127.0.0.1:$API_PORT"

"$ES" up --port "$API_PORT" --gateway-port "$GATEWAY_PORT" --stop-instances --log-level warning &
UP=$!
trap 'kill $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$STATE"' EXIT
for _ in $(seq 1 150); do
  curl -sf "$ELASTISERVE_ENDPOINT/api/v2/services" >/dev/null && break
  kill -0 $UP 2>/dev/null || { echo "elastiserve up exited" >&2; exit 1; }
  sleep 0.2
done

echo "== elastiserve create examples/service.json"
"$ES" create examples/service.json --wait --timeout 120
"$ES" w triton_test
TOKEN="$("$ES" desc triton_test --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["spec"]["token"])')"

echo "== predict through the gateway"
for _ in $(seq 1 50); do
  curl -sf -H "Authorization: $TOKEN" "http://127.0.0.1:$GATEWAY_PORT/api/predict/triton_test/v2/health/ready" \
    >/dev/null && break
  sleep 0.2
done
curl -sS --fail-with-body -H "Authorization: $TOKEN" -H "Content-Type: application/json" \
  "http://127.0.0.1:$GATEWAY_PORT/api/predict/triton_test/v2/models/add_sub/infer" -d @examples/add_sub_request.json
echo
echo "== the same instance with NVIDIA's tritonclient (direct connect to the published endpoint)"
ENDPOINT="$(curl -s "$ELASTISERVE_ENDPOINT/api/v2/services/triton_test/endpoints" \
  | .venv/bin/python -c 'import json,sys; e=json.load(sys.stdin)["endpoints"][0]; print(e["ip"] + ":" + str(e["port"]))')"
.venv/bin/python examples/client.py --http "$ENDPOINT" --http-only
