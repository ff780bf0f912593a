#!/usr/bin/env bash
# Install everything ggufship needs on a fresh Debian machine, then run a job.
#
#   bash scripts/setup.sh demo   # install, then run the whole path on the embedded default
#   bash scripts/setup.sh test   # install, then run the test suite
#   bash scripts/setup.sh        # install only
#
# Idempotent: a second run reuses the virtualenv and the compiled
# llama-cpp-python wheel (cached under $GGUFSHIP_CACHE, default
# ~/.cache/ggufship, keyed by version, CMAKE_ARGS and CPU flags).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

LLAMA_CPP_PYTHON_VERSION="0.3.36"
TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"
VENV="${GGUFSHIP_VENV:-$ROOT/.venv}"
CACHE="${GGUFSHIP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ggufship}"
# LLaVA is not needed (text models only) and halves the compile time.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# --- system packages --------------------------------------------------------
APT_PACKAGES=(git prometheus docker-registry nginx apache2-utils nodejs); command -v npm >/dev/null || APT_PACKAGES+=(npm)  # NodeSource nodejs bundles npm and conflicts with the Debian npm package
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  say "installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- virtualenv -------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# --- llama-cpp-python: compiled once, wheel cached ---------------------------
mkdir -p "$CACHE/sdist" "$CACHE/wheels"
SDIST="$CACHE/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  say "downloading llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
  "${PIP[@]}" download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$CACHE/sdist"
fi
CPU_FLAGS="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)"
# No AMX kernels: on Sapphire Rapids-class CPUs ggml's AMX matrix multiply segfaults on
# K-quant models (ggml_backend_amx_mul_mat, ggml-org/llama.cpp#20824, open upstream), and
# -march=native turns it on there. GCC keeps an ISA flag given explicitly, so -mno-amx-*
# wins over the -march=native ggml appends after CFLAGS; every other native flag stays.
NO_AMX=""
[ "$(uname -m)" != x86_64 ] || NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
KEY="$(printf '%s|%s|%s|%s' "$LLAMA_CPP_PYTHON_VERSION" "$CMAKE_ARGS" "$NO_AMX" "$CPU_FLAGS" | sha256sum | cut -c1-16)"
WHEEL_DIR="$CACHE/wheels/$KEY"
if ! ls "$WHEEL_DIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  say "compiling llama-cpp-python (CMAKE_ARGS=$CMAKE_ARGS; ~4-8 min on 2 cores, once per machine)"
  mkdir -p "$WHEEL_DIR.tmp"
  # pip's own wheel cache ignores CMAKE_ARGS, hence --no-cache-dir and our own key.
  CFLAGS="${CFLAGS:+$CFLAGS }$NO_AMX" CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }$NO_AMX" \
    "${PIP[@]}" wheel --no-deps --no-cache-dir -w "$WHEEL_DIR.tmp" "$SDIST"
  rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
fi

if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '${TORCH_VERSION}+cpu')" 2>/dev/null; then
  # Pinned first: an unpinned torch would pull a multi-GB CUDA build.
  say "installing torch $TORCH_VERSION (CPU)"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi
say "installing ggufship and its Python dependencies"
# pip keeps an installed llama-cpp-python of the same version, whatever wheel it came from:
# when the key changed (other CMAKE_ARGS, CPU or flags), replace it by the key's wheel.
if [ "$(cat "$VENV/.llama-cpp-python-key" 2>/dev/null)" != "$KEY" ]; then
  "${PIP[@]}" install --force-reinstall --no-deps "$WHEEL_DIR"/llama_cpp_python-*.whl
  echo "$KEY" > "$VENV/.llama-cpp-python-key"
fi
"${PIP[@]}" install "$WHEEL_DIR"/llama_cpp_python-*.whl -e "$ROOT[test]"

# --- llama.cpp's converter + its own gguf-py, from the same sdist -------------
SHARE="$VENV/share/ggufship/llama.cpp"
if [ ! -f "$SHARE/.version" ] || [ "$(cat "$SHARE/.version")" != "$LLAMA_CPP_PYTHON_VERSION" ]; then
  say "extracting llama.cpp converter and gguf-py from the sdist"
  tmp="$(mktemp -d)"
  base="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  tar xzf "$SDIST" -C "$tmp" "$base/convert_hf_to_gguf.py" "$base/convert_lora_to_gguf.py" \
    "$base/conversion" "$base/gguf-py" "$base/LICENSE"
  rm -rf "$SHARE" && mkdir -p "$(dirname "$SHARE")"
  mv "$tmp/$base" "$SHARE"
  rm -rf "$tmp"
  echo "$LLAMA_CPP_PYTHON_VERSION" > "$SHARE/.version"
  # The converter's own gguf-py, not PyPI's gguf (which breaks this converter).
  "${PIP[@]}" install --no-deps --force-reinstall "$SHARE/gguf-py"
fi

case "${1:-}" in
  demo) shift; exec "$VENV/bin/ggufship" demo "$@" ;;
  test) shift; exec "$VENV/bin/python" -m pytest "$@" ;;
  "") say "installed; activate with: source $VENV/bin/activate" ;;
  *) say "unknown job '$1' (use: demo | test)"; exit 2 ;;
esac
