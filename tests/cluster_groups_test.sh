#!/usr/bin/env bash
# The cluster's group data plane as separate processes on loopback: a coordinator started with
# --data-plane groups and two target groups (scout worker --engine, the fixture draft in-process),
# driven over HTTP. Outputs must equal a single-process `scout serve`'s; a session returns to the
# group holding its KV; a group killed with SIGKILL mid-generation leaves both requests finishing
# with the same text, and the sessions it held go on, on the other group, from their context.
# usage: cluster_groups_test.sh SCOUT_BINARY SOURCE_DIR
# SCOUT_CLUSTER_DEVICE=cuda runs the reference and the groups on the GPU.
set -uo pipefail
device=${SCOUT_CLUSTER_DEVICE:-cpu}
long_tokens=1200  # long enough that a kill lands mid-generation
[ "$device" = cpu ] || long_tokens=6000
scout=$1
src=$2
T=$src/models/scout-tiny-target
D=$src/models/scout-tiny-draft
source "$(dirname "$0")/server_lib.sh"
cluster_harness
rm -f ./*.err ./*.out ./*.json

cached() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["usage"]["prompt_tokens_details"]["cached_tokens"])' "$1.json"; }

# --- the reference: one process ------------------------------------------------------------
start_server serve.err --model "$T" --draft "$D" --device "$device"
pids+=("$pid")
complete ref.g1 "$(long "$P1" 40)"; complete ref.g2 "$(long "$P2" 40)"; complete ref.g3 "$(long "$P3" 40)"
complete ref.g4 "$(long "$P4" 40)"; complete ref.s1 "$(sampled "$P1" 7)"; complete ref.s2 "$(sampled "$P3" 11)"
complete ref.k1 "$(long "$P1" "$long_tokens")"; complete ref.k2 "$(long "$P2" "$long_tokens")"
for t in 1 2 3 4; do complete "ref.a$t" "$(turn "$P4" "agent")"; done
for t in 1 2 3; do complete "ref.b$t" "$(turn "$P2" "bot")"; done
for t in 1 2; do complete "ref.c$t" "$(turn "$P3" "spill")"; done
kill "$pid"
for f in ref.*.out; do grep -q "^curl failed\|^bad reply" "$f" && fail "reference $f: $(cat "$f")"; done

# --- the cluster ---------------------------------------------------------------------------
start_coordinator coord.err --model "$T" --draft "$D" --data-plane groups --heartbeat-interval 0.2 \
  --heartbeat-timeout 2 --shutdown-timeout 5
pids+=("$coord")
[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/ready")" = 503 ] || fail "/ready without groups should be 503"
code=$(curl -s --max-time 30 -o err.json -w '%{http_code}' "$base/v1/completions" -d "$(long "$P1" 4)")
[ "$code" = 503 ] && grep -q "no live target group" err.json || fail "no group: $code $(cat err.json)"

# Members the group data plane cannot use are refused, naming why.
"$scout" worker --model "$D" --role draft --id stray-draft --coordinator "localhost:$cport" 2> stray-draft.err \
  && fail "a draft worker joined a groups coordinator"
grep -q "runs its draft in-process" stray-draft.err || fail "draft refusal: $(cat stray-draft.err)"
"$scout" worker --model "$T" --role target --id plain --coordinator "localhost:$cport" 2> plain.err \
  && fail "a target worker without --engine joined a groups coordinator"
grep -q "start it with --engine" plain.err || fail "plain target refusal: $(cat plain.err)"
out=$("$scout" coordinator --model "$T" --data-plane groups --sparsity sts --port 0 --control-port 0 2>&1) \
  && fail "an engine flag was taken by a groups coordinator"
echo "$out" | grep -q "give it to scout worker --engine" || fail "engine flag refusal: $out"
echo "ok: a draft worker, a target without --engine and an engine flag on the coordinator are refused"

# g0 first: it registers first, so the router's ties (equal load) go to it.
start_member g0 worker --engine --model "$T" --draft "$D" --role target --id g0 --device "$device" --metrics-port 0
for _ in $(seq 1 200); do grep -q "target g0 registered" coord.err && break; sleep 0.1; done
start_member g1 worker --engine --model "$T" --draft "$D" --role target --id g1 --device "$device"
for _ in $(seq 1 200); do
  [ "$(grep -c " registered from " coord.err)" -ge 2 ] && break
  sleep 0.1
done
[ "$(grep -c " registered from " coord.err)" -ge 2 ] || fail "the 2 groups did not register"
[ "$(curl -s "$base/ready")" = "ready" ] || fail "/ready with groups"

# 1. Outputs equal the single process's (greedy and seeded sampling), spread over both groups.
ps=()
complete clu.g1 "$(long "$P1" 40)" & ps+=($!)
complete clu.g2 "$(long "$P2" 40)" & ps+=($!)
complete clu.g3 "$(long "$P3" 40)" & ps+=($!)
complete clu.g4 "$(long "$P4" 40)" & ps+=($!)
complete clu.s1 "$(sampled "$P1" 7)" & ps+=($!)
complete clu.s2 "$(sampled "$P3" 11)" & ps+=($!)
wait "${ps[@]}"
for n in g1 g2 g3 g4 s1 s2; do
  cmp -s "ref.$n.out" "clu.$n.out" || fail "$n differs from scout serve: [$(cat "clu.$n.out")] vs [$(cat "ref.$n.out")]"
done
echo "ok: 6 outputs equal the single process's"

# 2. Sessions return to their group: the second turn reads the first's KV there (cached tokens).
complete clu.a1 "$(turn "$P4" "agent")"
complete clu.b1 "$(turn "$P2" "bot")"
complete clu.a2 "$(turn "$P4" "agent")"
complete clu.b2 "$(turn "$P2" "bot")"
for n in a1 a2 b1 b2; do cmp -s "ref.$n.out" "clu.$n.out" || fail "session turn $n differs: [$(cat "clu.$n.out")]"; done
[ "$(cached clu.a2)" -gt 0 ] && [ "$(cached clu.b2)" -gt 0 ] \
  || fail "second turns did not reuse their group's KV: $(cat clu.a2.json) $(cat clu.b2.json)"
curl -s "$base/v1/sessions" | grep -q '"id":"agent"' || fail "/v1/sessions: $(curl -s "$base/v1/sessions")"
# The groups' heartbeats carry their KV use: g0 holds agent's context.
sleep 0.6
grep -q '^scout_cluster_kv_usage_ratio{member="g0"} 0\.[0-9]*[1-9]' <<< "$(curl -s "$base/metrics")" \
  || fail "KV use of g0: $(curl -s "$base/metrics" | grep kv_usage)"
echo "ok: sessions return to the group holding their KV"

# 3. SIGKILL the group running a long request (both groups run one), then the sessions move.
complete clu.k1 "$(long "$P1" "$long_tokens")" & k1=$!
complete clu.k2 "$(long "$P2" "$long_tokens")" & k2=$!
sleep 1
kill -0 "$k1" 2>/dev/null && kill -0 "$k2" 2>/dev/null || fail "the requests ended before g0 was killed"
kill -9 "$pid_g0"
wait "$k1" "$k2"
grep -q " g0 is dead" coord.err || fail "the coordinator did not see g0 die"
cmp -s ref.k1.out clu.k1.out || fail "k1 differs after its group died: [$(cat clu.k1.out)]"
cmp -s ref.k2.out clu.k2.out || fail "k2 differs after a group died: [$(cat clu.k2.out)]"
echo "ok: a group killed mid-generation; both requests finished with the same text"
complete clu.a3 "$(turn "$P4" "agent")"
complete clu.b3 "$(turn "$P2" "bot")"
complete clu.a4 "$(turn "$P4" "agent")"
for n in a3 b3 a4; do cmp -s "ref.$n.out" "clu.$n.out" || fail "session turn $n differs after g0 died: [$(cat "clu.$n.out")]"; done
# "agent" started first, on g0 (bot went to g1, which held fewer sessions): its turn 3 was
# prefilled on g1 from its context, and turn 4 reads that.
[ "$(cached clu.a3)" = 0 ] || fail "agent's turn 3 found KV: was it not on g0? $(cat clu.a3.json)"
[ "$(cached clu.b3)" -gt 0 ] || fail "bot (on g1) lost its KV when g0 died: $(cat clu.b3.json)"
[ "$(cached clu.a4)" -gt 0 ] || fail "the moved session's next turn did not reuse its new group's KV: $(cat clu.a4.json)"
echo "ok: both sessions went on after g0 died, on g1, from their context"

# 4. A session is deleted on its group; streaming goes through; /metrics counts at the router.
[ "$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "$base/v1/sessions/agent")" = 200 ] || fail "delete session"
[ "$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "$base/v1/sessions/agent")" = 404 ] || fail "deleted twice"
stream=$(curl -sN --max-time 60 "$base/v1/completions" \
  -d "{\"prompt\": \"$P3\", \"max_tokens\": 40, \"temperature\": 0, \"ignore_eos\": true, \"stream\": true}")
text=$(echo "$stream" | sed -n 's/^data: //p' | grep -v '^\[DONE\]' \
  | python3 -c 'import json,sys; print("".join(json.loads(l)["choices"][0]["text"] for l in sys.stdin), end="")')
[ "$text" = "$(cat ref.g3.out)" ] || fail "streamed text differs: [$text]"
metrics=$(curl -s "$base/metrics")
grep -q '^scout_requests_total{outcome="ok"} [1-9]' <<< "$metrics" || fail "request metrics: $(grep scout_requests <<< "$metrics")"
grep -q '^scout_time_to_first_token_seconds_count [1-9]' <<< "$metrics" || fail "TTFT at the router"
grep -q '^scout_cluster_members{role="target",state="dead"} 1' <<< "$metrics" || fail "members metric"
echo "ok: delete, streaming and the router's metrics"

# 5. Rebalance on overload: g2 runs one request at a time and queues none. New sessions go to
# the group with the least KV in use: "busy", "pad" and "spill" to g2 (g1 holds bot's longer
# context). While a long request of "busy" fills g2, spill's next turn is refused there and
# moves to g1 with its context, with the same text.
start_member g2 worker --engine --model "$T" --draft "$D" --role target --id g2 --device "$device" \
  --max-num-seqs 1 --max-waiting 0
for _ in $(seq 1 200); do grep -q "target g2 registered" coord.err && break; sleep 0.1; done
complete clu.busy1 "$(turn "$P1" "busy")"
complete clu.pad1 "$(turn "$P4" "pad")"
complete clu.c1 "$(turn "$P3" "spill")"
cmp -s ref.c1.out clu.c1.out || fail "spill turn 1 differs: [$(cat clu.c1.out)]"
complete clu.busy2 "{\"prompt\": \"$P1\", \"max_tokens\": $long_tokens, \"temperature\": 0, \"session_id\": \"busy\", \"ignore_eos\": true}" & kb=$!
sleep 1
kill -0 "$kb" 2>/dev/null || fail "busy's long turn ended before spill's turn"
complete clu.c2 "$(turn "$P3" "spill")"
wait "$kb"
cmp -s ref.c2.out clu.c2.out || fail "spill turn 2 differs after moving off the full group: [$(cat clu.c2.out)]"
[ "$(cached clu.c2)" = 0 ] || fail "spill's turn 2 found its KV: it did not move off g2? $(cat clu.c2.json)"
echo "ok: a full group's session moved to a group with room, same text"

# 6. With no group left, requests fail at once with a clear error and /ready says no.
kill -9 "$pid_g1" "$pid_g2"
for _ in $(seq 1 50); do grep -q " g1 is dead" coord.err && grep -q " g2 is dead" coord.err && break; sleep 0.1; done
[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/ready")" = 503 ] || fail "/ready with no group"
code=$(curl -s --max-time 30 -o err.json -w '%{http_code}' "$base/v1/completions" -d "$(long "$P1" 8)")
[ "$code" = 503 ] && grep -q "no live target group" err.json || fail "no group: $code $(cat err.json)"
echo "ok: no group: 503 naming it"
kill -TERM "$coord"
wait "$coord"
grep "scout: cluster:" coord.err
grep -q "scout: cluster: [1-9][0-9]* requests moved .*, [1-9][0-9]* after theirs was full" coord.err \
  || fail "no request counted as moved after a death and after a full group"

# 7. --session-idle-timeout on a groups coordinator: an idle session is forgotten there and
# deleted on its group; its next request starts a new session.
start_coordinator idle.err --model "$T" --data-plane groups --session-idle-timeout 1 --heartbeat-interval 0.2 \
  --heartbeat-timeout 2 --shutdown-timeout 5
pids+=("$coord")
start_member gi worker --engine --model "$T" --role target --id gi --device "$device"
for _ in $(seq 1 100); do [ "$(curl -s "$base/ready")" = "ready" ] && break; sleep 0.1; done
complete idle1 "$(turn "$P4" "quiet")"
complete idle2 "$(turn "$P4" "quiet")"
[ "$(cached idle2)" -gt 0 ] || fail "quiet's second turn found no KV: $(cat idle2.json)"
sleep 2
curl -s "$base/v1/sessions" | grep -q '"quiet"' && fail "an idle session is still listed: $(curl -s "$base/v1/sessions")"
complete idle3 "$(turn "$P4" "quiet")"
[ "$(cached idle3)" = 0 ] && cmp -s idle1.out idle3.out || fail "after the timeout quiet did not start anew: $(cat idle3.json)"
echo "ok: an idle session is forgotten by the coordinator and its group"
kill -TERM "$coord"
wait "$coord"
echo "PASS"
