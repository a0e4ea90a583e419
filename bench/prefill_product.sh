#!/usr/bin/env bash
# Prefill through the product on the GPU machine: `scout generate --device cuda` on a random-weight
# Llama-3.1-8B-shaped checkpoint (tools/make_random_checkpoint.py, byte vocabulary: an N-byte
# prompt is N + 1 tokens) at each context of CONTEXTS and each --prefill-chunk of CHUNKS, beside
# transformers (bench/hf_prefill_baseline.py) on the same checkpoint in the same run.
# Logs and prefill_summary.txt go to $OUT (or ./out).
#   SCOUT=build/bin/scout CONTEXTS="32760 131000" CHUNKS="2048 4096 8192" bash bench/prefill_product.sh
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
SCOUT=${SCOUT:-$here/build/bin/scout}
OUTDIR=${OUT:-$here/out}
CK=${CK:-$here/.ckpt}
CONTEXTS=${CONTEXTS:-"32760 131000"}
CHUNKS=${CHUNKS:-"2048 4096 8192"}
HF=${HF:-1}
mkdir -p "$OUTDIR" "$CK"
summary=$OUTDIR/prefill_summary.txt
if [ ! -f "$CK/target/config.json" ]; then
  python3 "$here/tools/make_random_checkpoint.py" --shape llama-3.1-8b --out "$CK/target" --seed 1 || exit 1
fi
echo "prefill, product path on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F)" | tee -a "$summary"
for n in $CONTEXTS; do
  prompt=$OUTDIR/prompt_$n.txt
  python3 - "$here/models/goldens/long_prompt.txt" "$prompt" "$n" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read().encode()
n = int(sys.argv[3])
open(sys.argv[2], "wb").write((text * (n // len(text) + 1))[:n])
PY
  for chunk in $CHUNKS; do
    log=$OUTDIR/prefill_${n}_$chunk.log
    "$SCOUT" generate --device cuda --model "$CK/target" --prompt-file "$prompt" --prefill-chunk "$chunk" \
      --kv-cache-tokens $((n + 64)) --max-tokens 1 --ignore-eos > /dev/null 2> "$log"
    echo "scout generate, $n bytes, --prefill-chunk $chunk: $(grep -o 'prompt.*tokens/s)' "$log" | head -1)" | tee -a "$summary"
  done
done
if [ "$HF" = 1 ]; then
  toks=$(for n in $CONTEXTS; do echo -n "$((n + 1)),"; done)
  python3 "$here/bench/hf_prefill_baseline.py" --model "$CK/target" --tokens "${toks%,}" \
    --json "$OUTDIR/hf_prefill.json" 2>&1 | grep -v Warning | tee -a "$summary"
fi
