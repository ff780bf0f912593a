#!/usr/bin/env bash
# Build the ggufship image without a Docker engine (buildah, chroot isolation) and run
# the smoke checks inside it:
#
#   bash components/build-image.sh             # build + smoke (components/smoke_image.py)
#   bash components/build-image.sh --no-smoke  # build only
#   --no-cache       rebuild every layer (buildah --no-cache); the cached wheel is still used
#   --rebuild-wheel  compile llama-cpp-python again even when its wheel is cached
#
# Environment (all optional):
#   IMAGE            tag of the result                (localhost/ggufship:<version>)
#   BASE_IMAGE       base image pinned by digest, e.g. debian:bookworm-slim@sha256:...;
#                    unset: a Debian bookworm root filesystem made here with mmdebstrap
#                    from this machine's apt sources (GGUFSHIP_DEBIAN_SOURCES: a
#                    sources.list or deb822 file), imported with components/base.Dockerfile
#   SOURCE_DATE_EPOCH  timestamps in the image      (1795392000, the locks' instant)
#   GGUFSHIP_IMAGE_CACHE  cache directory           (~/.cache/ggufship/image)
#
# pip's index settings of this machine (index-url, extra-index-url, find-links,
# trusted-host, cert; from pip's config files and PIP_* variables) go into the build as
# the secret pip.conf, the CA bundle as the secret ca.crt, local index directories as
# read-only volumes: nothing about this machine is written into the image or the repo.
#
# Cached between runs: the rootfs tarball and the base image (keyed on the apt sources),
# the compiled portable llama-cpp-python wheel (keyed on the Dockerfile's llama-wheel
# stages, the build lock and the base), pip's cache (a cache mount), buildah's layers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${GGUFSHIP_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ggufship/image}"
SDE="${SOURCE_DATE_EPOCH:-1795392000}"
SMOKE=1
NO_CACHE=()
REBUILD_WHEEL=0
for arg in "$@"; do
  case "$arg" in
    --no-smoke) SMOKE=0 ;;
    --no-cache) NO_CACHE=(--no-cache) ;;
    --rebuild-wheel) REBUILD_WHEEL=1 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument $arg (known: --no-smoke --no-cache --rebuild-wheel)" >&2; exit 2 ;;
  esac
done
log() { printf '[build-image %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
need() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]} (apt)"
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
  else
    echo "build-image.sh: needs ${missing[*]} (Debian: apt-get install ${missing[*]})" >&2
    exit 1
  fi
}
need buildah
mkdir -p "$CACHE"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -1)"
IMAGE="${IMAGE:-localhost/ggufship:$VERSION}"
BUD=(buildah bud --isolation chroot --layers --timestamp "$SDE")
START=$(date +%s)

# --- base image -------------------------------------------------------------------
pull=()
if [ -z "${BASE_IMAGE:-}" ]; then
  need mmdebstrap
  sources="${GGUFSHIP_DEBIAN_SOURCES:-}"
  if [ -z "$sources" ]; then
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
      [ -s "$f" ] && { sources="$f"; break; }
    done
  fi
  [ -n "$sources" ] && [ -s "$sources" ] || {
    echo "build-image.sh: no apt sources found; set GGUFSHIP_DEBIAN_SOURCES to a sources file" >&2
    exit 1
  }
  key="$( { cat "$sources"; echo "bookworm minbase $SDE"; cat "$ROOT/components/base.Dockerfile"; } \
          | sha256sum | cut -c1-16)"
  rootfs="$CACHE/rootfs-$key"
  if [ ! -s "$rootfs/rootfs.tar" ]; then
    log "making the Debian bookworm root filesystem (mmdebstrap, sources: $sources)"
    mkdir -p "$rootfs"
    SOURCE_DATE_EPOCH="$SDE" mmdebstrap --quiet --variant=minbase --mode=root --format=tar \
      bookworm "$rootfs/rootfs.tar.tmp" "$sources"
    mv "$rootfs/rootfs.tar.tmp" "$rootfs/rootfs.tar"
  fi
  base_tag="localhost/ggufship-base:bookworm-$key"
  if ! buildah inspect --type image "$base_tag" >/dev/null 2>&1; then
    log "importing the root filesystem as $base_tag"
    buildah bud --isolation chroot --timestamp "$SDE" -f "$ROOT/components/base.Dockerfile" \
      -t "$base_tag" "$rootfs" >&2
  fi
  BASE_IMAGE="localhost/ggufship-base@$(buildah inspect --type image --format '{{.FromImageDigest}}' "$base_tag")"
  pull=(--pull=never)
fi
log "base: $BASE_IMAGE"

# --- this machine's package-index settings -----------------------------------------
secrets_dir="$(mktemp -d)"
trap 'rm -rf "$secrets_dir"' EXIT
chmod 700 "$secrets_dir"
mapfile -t pip_args < <("${PYTHON:-python3}" - "$secrets_dir" <<'PY'
import os, re, subprocess, sys
from pathlib import Path
from urllib.parse import urlparse

out = Path(sys.argv[1])
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                         text=True, check=False).stdout
settings: dict[str, tuple[int, str]] = {}
for line in listing.splitlines():
    m = re.match(r"^(\S*)\.([a-z-]+)='(.*)'$", line)
    if not m:
        continue
    scope, key, value = m.groups()
    # PIP_* variables win over files; any section applies to the commands used here.
    rank = 2 if scope == ":env:" else 1 if scope == "global" else 0
    if key in ("index-url", "extra-index-url", "find-links", "trusted-host", "cert"):
        if key not in settings or rank >= settings[key][0]:
            settings[key] = (rank, value)
args, conf = [], ["[global]"]
volumes: set[str] = set()
for key, (_, value) in sorted(settings.items()):
    if key == "cert":
        if Path(value).is_file():
            (out / "ca.crt").write_bytes(Path(value).read_bytes())
            args += ["--secret", f"id=ca.crt,src={out / 'ca.crt'}"]
            conf.append("cert = /run/secrets/ca.crt")
        continue
    for item in value.split():
        local = urlparse(item).path if item.startswith("file:") else item if item.startswith("/") else ""
        if local and Path(local).exists():
            path = Path(local).resolve()
            # A file:// "simple" index links to its files beside it (../../files/...).
            volumes.add(str(path.parent if item.startswith("file:") and path.name == "simple" else path))
    conf.append(f"{key} = {value}")
(out / "pip.conf").write_text("\n".join(conf) + "\n")
args += ["--secret", f"id=pip.conf,src={out / 'pip.conf'}"]
for vol in sorted(volumes):
    args += ["--volume", f"{vol}:{vol}:ro"]
print("\n".join(args))
PY
)

# --- the portable llama-cpp-python wheel ---------------------------------------------
dockerfile="$ROOT/components/Dockerfile"
wkey="$( { sed '/^# === end of the llama-wheel stages/q' "$dockerfile"; \
           cat "$ROOT/components/build-requirements.lock"; echo "$BASE_IMAGE $SDE"; } \
         | sha256sum | cut -c1-16)"
wheel_dir="$CACHE/llama-wheel-$wkey"
common=("${pull[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "SOURCE_DATE_EPOCH=$SDE"
        "${pip_args[@]}" -f "$dockerfile")
if [ "$REBUILD_WHEEL" = 1 ] || ! ls "$wheel_dir"/wheels/llama_cpp_python-*.whl >/dev/null 2>&1; then
  log "compiling the portable llama-cpp-python wheel (20+ minutes on 2 cores; cached in $wheel_dir)"
  rebuild=()
  [ "$REBUILD_WHEEL" = 1 ] && rebuild=(--no-cache)
  "${BUD[@]}" "${common[@]}" "${rebuild[@]}" --target llama-wheel -t "localhost/ggufship-llama-wheel:$wkey" "$ROOT" >&2
  ctr="$(buildah from "localhost/ggufship-llama-wheel:$wkey")"
  mnt="$(buildah mount "$ctr")"
  rm -rf "$wheel_dir.tmp" && mkdir -p "$wheel_dir.tmp"
  cp -a "$mnt/." "$wheel_dir.tmp/"
  buildah umount "$ctr" >/dev/null && buildah rm "$ctr" >/dev/null
  rm -rf "$wheel_dir" && mv "$wheel_dir.tmp" "$wheel_dir"
fi
log "llama-cpp-python wheel: $(ls "$wheel_dir"/wheels/)"

# --- the image ------------------------------------------------------------------------
log "building $IMAGE"
"${BUD[@]}" "${common[@]}" "${NO_CACHE[@]}" --build-context "llama-wheel=$wheel_dir" --target runtime \
  -t "$IMAGE" "$ROOT" >&2
digest="$(buildah inspect --type image --format '{{.FromImageDigest}}' "$IMAGE")"
size="$(buildah images --format '{{.Size}}' --filter "reference=$IMAGE" | head -1)"
took=$(( $(date +%s) - START ))
log "built $IMAGE $digest ($size) in ${took}s"
printf '{"image": "%s", "digest": "%s", "size": "%s", "build_seconds": %d, "base": "%s"}\n' \
  "$IMAGE" "$digest" "$size" "$took" "$BASE_IMAGE" > "$CACHE/last-build.json"
if [ "$SMOKE" = 1 ]; then
  py="$ROOT/.venv/bin/python"
  [ -x "$py" ] || { echo "build-image.sh: the smoke checks need the project venv (bash scripts/setup.sh)" >&2; exit 1; }
  "$py" "$ROOT/components/smoke_image.py" --image "$IMAGE"
fi
echo "$IMAGE@$digest"
