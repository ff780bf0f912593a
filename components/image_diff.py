"""Compare two local images file by file (the reproducibility check of the image).

    .venv/bin/python components/image_diff.py localhost/ggufship:0.1.0 localhost/ggufship:rebuild

Prints both digests; when they differ, the layers (by position) and configuration fields that
differ, then every path whose content, mode, owner or link target differs (or exists in only
one image). Exit 0 only when the digests are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def buildah(*args: str) -> str:
    return subprocess.run(
        ["buildah", *args], capture_output=True, text=True, check=True, timeout=600
    ).stdout.strip()


@contextlib.contextmanager
def mounted(image: str) -> Iterator[Path]:
    ctr = buildah("from", "--pull=never", image)
    try:
        yield Path(buildah("mount", ctr))
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, check=False, timeout=600)


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    entries: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = "/" + str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                what: object = ("link", str(path.readlink()))
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256()
                with path.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
                what = ("file", digest.hexdigest())
            else:
                what = ("other", stat.S_IFMT(st.st_mode))
            entries[rel] = (what, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return entries


def config(image: str) -> dict[str, Any]:
    """The image's OCI configuration (layers as rootfs.diff_ids, history, env, labels...)."""
    value = json.loads(buildah("inspect", "--type", "image", image)).get("OCIv1")
    if not isinstance(value, dict):
        raise SystemExit(f"image_diff: {image}: buildah inspect gave no OCI configuration")
    return value


def config_differences(left: dict[str, Any], right: dict[str, Any]) -> list[str]:
    """Which layers (by position) and which other configuration fields differ."""
    out = []
    lay_a = left.get("rootfs", {}).get("diff_ids", [])
    lay_b = right.get("rootfs", {}).get("diff_ids", [])
    for i in range(max(len(lay_a), len(lay_b))):
        a = lay_a[i] if i < len(lay_a) else None
        b = lay_b[i] if i < len(lay_b) else None
        if a != b:
            out.append(f"layer {i + 1}: {a} != {b}")
    for key in sorted((left.keys() | right.keys()) - {"rootfs"}):
        if left.get(key) != right.get(key):
            out.append(f"config {key}: {json.dumps(left.get(key))} != {json.dumps(right.get(key))}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compare two local images file by file")
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--files", action="store_true", help="compare the files even when the digests agree")
    args = parser.parse_args(argv)
    digests = []
    for image in (args.first, args.second):
        # The manifest digest (a push or pull adds the registry's manifest digest) and the
        # image ID (the configuration's digest: every layer's diff ID, history, env, labels).
        digest, image_id = buildah(
            "inspect", "--type", "image", "--format", "{{.FromImageDigest}} {{.FromImageID}}", image
        ).split()
        digests.append(digest)
        sys.stdout.write(f"{image}: digest {digest} id sha256:{image_id}\n")
    if digests[0] == digests[1] and not args.files:
        sys.stdout.write("same digest: identical images\n")
        return 0
    meta = config_differences(config(args.first), config(args.second))
    for line in meta:
        sys.stdout.write(line + "\n")
    with mounted(args.first) as a, mounted(args.second) as b:
        left, right = tree(a), tree(b)
    differ = sorted(p for p in left.keys() | right.keys() if left.get(p) != right.get(p))
    for path in differ[: args.limit]:
        sys.stdout.write(f"{path}: {left.get(path)} != {right.get(path)}\n")
    sys.stdout.write(f"{len(differ)} of {len(left.keys() | right.keys())} paths differ\n")
    if not differ and meta:
        sys.stdout.write(
            "same files: the layers differ in what a file tree does not show (times, order, metadata)\n"
        )
    return 1 if differ or meta or digests[0] != digests[1] else 0


if __name__ == "__main__":
    sys.exit(main())
