#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the llama.cpp sources vendored in the pinned
# llama-cpp-python sdist, for the serving benchmark (bench/serve.py). No binary is
# downloaded and nothing of llama.cpp is committed: the result is cached under
#   ~/.cache/ggufship/llama-server/<llama-cpp-python version>/bin/llama-server
# and the script prints that path on its last line of stdout.
#
# Usage: bash bench/build_llama_server.sh [path/to/llama_cpp_python-X.Y.Z.tar.gz]
# Env:   JOBS (default 2) parallel compile jobs.
set -euo pipefail

SDIST="${1:-}"
if [[ -z "$SDIST" ]]; then
  SDIST="$(ls -1 "$HOME"/.cache/ggufship/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | sort -V | tail -n1 || true)"
fi
if [[ -z "$SDIST" || ! -f "$SDIST" ]]; then
  echo "build_llama_server.sh: no llama-cpp-python sdist found (pass its path; scripts/setup.sh caches it under ~/.cache/ggufship/sdist/)" >&2
  exit 2
fi
base="$(basename "$SDIST" .tar.gz)"          # llama_cpp_python-0.3.36
version="${base#llama_cpp_python-}"
# No AMX kernels, as scripts/setup.sh builds llama-cpp-python: they segfault on K-quant models
# on some Sapphire Rapids-class CPUs (ggml-org/llama.cpp#20824); -mno-amx-* wins over the
# -march=native ggml adds. The cache path says so, so an older AMX build is not reused.
NO_AMX=""
[ "$(uname -m)" != x86_64 ] || NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
dest="$HOME/.cache/ggufship/llama-server/$version${NO_AMX:+-noamx}"
bin="$dest/bin/llama-server"
if [[ -x "$bin" ]]; then
  echo "$bin"
  exit 0
fi

work="$dest/src"
mkdir -p "$work"
if [[ ! -d "$work/$base/vendor/llama.cpp" ]]; then
  tar -xzf "$SDIST" -C "$work" "$base/vendor/llama.cpp"
fi
src="$work/$base/vendor/llama.cpp"
CFLAGS="${CFLAGS:+$CFLAGS }$NO_AMX" CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }$NO_AMX" \
cmake -S "$src" -B "$work/build" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF >&2
cmake --build "$work/build" --target llama-server -j"${JOBS:-2}" >&2
mkdir -p "$dest/bin"
install -m 0755 "$work/build/bin/llama-server" "$bin"
echo "$bin"
