#!/usr/bin/env bash
# tools/check_layout.py fails on each kind of violation and passes a clean tree: a small tree is
# built in a scratch folder with one violation at a time.
# usage: check_layout_test.sh SOURCE_DIR
set -uo pipefail
check=$1/tools/check_layout.py
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
clean() {
  rm -rf "$work/tree" && mkdir -p "$work/tree/runtime" "$work/tree/scheduler" "$work/tree/kernels"
  printf '#include "kernels/a.h"\nint F() { return 1; }\n' > "$work/tree/runtime/r.cc"
  printf '#include "runtime/r.h"\n#include "scheduler/s.h"\n' > "$work/tree/scheduler/s.cc"
  printf 'int K() { return 0; }\n' > "$work/tree/kernels/a.h"
}
clean
out=$(python3 "$check" "$work/tree") || fail "a clean tree failed: $out"
# A folder including one above it.
clean
printf '#include "scheduler/engine.h"\n' >> "$work/tree/runtime/r.cc"
out=$(python3 "$check" "$work/tree") && fail "runtime including scheduler passed"
grep -q "runtime/r.cc:3: runtime/ includes scheduler/, which is not below it" <<< "$out" || fail "layering: $out"
# ... but a test may.
clean
printf '#include "scheduler/engine.h"\n' > "$work/tree/runtime/r_test.cc"
out=$(python3 "$check" "$work/tree") || fail "a test's include failed the check: $out"
# A file over 800 lines.
clean
for i in $(seq 1 801); do echo "// line $i"; done > "$work/tree/scheduler/long.cc"
out=$(python3 "$check" "$work/tree") && fail "an 801-line file passed"
grep -q "scheduler/long.cc: 801 lines" <<< "$out" || fail "file length: $out"
# A function over 150 lines.
clean
{ echo "int Long() {"; for i in $(seq 1 150); do echo "  int v$i = $i;"; done; echo "  return 0;"; echo "}"; } \
  > "$work/tree/scheduler/f.cc"
out=$(python3 "$check" "$work/tree") && fail "a 153-line function passed"
grep -q "function Long is 153 lines" <<< "$out" || fail "function length: $out"
echo "PASS"
