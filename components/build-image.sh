#!/usr/bin/env bash
# Build the ggufship image without a Docker engine (buildah, chroot isolation) and run
# the smoke checks inside it:
#
#   bash components/build-image.sh             # build + smoke (components/smoke_image.py)
#   bash components/build-image.sh --no-smoke  # build only
#   --no-cache       rebuild every layer (buildah --no-cache); the cached wheel is still used
#   --rebuild-wheel  compile llama-cpp-python again even when its wheel is cached
#   --rev=REV        build the files committed at git revision REV (git archive), not the
#                    working tree: the reproducible build (same REV, same image digest)
#   --apt-lock       build only the base stage and write its Debian package list to
#                    components/apt-packages.lock (which the build checks)
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
# the secret pip.conf, the CA bundle as the secret ca.crt, local index directories (up to
# 4) as the build contexts pip-index-1..4, bind-mounted read-only into the RUNs that run
# pip only: nothing about this machine is written into the image or the repo.
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
REV=""
APT_LOCK=0
for arg in "$@"; do
  case "$arg" in
    --no-smoke) SMOKE=0 ;;
    --no-cache) NO_CACHE=(--no-cache) ;;
    --rebuild-wheel) REBUILD_WHEEL=1 ;;
    --rev=?*) REV="${arg#--rev=}" ;;
    --apt-lock) APT_LOCK=1; SMOKE=0 ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument $arg (known: --no-smoke --no-cache --rebuild-wheel --rev=REV --apt-lock)" >&2; exit 2 ;;
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
scratch_dir="$(mktemp -d)"
trap 'rm -rf "$scratch_dir"' EXIT
chmod 700 "$scratch_dir"
SRC="$ROOT"
if [ -n "$REV" ]; then
  # Only what git has committed at REV: no uncommitted or untracked file reaches the image.
  commit="$(git -C "$ROOT" rev-parse --verify "$REV^{commit}" 2>/dev/null)" || {
    echo "build-image.sh: --rev=$REV is not a commit of $ROOT" >&2; exit 2; }
  SRC="$scratch_dir/src"
  mkdir -p "$SRC"
  git -C "$ROOT" archive "$commit" | tar -x -C "$SRC"
fi
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$SRC/pyproject.toml" | head -1)"
IMAGE="${IMAGE:-localhost/ggufship:$VERSION}"
# --timestamp: every file, the history and the config at SOURCE_DATE_EPOCH; no
# io.buildah.version label of this machine's buildah (the base's own labels stay).
BUD=(buildah bud --isolation chroot --layers --timestamp "$SDE" --identity-label=false)
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
  key="$( { cat "$sources"; echo "bookworm minbase $SDE"; cat "$SRC/components/base.Dockerfile"; } \
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
    buildah bud --isolation chroot --timestamp "$SDE" -f "$SRC/components/base.Dockerfile" \
      -t "$base_tag" "$rootfs" >&2
  fi
  BASE_IMAGE="localhost/ggufship-base@$(buildah inspect --type image --format '{{.FromImageDigest}}' "$base_tag")"
  pull=(--pull=never)
fi
log "base: $BASE_IMAGE"

# --- this machine's package-index settings -----------------------------------------
secrets_dir="$scratch_dir/secrets"
mkdir -m 700 "$secrets_dir"
"${PYTHON:-python3}" - "$secrets_dir" > "$scratch_dir/pip-args" <<'PY'
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
slots: dict[str, int] = {}  # local directory -> its pip-index-N slot (components/Dockerfile)
SLOTS = 4


def in_build(local: str, file_url: bool) -> str:
    """Where the local path ``local`` is inside the build's pip RUNs."""
    path = Path(local).resolve()
    # A file:// "simple" index links to its files beside it (../../files/...): mount the parent.
    top = path.parent if file_url and path.name == "simple" else path
    if str(top) not in slots:
        if len(slots) == SLOTS:
            sys.exit(f"build-image.sh: pip's settings name more than {SLOTS} local index "
                     f"directories ({', '.join(slots)}, {top}); components/Dockerfile has {SLOTS} slots")
        slots[str(top)] = len(slots) + 1
    inner = f"/mnt/pip-index-{slots[str(top)]}" + ("/simple" if top != path else "")
    return "file://" + inner if file_url else inner


for key, (_, value) in sorted(settings.items()):
    if key == "cert":
        if Path(value).is_file():
            (out / "ca.crt").write_bytes(Path(value).read_bytes())
            args += ["--secret", f"id=ca.crt,src={out / 'ca.crt'}"]
            conf.append("cert = /run/secrets/ca.crt")
        continue
    items = []
    for item in value.split():
        file_url = item.startswith("file:")
        local = urlparse(item).path if file_url else item if item.startswith("/") else ""
        items.append(in_build(local, file_url) if local and Path(local).exists() else item)
    conf.append(f"{key} = {' '.join(items)}")
(out / "pip.conf").write_text("\n".join(conf) + "\n")
args += ["--secret", f"id=pip.conf,src={out / 'pip.conf'}"]
for directory, slot in slots.items():
    args += ["--build-context", f"pip-index-{slot}={directory}"]
print("\n".join(args))
PY
mapfile -t pip_args < "$scratch_dir/pip-args"

dockerfile="$SRC/components/Dockerfile"

# --- components/apt-packages.lock (--apt-lock) ------------------------------------------
if [ "$APT_LOCK" = 1 ]; then
  "${BUD[@]}" "${pull[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "SOURCE_DATE_EPOCH=$SDE" \
    -f "$dockerfile" --target base -t localhost/ggufship-apt-base "$SRC" >&2
  ctr="$(buildah from --pull=never localhost/ggufship-apt-base)"
  mnt="$(buildah mount "$ctr")"
  lock="$ROOT/components/apt-packages.lock"
  { sed -n '/^#/p' "$lock"
    dpkg-query --admindir="$mnt/var/lib/dpkg" -W -f='${binary:Package}=${Version}\n' | LC_ALL=C sort
  } > "$lock.tmp"
  buildah umount "$ctr" >/dev/null && buildah rm "$ctr" >/dev/null
  mv "$lock.tmp" "$lock"
  log "wrote $lock ($(grep -vc '^#' "$lock") packages)"
  exit 0
fi

# --- the portable llama-cpp-python wheel ---------------------------------------------
# Lines naming the pip-index slots say where the package index is, not what is built
# (every input is pinned by hash): they are left out of the key.
wkey="$( { sed '/^# === end of the llama-wheel stages/q' "$dockerfile" | grep -v 'pip-index'; \
           cat "$SRC/components/build-requirements.lock"; echo "$BASE_IMAGE $SDE"; } \
         | sha256sum | cut -c1-16)"
wheel_dir="$CACHE/llama-wheel-$wkey"
common=("${pull[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "SOURCE_DATE_EPOCH=$SDE"
        "${pip_args[@]}" -f "$dockerfile")
if [ "$REBUILD_WHEEL" = 1 ] || ! ls "$wheel_dir"/wheels/llama_cpp_python-*.whl >/dev/null 2>&1; then
  log "compiling the portable llama-cpp-python wheel (20+ minutes on 2 cores; cached in $wheel_dir)"
  rebuild=()
  [ "$REBUILD_WHEEL" = 1 ] && rebuild=(--no-cache)
  "${BUD[@]}" "${common[@]}" "${rebuild[@]}" --target llama-wheel -t "localhost/ggufship-llama-wheel:$wkey" "$SRC" >&2
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
  -t "$IMAGE" "$SRC" >&2
digest="$(buildah inspect --type image --format '{{.FromImageDigest}}' "$IMAGE")"
size="$(buildah images --format '{{.Size}}' --filter "reference=$IMAGE" | head -1)"
took=$(( $(date +%s) - START ))
log "built $IMAGE $digest ($size) in ${took}s"
printf '{"image": "%s", "digest": "%s", "size": "%s", "build_seconds": %d, "base": "%s"}\n' \
  "$IMAGE" "$digest" "$size" "$took" "$BASE_IMAGE" > "$CACHE/last-build.json"
if [ "$SMOKE" = 1 ]; then
  py="$ROOT/.venv/bin/python"
  [ -x "$py" ] || { echo "build-image.sh: the smoke checks need the project venv (bash scripts/setup.sh)" >&2; exit 1; }
  # The smoke's KFP component definitions and host-side code from the built sources (with
  # --rev the work tree may differ from what is in the image).
  PYTHONPATH="$SRC/src${PYTHONPATH:+:$PYTHONPATH}" "$py" "$SRC/components/smoke_image.py" --image "$IMAGE"
fi
echo "$IMAGE@$digest"
