# Sourced by the server tests. Needs $scout and a fail() function.
# start_server LOG ARGS...: starts `$scout serve ARGS --host 127.0.0.1 --port 0` in the
# background, logging to LOG; sets pid, port and base once it has reported its port.
# SCOUT_TEST_SERVE_FLAGS adds flags to every server (e.g. "--device cuda" on the GPU machine).
start_server() {
  local log=$1
  shift
  read -r -a extra <<< "${SCOUT_TEST_SERVE_FLAGS:-}"
  "$scout" serve "$@" "${extra[@]}" --host 127.0.0.1 --port 0 2> "$log" &
  pid=$!
  port=""
  for _ in $(seq 1 100); do
    port=$(grep -o "127.0.0.1:[0-9]*" "$log" 2>/dev/null | cut -d: -f2)
    [ -n "$port" ] && break
    sleep 0.1
  done
  [ -n "$port" ] || fail "server did not report its port: $(cat "$log")"
  base="http://127.0.0.1:$port"
}

# start_coordinator LOG ARGS...: starts `$scout coordinator ARGS` on free loopback ports in the
# background, logging to LOG; sets coord (its pid), cport (control port), port and base.
start_coordinator() {
  local log=$1
  shift
  "$scout" coordinator "$@" --host 127.0.0.1 --port 0 --control-host 127.0.0.1 --control-port 0 2> "$log" &
  coord=$!
  for _ in $(seq 1 100); do
    cport=$(grep -o "control channel on 127.0.0.1:[0-9]*" "$log" | grep -o "[0-9]*$")
    port=$(grep -o "http://127.0.0.1:[0-9]*" "$log" | grep -o "[0-9]*$")
    [ -n "$cport" ] && [ -n "$port" ] && break
    sleep 0.1
  done
  [ -n "$cport" ] && [ -n "$port" ] || fail "coordinator did not report its ports"
  base="http://127.0.0.1:$port"
}

# start_member NAME ARGS...: starts `$scout ARGS --coordinator` against the coordinator above,
# logging to NAME.err; sets pid_NAME and adds it to pids.
start_member() {
  local name=$1
  shift
  "$scout" "$@" --coordinator "localhost:$cport" 2> "$name.err" &
  eval "pid_$name=$!"
  pids+=("$!")
}

# check_tenants KEY1 KEY2: against $base, two keys' sessions are each their own: key one's session
# "mine" is seen, continued and deleted by key one only; key two's "mine" is another session.
# Needs fail().
check_tenants() {
  local a1=(-H "Authorization: Bearer $1") a2=(-H "Authorization: Bearer $2") k1 k2 k1b
  k1=$(curl -s "${a1[@]}" "$base/v1/completions" -d '{"prompt": "def f(x):\n", "max_tokens": 4, "temperature": 0, "session_id": "mine"}')
  echo "$k1" | grep -q '"cached_tokens":0' || fail "key one's first turn: $k1"
  curl -s "${a1[@]}" "$base/v1/sessions" | grep -q '"id":"mine"' || fail "key one does not see its session"
  curl -s "${a2[@]}" "$base/v1/sessions" | grep -q '"mine"' && fail "key two sees key one's session"
  [ "$(curl -s -o /dev/null -w '%{http_code}' "${a2[@]}" -X DELETE "$base/v1/sessions/mine")" = 404 ] || fail "key two deleted key one's session"
  k2=$(curl -s "${a2[@]}" "$base/v1/completions" -d '{"prompt": "x", "max_tokens": 2, "session_id": "mine"}')
  echo "$k2" | grep -q '"cached_tokens":0' || fail "key two continued key one's session: $k2"
  k1b=$(curl -s "${a1[@]}" "$base/v1/completions" -d '{"prompt": "\n", "max_tokens": 2, "session_id": "mine"}')
  echo "$k1b" | grep -q '"cached_tokens":[1-9]' || fail "key one's session lost: $k1b"
  [ "$(curl -s -o /dev/null -w '%{http_code}' "${a1[@]}" -X DELETE "$base/v1/sessions/mine")" = 200 ] || fail "key one cannot delete its session"
  curl -s "${a2[@]}" "$base/v1/sessions" | grep -q '"id":"mine"' || fail "key two's own session gone with key one's"
}

# --- The cluster tests' harness (cluster_test.sh, cluster_groups_test.sh, remote_tier_test.sh).
# cluster_harness: the processes listed in pids are killed at exit, and fail shows the tail of
# every *.err log here.
cluster_harness() {
  pids=()
  trap 'for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done' EXIT
  fail() {
    echo "FAIL: $*"
    for f in *.err; do echo "== $f"; tail -n 15 "$f"; done
    exit 1
  }
}
# complete NAME BODY: POST /v1/completions; the text to NAME.out, the reply to NAME.json (a
# request that fails or takes over 120 s fails the test: nothing may hang).
complete() {
  local body
  body=$(curl -s --max-time 120 "$base/v1/completions" -d "$2") || { echo "curl failed: $1" > "$1.out"; return; }
  echo "$body" > "$1.json"
  echo "$body" | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"], end="")' > "$1.out" 2>/dev/null \
    || echo "bad reply: $body" > "$1.out"
}
# Prompts of the fixtures' kind, and request bodies over them: greedy with N tokens, sampled with a
# seed, and a session's turn.
P1='import numpy as np\n\n\ndef softmax(x):\n    '
P2='class Stack:\n    def __init__(self):\n        '
P3='def fibonacci(n):\n    '
P4='# Read a CSV file and print the sum of each column\nimport csv\n'
long() { echo "{\"prompt\": \"$1\", \"max_tokens\": $2, \"temperature\": 0, \"ignore_eos\": true}"; }
sampled() { echo "{\"prompt\": \"$1\", \"max_tokens\": 48, \"temperature\": 0.8, \"top_p\": 0.95, \"seed\": $2, \"ignore_eos\": true}"; }
turn() { echo "{\"prompt\": \"$1\", \"max_tokens\": 24, \"temperature\": 0, \"session_id\": \"$2\", \"ignore_eos\": true}"; }
