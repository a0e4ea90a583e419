#!/usr/bin/env bash
# On the GPU machine, in one device call: the GPU tests, then the benchmark scripts whose figures
# the open issues wait for, each guarded by the time left (a call may run 600 s). Expects the
# bundle unpacked (../shared/device/README.md) and writes logs to $OUT.
#   (bundle: build/bin/scout build/bin/scout-bench and the GPU tests)
#   tar -xJf out/devbundle.tar.xz && bash tools/gpu_checks.sh [tests|decode|serve|prefill|sessions|tier|cluster ...]
# Steps default to all, in that order. SCOUT_SOURCE_DIR is set to this tree.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source .devbundle/env.sh  # (it sets variables of its own, `here` among them)
export SCOUT_SOURCE_DIR=$root SCOUT=$root/.devbundle/bin/scout CK=${CK:-/tmp/ckpt}
OUT=${OUT:-$root/out}
mkdir -p "$OUT"
steps=${*:-"tests decode serve prefill sessions tier cluster"}
left() { echo $((${LIMIT:-590} - SECONDS)); }
nvidia-smi --query-gpu=name --format=csv,noheader
for step in $steps; do
  [ "$(left)" -gt 60 ] || { echo "skipped $step: $(left) s left"; continue; }
  echo "== $step (t=$SECONDS)"
  case $step in
    tests)
      for t in runtime/runtime_gpu_test kernels/kernels_gpu_test round/round_gpu_test; do
        name=$(basename "$t")
        timeout 200 ".devbundle/bin/$name" > "$OUT/$name.log" 2>&1
        echo "$name rc $?: $(grep -E '^\[  (PASSED|FAILED)' "$OUT/$name.log" | tr '\n' ' ')"
      done
      (mkdir -p /tmp/st && cd /tmp/st && SCOUT_TEST_SERVE_FLAGS="--device cuda" timeout 150 bash "$root/tests/serve_test.sh" \
        "$SCOUT" "$root" > "$OUT/serve_test_cuda.log" 2>&1; echo "serve_test on cuda rc $?"; grep -m3 FAIL "$OUT/serve_test_cuda.log")
      ;;
    decode)  # lab and product rows of the round (the refactors' speed check), preset shapes
      timeout "$(left)" "$SCOUT" bench decode --contexts 32768,131072 --batch-sizes 1,8 --iters 20 \
        --host-contexts 131072 --host-turnovers 0 > "$OUT/bench_decode.txt" 2>&1
      echo "bench decode rc $?"; grep -E "^\|" "$OUT/bench_decode.txt" | tail -40 ;;
    serve) CONFIGS="2048/0 2048/1.5" WINDOW=8 timeout "$(left)" bash bench/serve_long_prompt.sh 2>&1 | tail -6 ;;
    prefill) CONTEXTS="32760 131000" CHUNKS=4096 HF=1 timeout "$(left)" bash bench/prefill_product.sh 2>&1 | grep -v "^Warn" | tail -8 ;;
    sessions) SESSIONS=8 LENGTH=32768 TURN=2048 timeout "$(left)" bash bench/serve_sessions.sh 2>&1 |
        grep -E "Serving|Successful|Failed|throughput|TTFT|TPOT|ITL|E2EL|served|scout_|agent" ;;
    tier)
      python3 - models/goldens/long_prompt.txt /tmp/p65k.txt 65000 <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read().encode()
n = int(sys.argv[3])
open(sys.argv[2], "wb").write((text * (n // len(text) + 1))[:n])
PY
      [ -f "$CK/target/config.json" ] || python3 tools/make_random_checkpoint.py --shape llama-3.1-8b --out "$CK/target" --seed 1
      for cache in 4 0; do  # 4 GB: segments; 0: the whole context in the cache
        /usr/bin/time -f "wall %e s" timeout 200 "$SCOUT" generate --device cuda --model "$CK/target" --prompt-file /tmp/p65k.txt \
          --prefill-chunk 4096 --host-kv-gb 12 --gpu-kv-cache-gb "$cache" --max-tokens 16 --ignore-eos \
          > "$OUT/tier_$cache.txt" 2> "$OUT/tier_$cache.log"
        echo "host tier, GPU cache ${cache} GB, rc $?: $(grep -E 'prompt|wall' "$OUT/tier_$cache.log" | tr '\n' ' ')"
      done
      cmp -s "$OUT/tier_4.txt" "$OUT/tier_0.txt" && echo "same text with and without segments" || echo "texts differ (bf16 merges: compare logits, not text)"
      ;;
    cluster)  # #22: the group data plane on the GPU, then scaling on CPU workers (16 cores) and one H100
      (mkdir -p /tmp/cg && cd /tmp/cg && SCOUT_CLUSTER_DEVICE=cuda timeout 240 bash "$root/tests/cluster_groups_test.sh" \
        "$SCOUT" "$root" > "$OUT/cluster_groups_cuda.log" 2>&1; echo "cluster_groups_test on cuda rc $?";
        grep -E "^(ok|FAIL|PASS)" "$OUT/cluster_groups_cuda.log" | tail -3)
      timeout "$(left)" bash bench/cluster_throughput.sh .devbundle "${CLIENTS:-16}" "${TURNS:-20}" "1 2 4" 2>&1 | tee "$OUT/cluster_cpu.txt"
      SCOUT_CLUSTER_DEVICE=cuda timeout "$(left)" bash bench/cluster_throughput.sh .devbundle "${CLIENTS:-16}" "${TURNS:-20}" "1" 2>&1 |
        tee "$OUT/cluster_cuda.txt" ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "t=$SECONDS"
