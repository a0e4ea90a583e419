# Sourced by the server tests. Needs $scout and a fail() function.
# start_server LOG ARGS...: starts `$scout serve ARGS --host 127.0.0.1 --port 0` in the
# background, logging to LOG; sets pid, port and base once it has reported its port.
start_server() {
  local log=$1
  shift
  "$scout" serve "$@" --host 127.0.0.1 --port 0 2> "$log" &
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
