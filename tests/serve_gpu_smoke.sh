#!/bin/bash
# GPU smoke test of `scout serve --device cuda` (run on the GPU machine; not part of CI): the same
# greedy completion and chat completion as the CPU server, and a streamed one that adds up.
# Usage: tests/serve_gpu_smoke.sh PATH/TO/scout
set -u  # no -e: server_lib polls with commands that fail until the port shows
scout=$1
cd "$(dirname "$0")/.."
fail() { echo "FAIL: $*" >&2; exit 1; }
source tests/server_lib.sh
work=$(mktemp -d)
body='{"model":"scout-tiny-target","prompt":"def fibonacci(n):","max_tokens":48,"temperature":0}'
chat='{"model":"scout-tiny-target","messages":[{"role":"user","content":"import os"}],"max_tokens":32,"temperature":0}'
devices=${DEVICES:-"cpu cuda"}  # DEVICES="cpu cuda:1" etc.
for device in $devices; do
  start_server "$work/$device.log" --model models/scout-tiny-target --device "$device"
  curl -sf "$base/v1/completions" -H 'Content-Type: application/json' -d "$body" > "$work/$device.json" ||
    fail "$device completion: $(cat "$work/$device.log")"
  curl -sf "$base/v1/chat/completions" -H 'Content-Type: application/json' -d "$chat" > "$work/$device.chat.json" ||
    fail "$device chat"
  curl -sfN "$base/v1/completions" -H 'Content-Type: application/json' \
    -d "${body%\}},\"stream\":true}" > "$work/$device.sse" || fail "$device stream"
  kill -TERM "$pid"
  wait "$pid" || true
done
text() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); c=d["choices"][0]; print(c.get("text") or c["message"]["content"])' "$1"; }
a=${devices%% *}
b=${devices##* }
[ "$(text "$work/$a.json")" == "$(text "$work/$b.json")" ] || fail "completion differs: $a $(cat "$work/$a.json") $b $(cat "$work/$b.json")"
[ "$(text "$work/$a.chat.json")" == "$(text "$work/$b.chat.json")" ] || fail "chat differs"
streamed=$(python3 -c '
import json,sys
out=""
for line in open(sys.argv[1]):
    line=line.strip()
    if line.startswith("data: ") and line != "data: [DONE]":
        out += json.loads(line[6:])["choices"][0]["text"]
print(out)' "$work/$b.sse")
[ "$streamed" == "$(text "$work/$b.json")" ] || fail "streamed text differs from the completion"
echo "serve: completion and chat equal on $a and $b; $b's stream adds up to its completion"
rm -rf "$work"
