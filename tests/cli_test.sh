#!/usr/bin/env bash
# End-to-end: the scout binary generates from the committed fixture, and fails cleanly on bad input.
# usage: cli_test.sh SCOUT_BINARY SOURCE_DIR
set -uo pipefail
scout=$1
src=$2
fail() { echo "FAIL: $*"; exit 1; }

out=$("$scout" generate --model "$src/models/scout-tiny-target" --prompt $'def fibonacci(n):\n    ' --max-tokens 24 2>err.txt) \
  || fail "generate exited $?: $(cat err.txt)"
[ -n "$out" ] || fail "no continuation printed"
grep -q "decode .* tokens/s" err.txt || fail "no tokens/s report: $(cat err.txt)"

# Greedy output is deterministic: the same command twice gives the same text.
out2=$("$scout" generate --model "$src/models/scout-tiny-target" --prompt $'def fibonacci(n):\n    ' --max-tokens 24 2>/dev/null)
[ "$out" = "$out2" ] || fail "greedy generation differs between runs"

# Speculative decoding with the fixture draft: the same greedy text, and an acceptance report.
spec=$("$scout" generate --model "$src/models/scout-tiny-target" --draft "$src/models/scout-tiny-draft" --speculative \
  --num-speculative-tokens 4 --prompt $'def fibonacci(n):\n    ' --max-tokens 24 2>err.txt) || fail "speculative exited $?: $(cat err.txt)"
[ "$spec" = "$out" ] || fail "speculative greedy output differs from plain greedy"
grep -q "draft acceptance" err.txt || fail "no acceptance report: $(cat err.txt)"
"$scout" generate --model "$src/models/scout-tiny-target" --speculative --prompt x >/dev/null 2>err.txt; rc=$?
[ $rc -eq 1 ] && grep -q -- "--speculative needs --draft" err.txt || fail "speculative without draft: exit $rc $(cat err.txt)"

# STS: the target verifies over the blocks the draft's attention picks; a full budget is dense.
sts=$("$scout" generate --model "$src/models/scout-tiny-target" --draft "$src/models/scout-tiny-draft" --speculative \
  --sparsity sts --kv-budget-fraction 1 --prompt $'def fibonacci(n):\n    ' --max-tokens 24 2>err.txt) || fail "sts exited $?: $(cat err.txt)"
[ "$sts" = "$out" ] || fail "sts with the whole context differs from plain greedy"
grep -q "sts: target read 100.0%" err.txt || fail "no sts report: $(cat err.txt)"
"$scout" generate --model "$src/models/scout-tiny-target" --draft "$src/models/scout-tiny-draft" --speculative \
  --sparsity sts --head-map /nonexistent.json --prompt x >/dev/null 2>err.txt; rc=$?
[ $rc -eq 1 ] && grep -q "/nonexistent.json: no such file" err.txt || fail "missing head map: exit $rc $(cat err.txt)"

# The sparse draft (its later steps over its own top blocks) keeps the target's greedy text; SANTA
# runs; bad values are refused by name.
sd=$("$scout" generate --model "$src/models/scout-tiny-target" --draft "$src/models/scout-tiny-draft" --speculative \
  --sparse-draft --draft-kv-budget-fraction 0.3 --draft-refresh-rounds 2 --prompt $'def fibonacci(n):\n    ' \
  --max-tokens 24 2>err.txt) || fail "sparse draft exited $?: $(cat err.txt)"
[ "$sd" = "$out" ] || fail "sparse draft greedy output differs from plain greedy"
grep -q "sparse draft: its steps read" err.txt || fail "no sparse draft report: $(cat err.txt)"
"$scout" generate --model "$src/models/scout-tiny-target" --draft "$src/models/scout-tiny-draft" --speculative \
  --sparsity sts --santa-samples 64 --prompt $'def fibonacci(n):\n    ' --max-tokens 12 >/dev/null 2>err.txt \
  || fail "santa exited $?: $(cat err.txt)"
grep -q "generated 12 tokens" err.txt || fail "santa run: $(cat err.txt)"
"$scout" generate --model "$src/models/scout-tiny-target" --draft "$src/models/scout-tiny-draft" --speculative \
  --sparse-draft --draft-refresh-rounds 0 --prompt x >/dev/null 2>err.txt; rc=$?
[ $rc -eq 1 ] && grep -q -- "--draft-refresh-rounds must be >= 1" err.txt || fail "bad refresh: exit $rc $(cat err.txt)"

# Flags from YAML, command line winning.
printf 'model: %s\nmax-tokens: 5\ntemperature: 0.7\nseed: 3\n' "$src/models/scout-tiny-draft" > cfg.yaml
"$scout" generate --config cfg.yaml --prompt "x = " >/dev/null 2>err.txt || fail "YAML config run failed: $(cat err.txt)"
grep -q "generated 5 tokens" err.txt || fail "max-tokens from YAML not applied: $(cat err.txt)"

# Clear errors, non-zero exit, no crash.
"$scout" generate --model /nonexistent --prompt x >/dev/null 2>err.txt; rc=$?
[ $rc -eq 1 ] || fail "missing model: exit $rc"
grep -q "/nonexistent/config.json: no such file" err.txt || fail "missing model message: $(cat err.txt)"
"$scout" generate --model "$src/models/scout-tiny-target" --prompt x --max-tokens lots >/dev/null 2>err.txt; rc=$?
[ $rc -eq 1 ] && grep -q -- "--max-tokens must be an integer" err.txt || fail "bad number: exit $rc $(cat err.txt)"
"$scout" generate --model "$src/models/scout-tiny-target" --prompt x --temperature -1 >/dev/null 2>err.txt; rc=$?
[ $rc -eq 1 ] && grep -q "temperature must be >= 0" err.txt || fail "bad temperature: exit $rc $(cat err.txt)"
"$scout" generate --model "$src/models/scout-tiny-target" --prompt x --host-kv-gb 1 --host-kv-memory huge >/dev/null 2>err.txt; rc=$?
[ $rc -eq 1 ] && grep -q -- "--host-kv-memory must be hugepages or pinned" err.txt || fail "bad host memory: exit $rc $(cat err.txt)"
"$scout" bogus >/dev/null 2>&1; rc=$?
[ $rc -eq 2 ] || fail "unknown command: exit $rc"
echo "cli_test: ok"
