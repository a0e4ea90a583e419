#!/usr/bin/env bash
# The cluster as separate processes on loopback: a coordinator, 2 draft workers, 2 target
# workers (the fixture pair on the CPU backend) and 2 KV store nodes, driven over HTTP. Outputs
# must equal a single-process `scout serve`'s; then a target worker, a draft worker and a KV store
# node are killed with SIGKILL mid-session, and every request must still finish with the same text.
# usage: cluster_test.sh SCOUT_BINARY SOURCE_DIR
# SCOUT_CLUSTER_DEVICE=cuda runs the reference and the workers on the GPU (KV units in bf16).
set -uo pipefail
device=${SCOUT_CLUSTER_DEVICE:-cpu}
unit=8192  # the fixture pair's (layer, KV head, block) unit: 2 x 16 x 64 float32
[ "$device" = cpu ] || unit=4096  # bf16
long_tokens=1200  # long enough that a kill lands mid-generation
[ "$device" = cpu ] || long_tokens=6000
scout=$1
src=$2
T=$src/models/scout-tiny-target
D=$src/models/scout-tiny-draft
source "$(dirname "$0")/server_lib.sh"
cluster_harness
rm -f ./*.err ./*.out


# requests PREFIX: every request of the test, results in PREFIX.*.out.
requests() {
  local p=$1 ps=()
  complete "$p.g1" "$(long "$P1" 40)" & ps+=($!)
  complete "$p.g2" "$(long "$P2" 40)" & ps+=($!)
  complete "$p.g3" "$(long "$P3" 40)" & ps+=($!)
  complete "$p.g4" "$(long "$P4" 40)" & ps+=($!)
  complete "$p.s1" "$(sampled "$P1" 7)" & ps+=($!)
  complete "$p.s2" "$(sampled "$P3" 11)" & ps+=($!)
  wait "${ps[@]}"
}

# --- the reference: one process ------------------------------------------------------------
start_server serve.err --model "$T" --draft "$D" --device "$device"
pids+=("$pid")
complete ref.g1 "$(long "$P1" 40)"; complete ref.g2 "$(long "$P2" 40)"; complete ref.g3 "$(long "$P3" 40)"
complete ref.g4 "$(long "$P4" 40)"; complete ref.s1 "$(sampled "$P1" 7)"; complete ref.s2 "$(sampled "$P3" 11)"
complete ref.k1 "$(long "$P1" "$long_tokens")"; complete ref.k2 "$(long "$P2" "$long_tokens")"
for t in 1 2 3 4; do complete "ref.t$t" "$(turn "$P4" "agent")"; done
kill "$pid"
for f in ref.*.out; do grep -q "^curl failed\|^bad reply" "$f" && fail "reference $f: $(cat "$f")"; done

# --- the cluster ---------------------------------------------------------------------------
start_coordinator coord.err --model "$T" --draft "$D" --heartbeat-interval 0.2 --heartbeat-timeout 2 \
  --shutdown-timeout 5
pids+=("$coord")
[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/ready")" = 503 ] || fail "/ready without workers should be 503"

start_member kv0 kvstore --host localhost --port 0 --unit-bytes "$unit" --capacity-gb 1 --id kv0
start_member kv1 kvstore --host localhost --port 0 --unit-bytes "$unit" --capacity-gb 1 --id kv1
start_member draft0 worker --model "$D" --role draft --id draft0 --device "$device"
start_member draft1 worker --model "$D" --role draft --id draft1 --device "$device"
start_member target0 worker --model "$T" --role target --id target0 --device "$device"
start_member target1 worker --model "$T" --role target --id target1 --device "$device"
for _ in $(seq 1 200); do
  [ "$(grep -c " registered from " coord.err)" -ge 6 ] && break
  sleep 0.1
done
[ "$(grep -c " registered from " coord.err)" -ge 6 ] || fail "not all 6 members registered"
[ "$(curl -s "$base/ready")" = "ready" ] || fail "/ready with workers"

# 1. Outputs equal the single process's, with requests spread over both target workers.
requests clu
for n in g1 g2 g3 g4 s1 s2; do
  cmp -s "ref.$n.out" "clu.$n.out" || fail "$n differs from scout serve: [$(cat "clu.$n.out")] vs [$(cat "ref.$n.out")]"
done
complete clu.t1 "$(turn "$P4" "agent")"
cmp -s ref.t1.out clu.t1.out || fail "session turn 1 differs"
echo "ok: 7 outputs equal the single process's"

# 2. SIGKILL a target worker while two long requests run (one on each target worker).
# kill_during NAME: SIGKILL member NAME while both requests still run, then wait for them.
kill_during() {
  sleep 1
  kill -0 "$k1" 2>/dev/null && kill -0 "$k2" 2>/dev/null || fail "the requests ended before $1 was killed"
  eval "kill -9 \$pid_$1"
  wait "$k1" "$k2"
  grep -q " $1 is dead" coord.err || fail "the coordinator did not see $1 die"
}
complete clu.k1 "$(long "$P1" "$long_tokens")" & k1=$!
complete clu.k2 "$(long "$P2" "$long_tokens")" & k2=$!
kill_during target0
cmp -s ref.k1.out clu.k1.out || fail "k1 differs after a target worker died: [$(cat clu.k1.out)]"
cmp -s ref.k2.out clu.k2.out || fail "k2 differs after a target worker died: [$(cat clu.k2.out)]"
echo "ok: a target worker killed mid-generation; both requests finished with the same text"

# 3. SIGKILL a draft worker the same way.
complete clu.k1b "$(long "$P1" "$long_tokens")" & k1=$!
complete clu.k2b "$(long "$P2" "$long_tokens")" & k2=$!
kill_during draft0
cmp -s ref.k1.out clu.k1b.out || fail "k1 differs after a draft worker died"
cmp -s ref.k2.out clu.k2b.out || fail "k2 differs after a draft worker died"
echo "ok: a draft worker killed mid-generation; both requests finished with the same text"

# 4. SIGKILL both KV store nodes (a third joins in between, so whichever held the session is
# gone); the session goes on, and survives the death of its worker later: the worker wrote its
# KV to the new node, from which a new worker adopts it.
# The session's next turn first, so it sits on a live worker (adopted from its home if its
# worker was target0).
complete clu.t2 "$(turn "$P4" "agent")"
cmp -s ref.t2.out clu.t2.out || fail "session turn 2 differs: [$(cat clu.t2.out)]"
kill -9 "$pid_kv0"
start_member kv2 kvstore --host localhost --port 0 --unit-bytes "$unit" --capacity-gb 1 --id kv2
for _ in $(seq 1 100); do grep -q "kvstore kv2 registered" coord.err && break; sleep 0.1; done
kill -9 "$pid_kv1"
for _ in $(seq 1 50); do grep -q "kvstore kv1 is dead" coord.err && break; sleep 0.1; done
complete clu.t3 "$(turn "$P4" "agent")"
cmp -s ref.t3.out clu.t3.out || fail "session turn 3 differs after its KV store node died: [$(cat clu.t3.out)]"
start_member target2 worker --model "$T" --role target --id target2 --device "$device"
for _ in $(seq 1 100); do grep -q "target target2 registered" coord.err && break; sleep 0.1; done
kill -9 "$pid_target1"
for _ in $(seq 1 50); do grep -q "target target1 is dead" coord.err && break; sleep 0.1; done
complete clu.t4 "$(turn "$P4" "agent")"
cmp -s ref.t4.out clu.t4.out || fail "session turn 4 differs after its worker died: [$(cat clu.t4.out)]"
echo "ok: KV store nodes killed; the session's KV moved home and a new worker adopted it"

# 5. With no draft worker left, requests fail at once with a clear error and /ready says no.
kill -9 "$pid_draft1"
for _ in $(seq 1 50); do grep -q "draft draft1 is dead" coord.err && break; sleep 0.1; done
[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/ready")" = 503 ] || fail "/ready with no draft worker"
code=$(curl -s --max-time 30 -o err.json -w '%{http_code}' "$base/v1/completions" -d "$(long "$P1" 8)")
[ "$code" = 503 ] && grep -q "no live draft worker" err.json || fail "no draft worker: $code $(cat err.json)"
echo "ok: no draft worker: 503 naming it"

# The cluster's metrics, on the coordinator's /metrics.
metrics=$(curl -s "$base/metrics")
grep -q '^scout_cluster_members{role="target",state="dead"} 2' <<< "$metrics" || fail "members metric: $(echo "$metrics" | grep scout_cluster)"
grep -q '^scout_cluster_failovers_total [1-9]' <<< "$metrics" || fail "failovers metric"
grep -q '^scout_kv_remote_bytes_total{direction="write"} [1-9]' <<< "$metrics" || fail "KV bytes metric"
echo "ok: the cluster's metrics on /metrics"

kill -TERM "$coord"
wait "$coord"
grep "scout: cluster:" coord.err
grep -q "scout: cluster: [1-9][0-9]* failovers, [1-9][0-9]* tokens adopted" coord.err || fail "no failovers or adoptions counted"
grep -q ", [1-9][0-9]* rehomed" coord.err || fail "no sequence moved to a new KV home"
# A placement config with an unknown key is refused by name.
printf 'target_classes: [H100]\ncolours: 3\n' > bad-cluster.yaml
out=$("$scout" coordinator --model "$T" --cluster-config bad-cluster.yaml --port 0 --control-port 0 2>&1) \
  && fail "a bad cluster config was accepted"
echo "$out" | grep -q 'unknown key "colours"' || fail "bad cluster config: $out"
# API keys and tenants through the coordinator, as through one server: /v1 needs a key, each key
# sees, continues and deletes only its own sessions, /health stays open.
start_coordinator keys.err --model "$T" --api-key key-one,key-two --heartbeat-interval 0.2 --heartbeat-timeout 2 \
  --shutdown-timeout 5
pids+=("$coord")
start_member ktarget worker --model "$T" --role target --id ktarget --device "$device"
for _ in $(seq 1 100); do [ "$(curl -s "$base/ready")" = "ready" ] && break; sleep 0.1; done
[ "$(curl -s -o err.json -w '%{http_code}' "$base/v1/models")" = 401 ] || fail "coordinator without a key: $(cat err.json)"
[ "$(curl -s "$base/health")" = "OK" ] || fail "coordinator /health behind the key"
check_tenants key-one key-two
echo "ok: keys and tenants through the coordinator"
kill -TERM "$coord"
wait "$coord"
echo "PASS"
