#!/usr/bin/env bash
# Installs Scout's build and test dependencies from Debian packages. Idempotent: packages already
# present are skipped, so a second run costs one dpkg query.
set -euo pipefail
pkgs=(
  build-essential cmake ninja-build pkg-config git
  libabsl-dev            # absl::Status / StatusOr, flags, strings, synchronization
  libboost-dev           # Boost.Asio and Boost.Beast (header-only)
  prometheus-cpp-dev     # metrics (pulls civetweb)
  libucx-dev             # remote KV tier
  libprotobuf-dev protobuf-compiler  # the cluster's control-channel codec (cluster/control.proto)
  libgtest-dev libgmock-dev
  nlohmann-json3-dev     # config.json, safetensors headers, API bodies
  libyaml-cpp-dev        # YAML config files
  libopenblas-dev        # CPU GEMM for the CPU backend
  libpcre2-dev           # tokenizer.json pre-tokenizer regexes (Unicode classes, JIT)
  libicu-dev             # Unicode normalization (NFC) for tokenizer.json normalizers
  curl                   # the server tests talk HTTP to a real `scout serve`
  prometheus             # a real Prometheus scrapes `scout serve` in tests; promtool checks monitoring/
  nodejs                 # schema check of the rendered k8s/ manifests (kubernetes-models from npm;
                         # kubectl is on the machines) and the openai SDK test (openai from npm)
  python3-yaml           # the k8s test reads the rendered manifests' scout flags
  universal-ctags        # tools/check_layout.py: function extents for the length check
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm: Debian 12 packages it apart from nodejs; NodeSource's nodejs (the machines here) brings
# its own, with which Debian's npm package would conflict.
command -v npm > /dev/null || missing+=(npm)
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#pkgs[@]} packages present"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: installed ${missing[*]}"
