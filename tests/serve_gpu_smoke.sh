#!/bin/bash
# GPU smoke test of `scout serve --device cuda` (run on the GPU machine; not part of CI): the same
# greedy completion, chat completion and two-turn agent session as the CPU server, a streamed
# completion that adds up, and the host KV tier (--host-kv-gb with a GPU block cache too small
# for both the session and another request) giving the same text after its session's blocks
# came back from host memory.
# Usage: tests/serve_gpu_smoke.sh PATH/TO/scout
set -u  # no -e: server_lib polls with commands that fail until the port shows
scout=$1
cd "$(dirname "$0")/.."
fail() { echo "FAIL: $*" >&2; exit 1; }
source tests/server_lib.sh
work=$(mktemp -d)
body='{"model":"scout-tiny-target","prompt":"def fibonacci(n):","max_tokens":48,"temperature":0}'
chat='{"model":"scout-tiny-target","messages":[{"role":"user","content":"import os"}],"max_tokens":32,"temperature":0}'
turn1='{"prompt":"class Stack:\n    def __init__(self):\n","max_tokens":24,"temperature":0,"session_id":"s1"}'
other='{"prompt":"import numpy as np\nimport json\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n\n","max_tokens":30,"temperature":0}'
turn2='{"prompt":"\n    def push(self, x):\n","max_tokens":24,"temperature":0,"session_id":"s1"}'
text() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); c=d["choices"][0]; print(c.get("text") or c["message"]["content"])' "$1"; }
# One server configuration per entry, separated by ';'.
IFS=';' read -ra configs <<< "${CONFIGS:-cpu;cuda;cuda --host-kv-gb 1 --gpu-kv-cache-gb 0.0005}"
for i in "${!configs[@]}"; do
  read -ra args <<< "${configs[$i]}"
  start_server "$work/$i.log" --model models/scout-tiny-target --device "${args[@]}"
  curl -sf "$base/v1/completions" -H 'Content-Type: application/json' -d "$body" > "$work/$i.json" ||
    fail "${configs[$i]} completion: $(cat "$work/$i.log")"
  curl -sf "$base/v1/chat/completions" -H 'Content-Type: application/json' -d "$chat" > "$work/$i.chat.json" ||
    fail "${configs[$i]} chat"
  curl -sfN "$base/v1/completions" -H 'Content-Type: application/json' \
    -d "${body%\}},\"stream\":true}" > "$work/$i.sse" || fail "${configs[$i]} stream"
  curl -sf "$base/v1/completions" -d "$turn1" > "$work/$i.t1.json" || fail "${configs[$i]} turn 1: $(cat "$work/$i.log")"
  curl -sf "$base/v1/completions" -d "$other" > "$work/$i.other.json" || fail "${configs[$i]} other: $(cat "$work/$i.log")"
  curl -sf "$base/v1/completions" -d "$turn2" > "$work/$i.t2.json" || fail "${configs[$i]} turn 2: $(cat "$work/$i.log")"
  if [[ "${configs[$i]}" == *--host-kv-gb* ]]; then
    # More streams than the GPU block cache holds at once: the newest sit passes out and resume
    # (preemption); every one finishes with the single request's text.
    curls=()
    for n in 1 2 3 4; do
      curl -sf "$base/v1/completions" -H 'Content-Type: application/json' -d "$body" > "$work/$i.many$n.json" &
      curls+=($!)
    done
    wait "${curls[@]}"  # not a bare wait: the server is a child too
    for n in 1 2 3 4; do
      [ "$(text "$work/$i.many$n.json")" == "$(text "$work/$i.json")" ] ||
        fail "${configs[$i]}: concurrent request $n: $(cat "$work/$i.many$n.json")"
    done
  fi
  curl -sf "$base/metrics" > "$work/$i.metrics" || fail "${configs[$i]} metrics"
  kill -TERM "$pid"
  wait "$pid" || true
done
metric() { awk -v n="$2" '$1 == n {print $2}' "$1"; }
for i in "${!configs[@]}"; do
  for part in json chat.json t1.json other.json t2.json; do
    [ "$(text "$work/0.$part")" == "$(text "$work/$i.$part")" ] ||
      fail "$part differs: ${configs[0]}: $(cat "$work/0.$part") / ${configs[$i]}: $(cat "$work/$i.$part")"
  done
  streamed=$(python3 -c '
import json,sys
out=""
for line in open(sys.argv[1]):
    line=line.strip()
    if line.startswith("data: ") and line != "data: [DONE]":
        out += json.loads(line[6:])["choices"][0]["text"]
print(out)' "$work/$i.sse")
  [ "$streamed" == "$(text "$work/$i.json")" ] || fail "${configs[$i]}: streamed text differs from the completion"
  if [[ "${configs[$i]}" == *--host-kv-gb* ]]; then
    moved=$(metric "$work/$i.metrics" scout_kv_prefetch_bytes_total)
    misses=$(metric "$work/$i.metrics" scout_kv_block_cache_misses_total)
    python3 -c "import sys; sys.exit(0 if float('$moved') > 0 and float('$misses') > 0 else 1)" ||
      fail "${configs[$i]}: the session's blocks should have come back from host memory (prefetch bytes $moved, misses $misses)"
    echo "host KV tier: turn 2 prefetched $moved bytes ($misses units) from host memory, same text"
  fi
done
echo "serve: completion, chat, a two-turn session and a stream equal over: ${configs[*]}"
rm -rf "$work"
