#!/usr/bin/env bash
# Sets up, builds and runs every test a CPU machine can run (ctest label `gpu` excluded).
# BUILD_DIR (default build) and SCOUT_CUDA (default AUTO: .cu files compile when nvcc is present)
# may be set from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
build=${BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSCOUT_CUDA="${SCOUT_CUDA:-AUTO}" \
  ${SCOUT_CMAKE_ARGS:-}
cmake --build "$build" -j "$(nproc)"
ctest --test-dir "$build" -LE gpu --output-on-failure -j "$(nproc)"
