#!/usr/bin/env bash
# Agent sessions against `scout serve` with a draft, dense and STS verification side by side (the
# per-request "sparsity" field on one server): `scout bench serve --sessions` with SESSIONS
# conversations growing by TURN tokens (and OUT generated) a turn to LENGTH tokens each.
# On the GPU machine (default): random-weight Llama-3.1-8B / 3.2-1B checkpoints
# (tools/make_random_checkpoint.py) in $CK. DEVICE=cpu: the fixture pair.
# Reports and JSON go to $OUT (or ./out).
#   SCOUT=build/bin/scout bash bench/serve_sessions.sh
#   DEVICE=cpu SESSIONS=4 LENGTH=2048 TURN=256 OUT=/tmp/o bash bench/serve_sessions.sh
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
SCOUT=${SCOUT:-$here/build/bin/scout}
OUTDIR=${OUT:-$here/out}
CK=${CK:-$here/.ckpt}
DEVICE=${DEVICE:-cuda}
SESSIONS=${SESSIONS:-8}
LENGTH=${LENGTH:-32768}
TURN=${TURN:-2048}
OUT_TOKENS=${OUT_TOKENS:-64}
MODES=${MODES:-"dense sts"}
PORT=${PORT:-8021}
mkdir -p "$OUTDIR"
if [ "$DEVICE" = cpu ]; then
  target=$here/models/scout-tiny-target draft=$here/models/scout-tiny-draft
else
  mkdir -p "$CK"
  for m in "llama-3.1-8b target 1" "llama-3.2-1b draft 2"; do
    set -- $m
    [ -f "$CK/$2/config.json" ] || python3 "$here/tools/make_random_checkpoint.py" --shape "$1" --out "$CK/$2" --seed "$3" || exit 1
  done
  target=$CK/target draft=$CK/draft
fi
"$SCOUT" serve --device "$DEVICE" --model "$target" --draft "$draft" --kv-budget-fraction 0.1 --port "$PORT" \
  --max-num-seqs "$SESSIONS" --kv-cache-tokens $((SESSIONS * (LENGTH + TURN + 256))) > "$OUTDIR/serve_sessions.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
for _ in $(seq 600); do
  curl -sf "localhost:$PORT/health" > /dev/null && break
  sleep 0.5
done
summary=$OUTDIR/serve_sessions_summary.txt
echo "agent sessions on $DEVICE ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)), $(date -u +%F): $SESSIONS x $LENGTH tokens, $TURN + $OUT_TOKENS a turn" | tee -a "$summary"
for mode in $MODES; do
  "$SCOUT" bench serve --base-url "http://127.0.0.1:$PORT" --sessions "$SESSIONS" --turn-tokens "$TURN" \
    --session-output-len "$OUT_TOKENS" --session-length "$LENGTH" --extra-body "{\"sparsity\": \"$mode\"}" \
    --label "$mode" --result-json "$OUTDIR/serve_sessions_$mode.json" 2>&1 | tee -a "$summary"
done
curl -s "localhost:$PORT/metrics" | grep -E "^scout_(attention_blocks_(read|dense)_total|spec_decode_num_(accepted|draft)_tokens_total)" | tee -a "$summary"
