#!/usr/bin/env bash
# scout serve on the GPU machine with a random-weight Llama-3.1-8B-shaped checkpoint
# (tools/make_random_checkpoint.py): SESSIONS streaming sessions decode while a LONG-byte prompt
# arrives (bench/serve_long_prompt.py), once per CONFIGS entry BUDGET/SLOWDOWN
# (--max-num-batched-tokens / --max-decode-slowdown; slowdown 0: chunks bounded by tokens only).
# Logs and JSON go to $OUT (or ./out).
#   SCOUT=build/bin/scout CONFIGS="2048/0 2048/1.5" bash bench/serve_long_prompt.sh
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
SCOUT=${SCOUT:-$here/build/bin/scout}
OUTDIR=${OUT:-$here/out}
CK=${CK:-$here/.ckpt}
LONG=${LONG:-131000}
SESSIONS=${SESSIONS:-8}
# Tokens each session may generate: enough to outlast the long prompt's paced prefill.
SESSION_TOKENS=${SESSION_TOKENS:-16000}
CONFIGS=${CONFIGS:-"2048/0 2048/1.5"}
WINDOW=${WINDOW:-15}
PORT=${PORT:-8011}
mkdir -p "$OUTDIR" "$CK"
if [ ! -f "$CK/target/config.json" ]; then
  python3 "$here/tools/make_random_checkpoint.py" --shape llama-3.1-8b --out "$CK/target" --seed 1 || exit 1
fi
for config in $CONFIGS; do
  budget=${config%/*}
  slowdown=${config#*/}
  tag=${budget}_${slowdown}
  log=$OUTDIR/serve_long_$tag.log
  "$SCOUT" serve --device cuda --model "$CK/target" --served-model-name target --port "$PORT" \
    --kv-cache-tokens $((LONG + SESSIONS * (SESSION_TOKENS + 2500) + 4096)) --max-num-batched-tokens "$budget" --max-decode-slowdown "$slowdown" > "$log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do
    curl -sf "localhost:$PORT/health" > /dev/null && break
    sleep 0.5
  done
  python3 "$here/bench/serve_long_prompt.py" --port "$PORT" --prompt-file "$here/models/goldens/long_prompt.txt" \
    --sessions "$SESSIONS" --session-tokens "$SESSION_TOKENS" --long-bytes "$LONG" --window "$WINDOW" --label "max-num-batched-tokens $budget, max-decode-slowdown $slowdown" \
    --json "$OUTDIR/serve_long_$tag.json" 2>&1 | tee -a "$OUTDIR/serve_long_summary.txt"
  curl -s "localhost:$PORT/metrics" | grep -E "^scout_prefill_(tokens_total|pass_seconds_(sum|count))" >> "$OUTDIR/serve_long_summary.txt"
  kill "$pid"
  wait "$pid" 2> /dev/null
done
