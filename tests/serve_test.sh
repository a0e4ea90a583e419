#!/usr/bin/env bash
# End-to-end: a real `scout serve` process on a free loopback port, driven over HTTP with curl.
# usage: serve_test.sh SCOUT_BINARY SOURCE_DIR
set -uo pipefail
scout=$1
src=$2
fail() { echo "FAIL: $*"; [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; cat serve.err 2>/dev/null; exit 1; }
source "$(dirname "$0")/server_lib.sh"
py() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

start_server serve.err --model "$src/models/scout-tiny-target" --draft "$src/models/scout-tiny-draft" --max-request-bytes 1048576

[ "$(curl -s "$base/health")" = "OK" ] || fail "/health"
[ "$(curl -s "$base/ready")" = "ready" ] || fail "/ready"
curl -s "$base/v1/models" | grep -q '"id":"scout-tiny-target"' || fail "/v1/models"

# /version, /tokenize and /detokenize (vLLM's): a prompt's count is the usage.prompt_tokens of a
# completion of it, chat messages tokenize as the chat endpoint renders them, and ids come back.
curl -s "$base/version" | grep -q "\"version\":\"$("$scout" --version | cut -d' ' -f2)\"" || fail "/version: $(curl -s "$base/version")"
tok=$(curl -s "$base/tokenize" -d '{"prompt": "def f(x):\n"}')
count=$(echo "$tok" | py 'd["count"]') || fail "/tokenize: $tok"
usage=$(curl -s "$base/v1/completions" -d '{"prompt": "def f(x):\n", "max_tokens": 1}' | py 'd["usage"]["prompt_tokens"]')
[ "$count" = "$usage" ] || fail "/tokenize count $count, completion prompt_tokens $usage"
ids=$(echo "$tok" | py 'json.dumps(d["tokens"][1:])')
[ "$(curl -s "$base/detokenize" -d "{\"tokens\": $ids}" | py 'd["prompt"]')" = "def f(x):" ] || fail "/detokenize of $ids"
chat_count=$(curl -s "$base/tokenize" -d '{"messages": [{"role": "user", "content": "hi"}]}' | py 'd["count"]')
chat_usage=$(curl -s "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}' | py 'd["usage"]["prompt_tokens"]')
[ "$chat_count" = "$chat_usage" ] || fail "chat /tokenize count $chat_count, chat prompt_tokens $chat_usage"
[ "$(curl -s -o err.json -w '%{http_code}' "$base/detokenize" -d '{"tokens": [1, 99999999]}')" = 400 ] && grep -q "99999999" err.json || fail "bad id: $(cat err.json)"
[ "$(curl -s -o err.json -w '%{http_code}' "$base/tokenize" -d '{"prompt": 5}')" = 400 ] || fail "bad /tokenize body: $(cat err.json)"

# A greedy completion equals `scout generate` (speculative decoding on the server keeps greedy exact).
body=$(curl -s "$base/v1/completions" -d '{"model": "scout-tiny-target", "prompt": "import numpy as np\n\n\ndef softmax(x):\n    ", "max_tokens": 40, "temperature": 0}')
echo "$body" | grep -q '"finish_reason":"length"' || fail "completion: $body"
echo "$body" | grep -q '"completion_tokens":40' || fail "usage: $body"
# On the server's device (SCOUT_TEST_SERVE_FLAGS): the CPU and CUDA backends round differently
# (bf16 on the GPU), and a near-tie in 40 greedy tokens may go either way between them.
read -r -a serve_extra <<< "${SCOUT_TEST_SERVE_FLAGS:-}"
want=$("$scout" generate --model "$src/models/scout-tiny-target" --prompt $'import numpy as np\n\n\ndef softmax(x):\n    ' --max-tokens 40 --ignore-eos "${serve_extra[@]}" 2>/dev/null)
got=$(echo "$body" | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])' 2>/dev/null) || got=""
if [ -n "$got" ]; then [ "$got" = "$want" ] || fail "server text differs from scout generate: [$got] vs [$want]"; fi

# A stop string ends the text before it.
body=$(curl -s "$base/v1/completions" -d '{"prompt": "import numpy as np\n\n\ndef softmax(x):\n    ", "max_tokens": 40, "temperature": 0, "stop": ["softmax"]}')
echo "$body" | grep -q '"finish_reason":"stop"' || fail "stop: $body"
echo "$body" | grep -q 'softmax' && fail "stop string returned: $body"

# Streaming: server-sent events ending in [DONE].
stream=$(curl -sN "$base/v1/completions" -d '{"prompt": "def f(x):\n", "max_tokens": 8, "temperature": 0, "stream": true}')
echo "$stream" | grep -q '^data: {' || fail "no stream events: $stream"
echo "$stream" | tail -n 3 | grep -q '^data: \[DONE\]' || fail "stream not closed with [DONE]: $stream"

# Chat: the assistant's message, whole or as chat.completion.chunk deltas.
chat=$(curl -s "$base/v1/chat/completions" -d '{"messages": [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}], "max_tokens": 12, "temperature": 0}')
echo "$chat" | grep -q '"object":"chat.completion"' || fail "chat: $chat"
echo "$chat" | grep -q '"role":"assistant"' || fail "chat message: $chat"
chats=$(curl -sN "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": true}')
echo "$chats" | grep -q '"object":"chat.completion.chunk"' || fail "chat stream: $chats"
echo "$chats" | tail -n 3 | grep -q '^data: \[DONE\]' || fail "chat stream not closed: $chats"
[ "$(curl -s -o err.json -w '%{http_code}' "$base/v1/chat/completions" -d '{"messages": []}')" = 400 ] || fail "empty messages"
[ "$(curl -s -o err.json -w '%{http_code}' "$base/v1/chat/completions" -d '{"messages": [{"role": "robot", "content": "x"}]}')" = 400 ] || fail "bad role"

# Bad requests get the OpenAI error object and the right status; none disturbs the server.
code() { curl -s -o err.json -w '%{http_code}' "$base/v1/completions" -d "$1"; }
[ "$(code '{bad')" = 400 ] && grep -q '"type":"invalid_request_error"' err.json || fail "malformed JSON"
[ "$(code '{"prompt": "x", "max_tokens": -3}')" = 400 ] || fail "negative max_tokens"
[ "$(code '{"prompt": "x", "model": "gpt-4"}')" = 404 ] || fail "unknown model"
[ "$(code '{"max_tokens": 3}')" = 400 ] || fail "missing prompt"
[ "$(code '{"prompt": "x", "max_tokens": 100000}')" = 400 ] && grep -q "exceeds the model" err.json || fail "over max-model-len"
[ "$(code '{"prompt": "x", "temperature": -1}')" = 400 ] || fail "negative temperature"
[ "$(code '{"prompt": "def f(x):", "max_tokens": 4, "sparsity": "sts", "kv_budget_fraction": 0.5}')" = 200 ] || fail "per-request sts"
[ "$(code '{"prompt": "x", "sparsity": "sparse"}')" = 400 ] || fail "unknown sparsity"
[ "$(code '{"prompt": "x", "sparsity": 5}')" = 400 ] && grep -q "malformed field" err.json || fail "sparsity of the wrong type"
[ "$(code '{"prompt": "x", "kv_budget_tokens": "many"}')" = 400 ] || fail "kv_budget_tokens of the wrong type"
[ "$(code '{"prompt": "x", "kv_budget_fraction": 1.5}')" = 400 ] || fail "budget fraction over 1"
[ "$(code '{"prompt": "def f(x):", "max_tokens": 4, "sparsity": "sts", "dense_layers": [-1]}')" = 200 ] || fail "dense_layers"
[ "$(code '{"prompt": "x", "sparsity": "sts", "dense_layers": [6]}')" = 400 ] && grep -q "dense_layers names layer 6" err.json \
  || fail "dense_layers past the model"
[ "$(code '{"prompt": "x", "dense_layers": "last"}')" = 400 ] || fail "dense_layers of the wrong type"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/nope")" = 404 ] || fail "unknown route"

# A body over --max-request-bytes gets 413 with the error object; the server goes on.
python3 -c 'import json; print(json.dumps({"prompt": "x" * 3000000, "max_tokens": 1}))' > big.json
[ "$(curl -s -o err.json -w '%{http_code}' "$base/v1/completions" --data-binary @big.json)" = 413 ] \
  && grep -q "max-request-bytes" err.json || fail "oversized body: $(cat err.json)"
[ "$(curl -s "$base/health")" = "OK" ] || fail "/health after an oversized body"

# The OpenAI SDK's fields: each implemented or refused by name, none silently ignored.
usage_stream=$(curl -sN "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}}')
echo "$usage_stream" | grep -q '"choices":\[\],.*"usage":{' || echo "$usage_stream" | grep -q '"usage":{.*"choices":\[\]' \
  || fail "no usage chunk with include_usage: $usage_stream"
mct=$(curl -s "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3, "ignore_eos": true}')
echo "$mct" | grep -q '"completion_tokens":3' || fail "max_completion_tokens ignored: $mct"
parts=$(curl -s "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": [{"type": "text", "text": "def "}, {"type": "text", "text": "add(a, b):"}]}], "max_tokens": 4, "temperature": 0}')
flat=$(curl -s "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 4, "temperature": 0}')
[ "$(echo "$parts" | py 'd["choices"][0]["message"]["content"]' 2>/dev/null)" = "$(echo "$flat" | py 'd["choices"][0]["message"]["content"]' 2>/dev/null)" ] \
  || fail "content parts differ from the same text: $parts vs $flat"
[ "$(curl -s -o err.json -w '%{http_code}' "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}')" = 400 ] \
  && grep -q "image_url" err.json || fail "image part not refused by name: $(cat err.json)"
for field in '"best_of": 3'; do
  name=$(echo "$field" | cut -d'"' -f2)
  [ "$(code "{\"prompt\": \"x\", $field}")" = 400 ] && grep -q "\"param\":\"$name\"" err.json || fail "$name not refused by name: $(cat err.json)"
done
# Penalties with a draft act on the target's verification rows: each is taken and changes the
# greedy text.
plain_text=$(curl -s "$base/v1/completions" -d '{"prompt": "def f(x):", "max_tokens": 40, "temperature": 0, "ignore_eos": true}' | py 'd["choices"][0]["text"]')
for field in '"frequency_penalty": 1.5' '"presence_penalty": 2' '"repetition_penalty": 1.5'; do
  name=$(echo "$field" | cut -d'"' -f2)
  [ "$(code "{\"prompt\": \"def f(x):\", \"max_tokens\": 40, \"temperature\": 0, \"ignore_eos\": true, $field}")" = 200 ] \
    || fail "$name with a draft: $(cat err.json)"
  [ "$(py 'd["choices"][0]["text"]' < err.json)" != "$plain_text" ] || fail "$name with a draft did not change the text"
done
# Logprobs with a draft: the target's distribution at each emitted token (greedy: the chosen token
# is the target's most likely, so it heads its alternatives).
lp=$(curl -s "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 2}')
echo "$lp" | python3 -c 'import json, sys
d = json.load(sys.stdin)
c = d["choices"][0]["logprobs"]["content"]
assert len(c) == d["usage"]["completion_tokens"], (len(c), d["usage"])
for x in c:
    assert len(x["top_logprobs"]) == 2 and x["logprob"] <= 0, x
    assert x["top_logprobs"][0]["token"] == x["token"] and abs(x["top_logprobs"][0]["logprob"] - x["logprob"]) < 1e-6, x' \
  || fail "logprobs with a draft: $lp"
[ "$(code '{"prompt": "x", "max_tokens": 2, "n": 1, "logprobs": null, "frequency_penalty": 0}')" = 200 ] || fail "default values refused: $(cat err.json)"
# Token-id prompts (the fixtures' bytes, BOS 256 given by the client) and batches of prompts.
byid=$(curl -s "$base/v1/completions" -d '{"prompt": [256, 100, 101, 102, 32, 102], "max_tokens": 8, "temperature": 0}' | py 'd["choices"][0]["text"]')
bytext=$(curl -s "$base/v1/completions" -d '{"prompt": "def f", "max_tokens": 8, "temperature": 0}' | py 'd["choices"][0]["text"]')
[ "$byid" = "$bytext" ] || fail "token-id prompt differs from its text: [$byid] vs [$bytext]"
batch=$(curl -s "$base/v1/completions" -d '{"prompt": ["def f", [256, 105, 109, 112]], "max_tokens": 8, "temperature": 0}')
[ "$(echo "$batch" | py 'len(d["choices"])')" = 2 ] || fail "batch: $batch"
[ "$(echo "$batch" | py 'd["choices"][0]["text"]')" = "$bytext" ] || fail "batch choice 0: $batch"
[ "$(echo "$batch" | py 'd["choices"][1]["index"]')" = 1 ] || fail "batch index: $batch"
[ "$(echo "$batch" | py 'd["usage"]["completion_tokens"]')" = 16 ] || fail "batch usage: $batch"
[ "$(code '{"prompt": [256, 99999], "max_tokens": 2}')" = 400 ] && grep -q "99999" err.json || fail "bad token id: $(cat err.json)"
sbatch=$(curl -sN "$base/v1/completions" -d '{"prompt": ["a", "b"], "stream": true, "max_tokens": 2, "ignore_eos": true}')
echo "$sbatch" | grep -q '"index":1' && [ "$(echo "$sbatch" | grep -c '"finish_reason":"length"')" = 2 ] \
  && [ "$(echo "$sbatch" | grep -c '\[DONE\]')" = 1 ] || fail "streamed batch: $sbatch"
# n choices: one engine request each, seeded by the request's seed and their index.
nreq='{"prompt": "import", "n": 3, "max_tokens": 12, "temperature": 1, "seed": 5, "ignore_eos": true}'
n1=$(curl -s "$base/v1/completions" -d "$nreq")
[ "$(echo "$n1" | py '[c["index"] for c in d["choices"]]')" = "[0, 1, 2]" ] || fail "n=3 choices: $n1"
[ "$(echo "$n1" | py 'len(set(c["text"] for c in d["choices"]))')" -gt 1 ] || fail "n=3 gave one text three times: $n1"
[ "$(echo "$n1" | py 'd["usage"]["completion_tokens"]')" = 36 ] || fail "n=3 usage: $n1"
one=$(curl -s "$base/v1/completions" -d '{"prompt": "import", "max_tokens": 1}' | py 'd["usage"]["prompt_tokens"]')
[ "$(echo "$n1" | py 'd["usage"]["prompt_tokens"]')" = "$one" ] || fail "n=3 counted the prompt more than once: $n1"
n2=$(curl -s "$base/v1/completions" -d "$nreq")
[ "$(echo "$n1" | py '[c["text"] for c in d["choices"]]')" = "$(echo "$n2" | py '[c["text"] for c in d["choices"]]')" ] \
  || fail "seeded n=3 did not repeat: $n1 vs $n2"
nchat=$(curl -s "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3}')
[ "$(echo "$nchat" | py 'len([c for c in d["choices"] if c["message"]["role"] == "assistant"])')" = 2 ] || fail "chat n=2: $nchat"
nstream=$(curl -sN "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 4, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}')
echo "$nstream" | grep -q '"index":0' && echo "$nstream" | grep -q '"index":1' \
  && [ "$(echo "$nstream" | grep -c '"finish_reason":"length"')" = 2 ] && echo "$nstream" | grep -q '"completion_tokens":8' \
  || fail "streamed n=2: $nstream"
[ "$(code '{"prompt": "x", "n": 2, "session_id": "nsess"}')" = 400 ] && grep -q '"param":"n"' err.json || fail "n on a session: $(cat err.json)"
for bad in 0 '"2"' 1000; do
  [ "$(code "{\"prompt\": \"x\", \"n\": $bad}")" = 400 ] && grep -q '"param":"n"' err.json || fail "n $bad: $(cat err.json)"
done
[ "$(code '{"prompt": [1.5]}')" = 400 ] || fail "float prompt"
[ "$(code '{"prompt": "a", "max_tokens": 1, "user": "alice"}')" = 200 ] || fail "user: $(cat err.json)"
[ "$(code '{"prompt": "a", "max_tokens": 1, "user": 5}')" = 400 ] && grep -q '"param":"user"' err.json || fail "user 5: $(cat err.json)"
# No seed: fresh randomness (four sampled continuations are not all the same); a seed repeats.
texts=$(for i in 1 2 3 4; do curl -s "$base/v1/completions" -d '{"prompt": "import", "max_tokens": 24, "temperature": 1, "ignore_eos": true}' | py 'd["choices"][0]["text"]'; done | sort -u | wc -l)
[ "$texts" -gt 1 ] || fail "unseeded requests all gave the same text"
s1=$(curl -s "$base/v1/completions" -d '{"prompt": "import", "max_tokens": 24, "temperature": 1, "seed": 7}' | py 'd["choices"][0]["text"]')
s2=$(curl -s "$base/v1/completions" -d '{"prompt": "import", "max_tokens": 24, "temperature": 1, "seed": 7}' | py 'd["choices"][0]["text"]')
[ "$s1" = "$s2" ] || fail "seeded requests differ: [$s1] vs [$s2]"

# scout bench serve against this server: random requests at a rate, then agent sessions whose
# later turns are served from the kept KV.
"$scout" bench serve --base-url "$base" --num-prompts 8 --request-rate 50 --max-concurrency 4 --random-input-len 40 \
  --random-output-len 8 --goodput ttft:60000 --result-json bench.json > bench.txt 2>&1 || fail "bench serve: $(cat bench.txt)"
grep -q "Successful requests: *8" bench.txt && grep -q "Request goodput" bench.txt || fail "bench serve report: $(cat bench.txt)"
[ "$(py 'd["completed"], d["total_output_tokens"], d["total_input_tokens"], d["ttft"]["mean_ms"] > 0, d["itl"]["p99_ms"] > 0' < bench.json)" \
  = "8 64 320 True True" ] || fail "bench serve JSON: $(head -c 600 bench.json)"
"$scout" bench serve --base-url "$base" --sessions 2 --turn-tokens 50 --session-output-len 10 --session-length 240 \
  --result-json sessions.json > sessions.txt 2>&1 || fail "bench serve sessions: $(cat sessions.txt)"
[ "$(py 'd["completed"], d["failed"], all(r["cached_tokens"] > 0 for r in d["requests"] if r["turn"] > 0)' < sessions.json)" \
  = "8 0 True" ] || fail "bench serve sessions JSON: $(head -c 600 sessions.json)"
[ "$(curl -s "$base/v1/sessions" | py 'len(d["data"])')" = 0 ] || fail "bench serve left its sessions: $(curl -s "$base/v1/sessions")"
printf '{"prompt": "def f(x):", "max_tokens": 3}\n\n{"prompt": [256, 105, 109], "max_tokens": 5}\n' > prompts.jsonl
"$scout" bench serve --base-url "$base" --dataset-path prompts.jsonl --num-prompts 3 --endpoint /v1/completions \
  --result-json dataset.json > dataset.txt 2>&1 || fail "bench serve dataset: $(cat dataset.txt)"
[ "$(py 'd["completed"], d["total_output_tokens"]' < dataset.json)" = "3 11" ] || fail "bench serve dataset JSON: $(head -c 400 dataset.json)"
"$scout" bench serve --base-url "$base" --endpoint /v1/chat/completions --num-prompts 2 --random-input-len 16 \
  --random-output-len 4 --result-json chat.json > chat.txt 2>&1 || fail "bench serve chat: $(cat chat.txt)"
[ "$(py 'd["completed"], d["total_output_tokens"]' < chat.json)" = "2 8" ] || fail "bench serve chat JSON: $(head -c 400 chat.json)"
"$scout" bench serve --base-url "$base" --num-prompts 6 --request-rate 100 --burstiness 0.5 --random-input-len 8 \
  --random-output-len 3 --metric-percentiles 50,90 --result-json pct.json > pct.txt 2>&1 || fail "bench serve percentiles: $(cat pct.txt)"
grep -q "TTFT mean / median / p50 / p90 (ms):" pct.txt || fail "bench serve percentile report: $(cat pct.txt)"
[ "$(py '"p90_ms" in d["ttft"], "p99_ms" in d["ttft"], d["burstiness"]' < pct.json)" = "True False 0.5" ] \
  || fail "bench serve percentile JSON: $(head -c 400 pct.json)"
echo '{"no prompt": 1}' > bad.jsonl
"$scout" bench serve --base-url "$base" --dataset-path bad.jsonl > bad.txt 2>&1 && fail "a dataset line without a prompt was accepted"
grep -q 'bad.jsonl:1' bad.txt || fail "bad dataset error: $(cat bad.txt)"

# A client that goes away mid-stream cancels its request; two clients at once both finish.
curl -sN --max-time 0.3 "$base/v1/completions" -d '{"prompt": "a", "max_tokens": 4000, "stream": true, "ignore_eos": true}' >/dev/null 2>&1
curl -s "$base/v1/completions" -d '{"prompt": "x = ", "max_tokens": 20, "seed": 1}' > a.json &
other=$!
curl -s "$base/v1/completions" -d '{"prompt": "y = ", "max_tokens": 20, "seed": 2}' > b.json
wait "$other"
grep -q '"completion_tokens":20' a.json || fail "concurrent request a: $(cat a.json)"
grep -q '"completion_tokens":20' b.json || fail "concurrent request b: $(cat b.json)"

# The cancelled request is counted once the server has noticed its client left (a write to the
# closed stream fails); on a loaded machine that can come after the two requests above.
# Here-strings, not `echo | grep -q`: grep -q leaves at its first match, and with pipefail echo's
# broken pipe on the rest of a long /metrics reads as a failure (most likely why the acceptance
# check failed once in CI).
for _ in $(seq 1 50); do
  metrics=$(curl -s "$base/metrics")
  grep -q '^scout_requests_total{outcome="cancelled"} 1' <<< "$metrics" \
    && grep -q '^scout_requests_total{outcome="ok"} [1-9]' <<< "$metrics" \
    && grep -q '^scout_spec_decode_num_accepted_tokens_total [1-9]' <<< "$metrics" && break
  sleep 0.2
done
grep -q '^scout_requests_total{outcome="ok"} [1-9]' <<< "$metrics" || fail "metrics: ok requests"
grep -q '^scout_requests_total{outcome="cancelled"} 1' <<< "$metrics" \
  || fail "metrics: cancelled request: $(echo "$metrics" | grep scout_requests_total)"
grep -q '^scout_spec_decode_num_accepted_tokens_total [1-9]' <<< "$metrics" \
  || fail "metrics: acceptance: $(echo "$metrics" | grep -E 'scout_spec_decode_num_(accepted|draft)_tokens_total' || echo "${#metrics} bytes, no spec_decode counters")"
grep -q '^scout_time_to_first_token_seconds_bucket{le="600"}' <<< "$metrics" || fail "metrics: TTFT buckets"

kill -TERM "$pid"
wait "$pid"
rc=$?
[ $rc -eq 0 ] || fail "server exit $rc after SIGTERM"

# Admission and drain: with one request running, no other batched and no queue allowed, another
# gets 429 with Retry-After; SIGTERM lets the running one finish (health says 503 meanwhile) and
# exits 0.
start_server serve.err --model "$src/models/scout-tiny-target" --max-num-seqs 1 --max-waiting 0 --max-model-len 2048 --shutdown-timeout 60
curl -s "$base/v1/models" | grep -q '"max_model_len":2048' || fail "max_model_len not applied"
[ "$(code '{"prompt": "x", "max_tokens": 2048}')" = 400 ] || fail "over --max-model-len"
[ "$(code '{"prompt": "x", "sparsity": "sts"}')" = 400 ] && grep -q "needs a server started with --draft" err.json || fail "sts without a draft"

# logprobs: each generated token's log-probability and the most likely alternatives; greedy
# picks the most likely, so its logprob is the top one's.
lp=$(curl -s "$base/v1/completions" -d '{"prompt": "def f(x):", "max_tokens": 5, "temperature": 0, "ignore_eos": true, "logprobs": 2}')
[ "$(echo "$lp" | py 'len(d["choices"][0]["logprobs"]["tokens"]), [len(t) for t in d["choices"][0]["logprobs"]["top_logprobs"]]')" \
  = "5 [2, 2, 2, 2, 2]" ] || fail "completions logprobs: $lp"
[ "$(echo "$lp" | py 'all(abs(v - max(t.values())) < 1e-5 and v <= 0 for v, t in zip(d["choices"][0]["logprobs"]["token_logprobs"], d["choices"][0]["logprobs"]["top_logprobs"]))')" \
  = True ] || fail "greedy logprobs are not the top ones: $lp"
[ "$(echo "$lp" | py '"".join(d["choices"][0]["logprobs"]["tokens"]) == d["choices"][0]["text"]')" = True ] || fail "logprob tokens do not spell the text: $lp"
clp=$(curl -s "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": true, "temperature": 1, "seed": 3, "logprobs": true, "top_logprobs": 3}')
[ "$(echo "$clp" | py '[(len(c["top_logprobs"]), len(c["bytes"]) > 0, c["logprob"] <= 0) for c in d["choices"][0]["logprobs"]["content"]]')" \
  = "[(3, True, True), (3, True, True), (3, True, True), (3, True, True)]" ] || fail "chat logprobs: $clp"
slp=$(curl -sN "$base/v1/completions" -d '{"prompt": "def f(x):", "max_tokens": 6, "temperature": 0, "ignore_eos": true, "logprobs": 1, "stream": true}')
[ "$(echo "$slp" | grep '^data: {' | sed 's/^data: //' | python3 -c 'import json,sys; print(sum(len(json.loads(l)["choices"][0]["logprobs"]["tokens"]) for l in sys.stdin if json.loads(l)["choices"][0].get("logprobs")))')" = 6 ] \
  || fail "streamed logprobs: $slp"
# Penalties: applied before the request's own sampler; a penalised greedy text differs, uses
# more distinct bytes, and a seeded penalised request repeats; out of range is a 400 naming it.
rep='"prompt": "def f(x):\n    return x\n\ndef f(x):\n    return x\n", "max_tokens": 48, "ignore_eos": true'
plain=$(curl -s "$base/v1/completions" -d "{$rep, \"temperature\": 0}" | py 'd["choices"][0]["text"]')
pen=$(curl -s "$base/v1/completions" -d "{$rep, \"temperature\": 0, \"frequency_penalty\": 2, \"presence_penalty\": 1, \"repetition_penalty\": 1.5}" | py 'd["choices"][0]["text"]')
[ -n "$pen" ] && [ "$pen" != "$plain" ] || fail "penalties changed nothing: [$plain] vs [$pen]"
[ "$(python3 -c 'import sys; print(len(set(sys.argv[2])) >= len(set(sys.argv[1])))' "$plain" "$pen")" = True ] \
  || fail "penalised text repeats more: [$plain] vs [$pen]"
sp1=$(curl -s "$base/v1/completions" -d "{$rep, \"temperature\": 1, \"seed\": 4, \"frequency_penalty\": 1}" | py 'd["choices"][0]["text"]')
sp2=$(curl -s "$base/v1/completions" -d "{$rep, \"temperature\": 1, \"seed\": 4, \"frequency_penalty\": 1}" | py 'd["choices"][0]["text"]')
[ "$sp1" = "$sp2" ] || fail "seeded penalised requests differ: [$sp1] vs [$sp2]"
[ "$(code '{"prompt": "x", "presence_penalty": 3}')" = 400 ] && grep -q '"param":"presence_penalty"' err.json || fail "presence_penalty 3: $(cat err.json)"
[ "$(code '{"prompt": "x", "repetition_penalty": 0}')" = 400 ] && grep -q '"param":"repetition_penalty"' err.json || fail "repetition_penalty 0: $(cat err.json)"
[ "$(code '{"prompt": "x", "logprobs": 21}')" = 400 ] && grep -q '"param":"logprobs"' err.json || fail "logprobs 21: $(cat err.json)"
[ "$(curl -s -o err.json -w '%{http_code}' "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}')" = 400 ] \
  && grep -q '"param":"top_logprobs"' err.json || fail "top_logprobs without logprobs: $(cat err.json)"

# Agent sessions: the second turn prefills only its new tokens and continues exactly where a
# one-off request over the whole conversation would.
t1=$(curl -s "$base/v1/completions" -d '{"prompt": "def add(a, b):\n    ", "max_tokens": 12, "temperature": 0, "session_id": "agent-1"}')
echo "$t1" | grep -q '"cached_tokens":0' || fail "first turn: $t1"
t2=$(curl -s "$base/v1/completions" -d '{"prompt": "\n\ndef sub(a, b):\n    ", "max_tokens": 12, "temperature": 0, "session_id": "agent-1"}')
echo "$t2" | grep -q '"cached_tokens":[1-9]' || fail "second turn reused nothing: $t2"
if command -v python3 >/dev/null; then
  text1=$(echo "$t1" | py 'json.dumps(d["choices"][0]["text"])')
  text2=$(echo "$t2" | py 'd["choices"][0]["text"]')
  new=$(echo "$t2" | py 'd["usage"]["prompt_tokens"]')
  [ "$new" -le 22 ] || fail "second turn prefilled $new tokens, more than its own 21 + 1"
  full=$(python3 -c "import json,sys; print(json.dumps({'prompt': 'def add(a, b):\\n    ' + json.loads(sys.argv[1]) + '\\n\\ndef sub(a, b):\\n    ', 'max_tokens': 12, 'temperature': 0}))" "$text1")
  one=$(curl -s "$base/v1/completions" -d "$full" | py 'd["choices"][0]["text"]')
  [ "$one" = "$text2" ] || fail "session turn differs from one-off: [$text2] vs [$one]"
fi
curl -s "$base/v1/sessions" | grep -q '"id":"agent-1"' || fail "session not listed"
[ "$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "$base/v1/sessions/agent-1")" = 200 ] || fail "delete session"
[ "$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "$base/v1/sessions/agent-1")" = 404 ] || fail "unknown session"
curl -sN "$base/v1/completions" -d '{"prompt": "a", "max_tokens": 1500, "stream": true, "ignore_eos": true}' > long.txt &
long=$!
for _ in $(seq 1 100); do
  # Captured first: grep -q leaves at its first match, and with pipefail curl's broken pipe on
  # the rest of a long /metrics would read as a failure.
  m=$(curl -s "$base/metrics"); grep -q '^scout_num_requests_running 1' <<< "$m" && break
  sleep 0.05
done
[ "$(curl -s "$base/ready")" = "full" ] || fail "/ready while saturated: $(curl -s "$base/ready")"
busy=$(curl -s -o busy.json -D busy.hdr -w '%{http_code}' "$base/v1/completions" -d '{"prompt": "b", "max_tokens": 4}')
[ "$busy" = 429 ] || fail "expected 429 while busy, got $busy: $(cat busy.json)"
grep -qi '^retry-after: 1' busy.hdr || fail "no Retry-After: $(cat busy.hdr)"
kill -TERM "$pid"
# While the in-flight request drains, /health is 503 and /ready says so. A fast backend (the
# CUDA one runs the tiny model's 1500 tokens in well under a second) may finish the drain before
# a poll lands: the server is gone then, and the request must have run to its end (below).
drain_seen=""
for _ in $(seq 1 300); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "$base/health")
  if [ "$code" = 503 ]; then
    ready=$(curl -s "$base/ready")
    [ "$ready" = "draining" ] || [ -z "$ready" ] || fail "/ready while draining: $ready"
    drain_seen=yes
    break
  fi
  [ "$code" = 000 ] && { drain_seen=finished; break; }
  sleep 0.01
done
[ -n "$drain_seen" ] || fail "health while draining: still $code after the signal"
wait "$long"
grep -q '"finish_reason":"length"' long.txt || fail "in-flight request cut by shutdown: $(tail -c 300 long.txt)"
wait "$pid"
rc=$?
[ $rc -eq 0 ] || fail "server exit $rc after drain"
grep -q "draining" serve.err || fail "no drain message: $(cat serve.err)"

# A model folder whose tokenizer_config.json carries a chat template: chat prompts are rendered
# with it (the template's BOS left to the tokenizer), and its raise_exception is a 400.
rm -rf chat-model && cp -r "$src/models/scout-tiny-target" chat-model
cp "$src/models/tokenizers/mistral/tokenizer_config.json" chat-model/
start_server serve.err --model chat-model
chat=$(curl -s "$base/v1/chat/completions" -d '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], "max_tokens": 2}')
# "[INST] Be brief.\n\nhi[/INST]" is 27 bytes, plus the byte tokenizer's BOS.
echo "$chat" | grep -q '"prompt_tokens":28' || fail "chat template not applied: $chat"
[ "$(curl -s -o err.json -w '%{http_code}' "$base/v1/chat/completions" -d '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}')" = 400 ] \
  && grep -q 'must alternate' err.json || fail "template's raise_exception: $(cat err.json)"
kill -TERM "$pid"
wait "$pid"

# API keys and tenants: /v1 answers 401 without a valid key; each key sees, continues and deletes
# only its own sessions; /health and /metrics stay open; bad session ids are 400.
printf '# keys\nkey-two\n' > keys.txt
SCOUT_API_KEY=key-three start_server serve.err --model "$src/models/scout-tiny-target" --api-key key-one --api-key-file keys.txt
a1=(-H "Authorization: Bearer key-one")
a2=(-H "Authorization: Bearer key-two")
a3=(-H "Authorization: Bearer key-three")
[ "$(curl -s -o err.json -w '%{http_code}' "$base/v1/models")" = 401 ] && grep -q "no API key" err.json || fail "no key: $(cat err.json)"
[ "$(curl -s -o err.json -w '%{http_code}' -H "Authorization: Bearer nope" "$base/v1/models")" = 401 ] || fail "bad key"
[ "$(curl -s -o /dev/null -w '%{http_code}' "${a3[@]}" "$base/v1/models")" = 200 ] || fail "SCOUT_API_KEY key refused"
[ "$(curl -s -o err.json -w '%{http_code}' "$base/tokenize" -d '{"prompt": "a"}')" = 401 ] || fail "/tokenize without a key"
[ "$(curl -s -o /dev/null -w '%{http_code}' "${a1[@]}" "$base/tokenize" -d '{"prompt": "a"}')" = 200 ] || fail "/tokenize with a key"
[ "$(curl -s "$base/health")" = "OK" ] || fail "/health behind the key"
m=$(curl -s "$base/metrics"); grep -q "^scout_" <<< "$m" || fail "/metrics behind the key"
check_tenants key-one key-two
[ "$(curl -s -o err.json -w '%{http_code}' "${a1[@]}" "$base/v1/completions" -d '{"prompt": "x", "session_id": "a/b"}')" = 400 ] \
  && grep -q '"param":"session_id"' err.json || fail "bad session id: $(cat err.json)"
kill -TERM "$pid"
wait "$pid"
echo "serve_test: ok"
