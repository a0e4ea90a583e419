#!/usr/bin/env bash
# Cluster throughput: concurrent agent sessions (multi-turn, each turn adding to a context the
# cluster keeps) against a coordinator with 1, 2 and 4 target workers, 2 draft workers and 2 KV
# store nodes, all processes on this machine's loopback with the fixture pair on the CPU backend.
# Prints aggregate tokens/s, TTFT and inter-token percentiles (`scout bench serve --sessions`) and the KV bytes
# the workers moved over UCX, per worker count, and the same load on one `scout serve` process
# (the "serve" row, the baseline). The machine's cores bound the scaling here: the table says how
# many there are.
# usage: bench/cluster_throughput.sh BUILD_DIR [SESSIONS] [TURNS] [WORKER_COUNTS]
# Rows: "N x serve" (N independent single-process servers, the baseline) then N target groups.
# SESSIONS agent sessions at once, each TURNS turns of 64 new tokens and 32 generated.
# SCOUT_CLUSTER_DEVICE=cuda puts the model workers on the GPU. On 16 cores or more, each CPU
# target worker (and the single-process baseline) gets 2 cores of its own (taskset, 2 OpenBLAS
# threads), as if each were its own machine; the coordinator, drafts, KV stores and clients share
# cores 0-3. SCOUT_TARGET_FLAGS adds flags to the target workers (e.g. --kv-remote-tier).
# SCOUT_DATA_PLANE: groups (the default: each target worker runs its own engine with the draft
# in-process, `scout worker --engine`, and the coordinator only routes) or passes (the
# coordinator's engine runs every pass on the workers, with 2 draft workers and 2 KV store nodes).
set -uo pipefail
plane=${SCOUT_DATA_PLANE:-groups}
[ "$plane" = groups ] || [ "$plane" = passes ] || { echo "SCOUT_DATA_PLANE must be groups or passes"; exit 1; }
device=${SCOUT_CLUSTER_DEVICE:-cpu}
unit=8192
[ "$device" = cpu ] || unit=4096
build=$1
clients=${2:-8}
turns=${3:-8}
counts=${4:-"1 2 4"}
read -r -a target_flags <<< "${SCOUT_TARGET_FLAGS:-}"
src=$(cd "$(dirname "$0")/.." && pwd)
scout=$build/bin/scout
# load PORT: the agent sessions against the server on PORT; the report's JSON on stdout.
load() {
  "$scout" bench serve --base-url "http://127.0.0.1:$1" --sessions "$clients" --turn-tokens 64 --session-output-len 32 \
    --session-length $((turns * 96)) --result-json "$work/load.json" > "$work/load.txt" 2>&1
  cat "$work/load.json"
}
T=$src/models/scout-tiny-target
D=$src/models/scout-tiny-draft
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done; }
trap 'cleanup; rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
source "$src/tests/server_lib.sh"
echo "cluster throughput ($device workers, data plane: $plane${SCOUT_TARGET_FLAGS:+, targets with $SCOUT_TARGET_FLAGS}): $(nproc) cores, $clients agent sessions at once of $turns turns (64 new tokens + 32 generated a turn; scout bench serve), draft k=4"
printf "%10s | %10s | %9s %9s | %9s %9s | %10s %10s %9s\n" "targets" "tokens/s" "TTFT p50" "TTFT p99" "ITL p50" "ITL p99" \
  "UCX MB w" "UCX MB r" "UCX GB/s"
pin() {  # I COMMAND...: the I-th target process on cores 2I+2 and 2I+3 when there are 16 or more.
  # Run with & : exec makes the background job the command itself, so its pid can be killed.
  local i=$1
  shift
  if [ "$(nproc)" -ge 16 ] && [ "$device" = cpu ]; then
    OPENBLAS_NUM_THREADS=2 exec taskset -c "$((2 * i + 2)),$((2 * i + 3))" "$@"
  else
    exec "$@"
  fi
}
row() {  # NAME LOAD_OUTPUT [CLUSTER_LINE]
  local out=$2 cluster=${3:-} tps errors t50 t99 i50 i99 mbw=- mbr=- gbs=-
  read -r tps errors t50 t99 i50 i99 <<< "$(echo "$out" | python3 -c 'import json,sys
d = json.load(sys.stdin)
print("%.1f" % d["output_throughput"], d["failed"], *("%.1f" % d[k][q] for k in ("ttft", "itl") for q in ("median_ms", "p99_ms")))')"
  if [ -n "$cluster" ]; then
    mbw=$(echo "$cluster" | grep -o "[0-9.]* MB written" | grep -o "^[0-9.]*")
    mbr=$(echo "$cluster" | grep -o "[0-9.]* MB read" | grep -o "^[0-9.]*")
    secs=$(echo "$cluster" | grep -o "in [0-9.]* s" | grep -o "[0-9.]*")
    gbs=$(python3 -c "print(f'{($mbw + $mbr) / 1e3 / max($secs, 1e-9):.2f}')")
  fi
  printf "%10s | %10s | %6s ms %6s ms | %6s ms %6s ms | %10s %10s %9s   errors %s\n" "$1" "$tps" "$t50" "$t99" "$i50" \
    "$i99" "$mbw" "$mbr" "$gbs" "$errors"
}
# The baselines: N independent `scout serve` processes with both models, each on the cores (or
# GPU) the N-th target worker gets below, the sessions split among them; tokens/s summed, TTFT
# over every request, ITL the worst p99 and the mean median.
serve_baseline() {
  local n=$1 ports=() loads=() i per
  per=$(( (clients + n - 1) / n ))
  for i in $(seq 1 "$n"); do
    local log=$work/serve$i.err dev=$device
    [ "$device" = cpu ] || dev=cuda:$((i - 1))
    pin "$i" "$scout" serve --model "$T" --draft "$D" --device "$dev" --host 127.0.0.1 --port 0 --max-num-seqs 64 \
      > /dev/null 2> "$log" &
    pids+=("$!")
    for _ in $(seq 1 300); do
      port=$(grep -o "http://127.0.0.1:[0-9]*" "$log" | grep -o "[0-9]*$")
      [ -n "$port" ] && break
      sleep 0.1
    done
    ports+=("$port")
  done
  for i in $(seq 1 "$n"); do
    "$scout" bench serve --base-url "http://127.0.0.1:${ports[$((i - 1))]}" --sessions "$per" --turn-tokens 64 \
      --session-output-len 32 --session-length $((turns * 96)) --seed "$i" --result-json "$work/base$i.json" \
      > "$work/base$i.txt" 2>&1 &
    loads+=("$!")
  done
  wait "${loads[@]}" 2>/dev/null
  python3 - "$work"/base*.json <<'PY'
import json, sys
runs = [json.load(open(f)) for f in sys.argv[1:]]
ttft = sorted(r["ttft_ms"] for d in runs for r in d["requests"] if r["ok"])
pct = lambda v, q: v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))] if v else float("nan")
print(json.dumps({"output_throughput": sum(d["output_throughput"] for d in runs), "failed": sum(d["failed"] for d in runs),
                  "ttft": {"median_ms": pct(ttft, 0.5), "p99_ms": pct(ttft, 0.99)},
                  "itl": {"median_ms": sum(d["itl"]["median_ms"] for d in runs) / len(runs),
                          "p99_ms": max(d["itl"]["p99_ms"] for d in runs)}}))
PY
  rm -f "$work"/base*.json
}
for w in $counts; do
  row "$w x serve" "$(serve_baseline "$w")"
  cleanup
  wait 2>/dev/null
  pids=()
done
for w in $counts; do
  pids=()
  log=$work/coord-$w.err
  if [ "$plane" = groups ]; then
    start_coordinator "$log" --model "$T" --draft "$D" --data-plane groups
  else
    start_coordinator "$log" --model "$T" --draft "$D" --max-num-seqs 64
  fi
  pids+=("$coord")
  if [ "$plane" = passes ]; then
    for i in 0 1; do
      "$scout" kvstore --host 127.0.0.1 --port 0 --unit-bytes "$unit" --capacity-gb 4 --coordinator "127.0.0.1:$cport" \
        --id "kv$i" 2> "$work/kv$i.err" &
      pids+=("$!")
      "$scout" worker --model "$D" --role draft --device "$device" --coordinator "127.0.0.1:$cport" --id "draft$i" 2> "$work/d$i.err" &
      pids+=("$!")
    done
  fi
  for i in $(seq 1 "$w"); do
    dev=$device
    [ "$device" = cpu ] || [ "$plane" = passes ] || dev=cuda:$((i - 1))
    engine=()
    [ "$plane" = groups ] && engine=(--engine --draft "$D" --max-num-seqs 64)
    pin "$i" "$scout" worker --model "$T" --role target --device "$dev" --coordinator "127.0.0.1:$cport" --id "target$i" \
      "${engine[@]}" $([ "$device" = cpu ] && echo --kv-cache-tokens 131072) "${target_flags[@]}" 2> "$work/t$i.err" &
    pids+=("$!")
  done
  want=$w
  [ "$plane" = passes ] && want=$((4 + w))
  for _ in $(seq 1 300); do
    [ "$(grep -c " registered from " "$log")" -ge "$want" ] && break
    sleep 0.1
  done
  out=$(load "$port")
  kill -TERM "$coord"
  wait "$coord" 2>/dev/null
  if [ "$plane" = passes ]; then
    row "$w groups" "$out" "$(grep "scout: cluster:" "$log")"
  else
    row "$w groups" "$out"
  fi
  grep -o "waited .*" "$log" | sed 's/^/           coordinator /' 
  cleanup
  wait 2>/dev/null
done
