#!/usr/bin/env bash
# The remote KV tier as separate processes on loopback: a coordinator running STS, a draft
# worker, target workers started with --kv-remote-tier and a KV store node, driven over HTTP.
# 1. A target worker is killed (SIGKILL) mid-generation: its sequences are adopted from their
#    homes with at most the last pass run again (the homes hold partial blocks and lengths too), the adopter
#    fetches only the units each step reads, and the text equals a single-process `scout serve`'s.
# 2. A worker is killed again and then the KV store node: a sequence whose units were still only
#    on that node is rebuilt from its tokens (the coordinator holds them), and both requests
#    finish; the one beside it with the same text. (The rebuilt one recomputes densely the tokens
#    that were verified under STS, so its text may drift from the reference.)
# usage: remote_tier_test.sh SCOUT_BINARY SOURCE_DIR
# SCOUT_CLUSTER_DEVICE=cuda runs the reference and the workers on the GPU (KV units in bf16);
# SCOUT_TARGET_FLAGS adds flags to the reference and the target workers (e.g. --host-kv-gb 1).
set -uo pipefail
device=${SCOUT_CLUSTER_DEVICE:-cpu}
unit=8192  # the fixture pair's (layer, KV head, block) unit: 2 x 16 x 64 float32
[ "$device" = cpu ] || unit=4096  # bf16
read -r -a TF <<< "${SCOUT_TARGET_FLAGS:-}"
long_tokens=1500  # long enough that a kill lands mid-generation
[ "$device" = cpu ] || long_tokens=6000
scout=$1
src=$2
T=$src/models/scout-tiny-target
D=$src/models/scout-tiny-draft
STS=(--sparsity sts --kv-budget-tokens 128)
source "$(dirname "$0")/server_lib.sh"
cluster_harness
rm -f ./*.err ./*.out ./*.json

long() { echo "{\"prompt\": \"$1\", \"max_tokens\": $long_tokens, \"temperature\": 0, \"ignore_eos\": true}"; }
metric() { curl -s "$base/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

# --- the reference: one process ------------------------------------------------------------
start_server serve.err --model "$T" --draft "$D" "${STS[@]}" --device "$device" "${TF[@]}"
pids+=("$pid")
complete ref.k1 "$(long "$P1")"
complete ref.k2 "$(long "$P2")"
kill "$pid"
for f in ref.*.out; do grep -q "^curl failed\|^bad reply" "$f" && fail "reference $f: $(cat "$f")"; done

# --- the cluster ---------------------------------------------------------------------------
start_coordinator coord.err --model "$T" --draft "$D" "${STS[@]}" --heartbeat-interval 0.2 --heartbeat-timeout 2 \
  --shutdown-timeout 5
pids+=("$coord")
registered() { for _ in $(seq 1 200); do [ "$(grep -c " registered from " coord.err)" -ge "$1" ] && return; sleep 0.1; done; fail "not $1 members registered"; }
start_member kv0 kvstore --host 127.0.0.1 --port 0 --unit-bytes "$unit" --capacity-gb 1 --id kv0
start_member draft0 worker --model "$D" --role draft --id draft0 --device "$device"
start_member target0 worker --model "$T" --role target --id target0 --kv-remote-tier --device "$device" "${TF[@]}"
start_member target1 worker --model "$T" --role target --id target1 --kv-remote-tier --device "$device" "${TF[@]}"
registered 4

# kill_during NAME: SIGKILL member NAME while both requests still run.
kill_during() {
  sleep 1.5
  kill -0 "$k1" 2>/dev/null && kill -0 "$k2" 2>/dev/null || fail "the requests ended before $1 was killed"
  eval "kill -9 \$pid_$1"
  for _ in $(seq 1 50); do grep -q " $1 is dead" coord.err && break; sleep 0.1; done
}

# 1. Adopted mid-generation with nothing run again.
complete clu.k1 "$(long "$P1")" & k1=$!
complete clu.k2 "$(long "$P2")" & k2=$!
kill_during target0
wait "$k1" "$k2"
cmp -s ref.k1.out clu.k1.out || fail "k1 differs after its worker died: [$(head -c 300 clu.k1.out)]"
cmp -s ref.k2.out clu.k2.out || fail "k2 differs after its worker died: [$(head -c 300 clu.k2.out)]"
adopted=$(metric scout_cluster_adopted_tokens_total)
replayed=$(metric scout_cluster_replayed_tokens_total)
read_bytes=$(metric 'scout_kv_remote_bytes_total{direction="read"}')
[ "${adopted%.*}" -gt 0 ] 2>/dev/null || fail "no tokens adopted ($adopted)"
# The home holds the sequence whole, but for the last pass when the worker was killed between
# its reply and its write (then its record is behind and those k + 1 = 5 tokens run again).
[ "${replayed%.*}" -le 5 ] 2>/dev/null || fail "$replayed tokens were run again; the homes should have held all but the last pass"
echo "ok: adopted $adopted tokens mid-generation, $replayed run again, $read_bytes bytes fetched over UCX; texts equal"

# 2. A worker dies, then the KV store node: only the sequence whose KV was still there fails.
start_member target2 worker --model "$T" --role target --id target2 --kv-remote-tier --device "$device" "${TF[@]}"
registered 5
complete clu.k1b "$(long "$P1")" & k1=$!
complete clu.k2b "$(long "$P2")" & k2=$!
kill_during target1  # its sequence moves to target2 beside the other one
sleep 0.3
kill -9 "$pid_kv0"
wait "$k1" "$k2"
same=0
for n in k1b k2b; do
  r=${n%b}
  grep -q "^curl failed\|^bad reply" "clu.$n.out" && fail "$n did not finish: $(head -c 400 "clu.$n.out")"
  cmp -s "ref.$r.out" "clu.$n.out" && same=$((same + 1))
done
rebuilt=$(grep -c "rebuilding it from its tokens" coord.err)
[ "$same" -ge 1 ] || fail "neither request finished with the reference text"
[ "$rebuilt" -ge 1 ] || [ "$same" = 2 ] || fail "a text differs but no sequence was rebuilt"
echo "ok: the KV store node died; both requests finished ($same with the reference text, $rebuilt sequences rebuilt from their tokens)"

kill -TERM "$coord"
wait "$coord"
grep "scout: cluster:" coord.err
echo "PASS"
