#!/usr/bin/env bash
# scout serve on the tiny target, with an API key, driven by the official OpenAI SDK for Node
# (the npm registry's `openai` v4, installed once into WORK_DIR; tools/openai_sdk/sdk_test.mjs).
# usage: openai_sdk_test.sh SCOUT_BINARY SOURCE_DIR WORK_DIR
set -uo pipefail
scout=$1
src=$2
work=$3
fail() { echo "FAIL: $*"; [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; cat "$work/serve.err" 2>/dev/null | tail -20; exit 1; }
source "$src/tests/server_lib.sh"
command -v node >/dev/null && command -v npm >/dev/null || fail "node and npm are needed (tools/setup.sh installs them)"
mkdir -p "$work"
cp "$src/tools/openai_sdk/package.json" "$src/tools/openai_sdk/sdk_test.mjs" "$work/"
if [ ! -d "$work/node_modules/openai" ]; then
  (cd "$work" && npm install --no-audit --no-fund --silent) || fail "npm install of the openai SDK"
fi
start_server "$work/serve.err" --model "$src/models/scout-tiny-target" --api-key sdk-key
for _ in $(seq 50); do curl -sf "$base/health" > /dev/null && break; sleep 0.1; done
node "$work/sdk_test.mjs" "$base" sdk-key || fail "the SDK's checks"
kill "$pid"
wait "$pid" 2>/dev/null
exit 0
