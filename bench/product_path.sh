#!/usr/bin/env bash
# The product path beside the bench, on the GPU machine: random-weight checkpoints at
# Llama-3.1-8B / Llama-3.2-1B shapes (tools/make_random_checkpoint.py, byte vocabulary), then
#   generate  scout generate on a CONTEXT-byte prompt, per mode (time per round from stderr),
#   bench     scout bench decode on the same shapes (--target/--draft: the checkpoints' configs),
#   serve     scout serve with a streaming client at CONTEXT, and SERVE_BATCH concurrent
#             SERVE_CONTEXT-token sessions (time between streamed tokens).
# Steps are chosen by STEPS (default "generate bench serve"). Logs and a summary go to $OUT
# (or ./out). Usage: SCOUT=path/to/scout bash bench/product_path.sh
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
SCOUT=${SCOUT:-$here/build/bin/scout}
OUTDIR=${OUT:-$here/out}
CK=${CK:-$here/.ckpt}
CONTEXT=${CONTEXT:-131000}
TOKENS=${TOKENS:-64}
SERVE_CONTEXT=${SERVE_CONTEXT:-32000}
SERVE_BATCH=${SERVE_BATCH:-8}
STEPS=${STEPS:-"generate bench serve"}
MODES=${MODES:-"dense-spec sts sts-sd4 sts-santa"}
mkdir -p "$OUTDIR" "$CK"
summary=$OUTDIR/product_summary.txt

for m in "llama-3.1-8b target 1" "llama-3.2-1b draft 2"; do
  set -- $m
  if [ ! -f "$CK/$2/config.json" ]; then
    python3 "$here/tools/make_random_checkpoint.py" --shape "$1" --out "$CK/$2" --seed "$3" || exit 1
  fi
done
prompt=$OUTDIR/prompt.txt
python3 - "$here/models/goldens/long_prompt.txt" "$prompt" "$CONTEXT" <<'EOF'
import sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read().encode()
n = int(sys.argv[3])
out = (text * (n // len(text) + 1))[:n]
open(sys.argv[2], "wb").write(out)
EOF

mode_flags() {
  case $1 in
    dense-spec) echo "" ;;
    sts) echo "--sparsity sts --kv-budget-fraction 0.1" ;;
    sts-sd4) echo "--sparsity sts --kv-budget-fraction 0.1 --sparse-draft --draft-refresh-rounds 4" ;;
    sts-santa) echo "--sparsity sts --kv-budget-fraction 0.1 --santa-samples 512" ;;
  esac
}

echo "product path on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F)" | tee -a "$summary"
if [[ " $STEPS " == *" generate "* ]]; then
  for mode in $MODES; do
    log=$OUTDIR/generate_$mode.log
    "$SCOUT" generate --device cuda --model "$CK/target" --speculative --draft "$CK/draft" --prompt-file "$prompt" \
      --prefill-chunk 4096 --kv-cache-tokens $((CONTEXT + 4096)) --max-tokens "$TOKENS" --ignore-eos \
      $(mode_flags "$mode") > /dev/null 2> "$log"
    echo "generate $mode: $(grep -o 'generated.*' "$log" | head -1)" | tee -a "$summary"
  done
fi
if [[ " $STEPS " == *" bench "* ]]; then
  "$SCOUT" bench decode --target "$CK/target" --draft "$CK/draft" --contexts "$CONTEXT,$SERVE_CONTEXT" \
    --batch-sizes "1,$SERVE_BATCH" --iters 20 --json "$OUTDIR/bench_ckpt.json" > "$OUTDIR/bench_ckpt.log" 2>&1
  grep -E "product:|STS-spec|dense-spec|skip" "$OUTDIR/bench_ckpt.log" | tee -a "$summary"
fi
if [[ " $STEPS " == *" serve "* ]]; then
  port=8123
  "$SCOUT" serve --device cuda --model "$CK/target" --draft "$CK/draft" --sparsity sts --kv-budget-fraction 0.1 \
    --sparse-draft --draft-refresh-rounds 4 --prefill-chunk 4096 --kv-cache-tokens $(( SERVE_BATCH * (SERVE_CONTEXT + 256) > CONTEXT + 4096 ? SERVE_BATCH * (SERVE_CONTEXT + 256) : CONTEXT + 4096 )) \
    --max-num-seqs "$SERVE_BATCH" --port $port > "$OUTDIR/serve.log" 2>&1 &
  pid=$!
  for i in $(seq 1 300); do curl -sf localhost:$port/health > /dev/null && break; sleep 1; done
  python3 "$here/bench/stream_client.py" --port $port --prompt-file "$prompt" --tokens "$TOKENS" \
    --label "serve 1 x $CONTEXT" | tee -a "$summary"
  python3 "$here/bench/stream_client.py" --port $port --prompt-file "$prompt" --bytes "$SERVE_CONTEXT" \
    --tokens "$TOKENS" --concurrency "$SERVE_BATCH" --label "serve $SERVE_BATCH x $SERVE_CONTEXT" | tee -a "$summary"
  curl -s localhost:$port/metrics | grep -E "^scout_(draft_)?attention_blocks_(read|dense)_total" | tee -a "$summary"
  kill $pid; wait $pid 2>/dev/null
fi
