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
