#!/usr/bin/env bash
# A real Prometheus scrapes a real `scout serve`: the monitoring files pass promtool, /metrics
# passes `promtool check metrics`, and request counts come back through Prometheus's query API.
# usage: prometheus_test.sh SCOUT_BINARY SOURCE_DIR
set -uo pipefail
scout=$1
src=$2
fail() {
  echo "FAIL: $*"
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null
  [ -n "${ppid_:-}" ] && kill "$ppid_" 2>/dev/null
  tail -20 prom.log 2>/dev/null
  exit 1
}
source "$(dirname "$0")/server_lib.sh"
command -v prometheus >/dev/null && command -v promtool >/dev/null || fail "prometheus and promtool are needed (tools/setup.sh installs them)"

promtool check config "$src/monitoring/prometheus.yml" >/dev/null || fail "promtool check config"
promtool check rules "$src/monitoring/rules.yml" >/dev/null || fail "promtool check rules"
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['panels']" "$src/monitoring/grafana/scout.json" 2>/dev/null \
  || grep -q '"panels"' "$src/monitoring/grafana/scout.json" || fail "grafana dashboard JSON"

start_server serve.err --model "$src/models/scout-tiny-target" --draft "$src/models/scout-tiny-draft" \
  --sparsity sts --kv-budget-fraction 0.2
curl -s "$base/metrics" | promtool check metrics || fail "promtool check metrics on /metrics"

# Prometheus on a free port, scraping the server every second.
pport=""
for p in $(shuf -i 20000-60000 -n 50); do
  if ! (echo > "/dev/tcp/127.0.0.1/$p") 2>/dev/null; then pport=$p; break; fi
done
[ -n "$pport" ] || fail "no free port for prometheus"
cat > prom.yml <<CFG
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: ["$src/monitoring/rules.yml"]
scrape_configs:
  - job_name: scout
    static_configs: [{targets: ["127.0.0.1:$port"]}]
CFG
rm -rf tsdb
prometheus --config.file=prom.yml --storage.tsdb.path=tsdb --web.listen-address="127.0.0.1:$pport" > prom.log 2>&1 &
ppid_=$!
# Prompts long enough (~600 tokens, 38 blocks) that a 20% STS budget reads a subset.
long_prompt=$(head -c 600 "$src/models/goldens/long_prompt.txt" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')
for i in 1 2 3; do
  curl -s "$base/v1/completions" -d '{"prompt": '"$long_prompt"', "max_tokens": 16, "seed": '"$i"'}' >/dev/null || fail "request $i"
done
query() { curl -s "http://127.0.0.1:$pport/api/v1/query" --data-urlencode "query=$1"; }
ok=""
for _ in $(seq 1 60); do
  r=$(query 'sum(scout_requests_total{outcome="ok"})')
  if echo "$r" | grep -q '"value":\[[0-9.]*,"3"\]'; then ok=1; break; fi
  sleep 0.5
done
[ -n "$ok" ] || fail "prometheus never saw 3 ok requests: $r"
query 'up{job="scout"}' | grep -q '"value":\[[0-9.]*,"1"\]' || fail "up{job=scout} != 1"
query 'scout_spec_decode_num_accepted_tokens_total' | grep -q '"result":\[{' || fail "acceptance series missing"
query 'scout_time_to_first_token_seconds_count' | grep -q '"value":\[[0-9.]*,"3"\]' || fail "TTFT count"
# Sparsity through Prometheus: STS read some of the blocks, not all, and skipped bytes were counted.
sparsity=$(query '1 - sum(scout_attention_blocks_read_total) / sum(scout_attention_blocks_dense_total)')
python3 -c 'import json,sys; v=float(json.loads(sys.argv[1])["data"]["result"][0]["value"][1]); assert 0.3 < v < 1, v' "$sparsity" \
  || fail "attention sparsity series: $sparsity"
query 'scout_attention_kv_skipped_bytes_total > 0' | grep -q '"result":\[{' || fail "skipped KV bytes series"
query 'scout_attention_blocks_read_ratio_count' | grep -q '"value":\[[0-9.]*,"3"\]' || fail "read-ratio histogram"
query 'scout_attention_layer_blocks_read_ratio_count{layer="0"}' | grep -q '"value":\[[0-9.]*,"3"\]' || fail "per-layer read-ratio histogram"
# The host KV tier's bandwidth series (zero on the CPU backend, which has no tier: the GPU smoke
# test checks their values) are scraped and queryable, as the dashboard's bandwidth panel uses them.
for m in scout_kv_prefetch_bytes_total scout_kv_prefetch_seconds_total scout_kv_flush_bytes_total \
         scout_kv_block_cache_hits_total scout_kv_block_cache_misses_total scout_gpu_block_cache_usage_ratio; do
  query "$m" | grep -q '"result":\[{' || fail "$m series missing"
done
curl -s "http://127.0.0.1:$pport/api/v1/rules" | grep -q '"name":"ScoutDown"' || fail "alert rules not loaded"

kill "$ppid_" 2>/dev/null
kill -TERM "$pid"
wait "$pid" || fail "server exit after SIGTERM"
echo "prometheus_test: ok"
