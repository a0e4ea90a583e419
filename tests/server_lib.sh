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
