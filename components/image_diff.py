"""Compare two local images file by file (the reproducibility check of the image).

    .venv/bin/python components/image_diff.py localhost/ggufship:0.1.0 localhost/ggufship:rebuild

Prints both digests, then every path whose content, mode, owner or link target differs
(or exists in only one image); exit 0 when the file trees are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compare two local images file by file")
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--limit", type=int, default=60)
    args = parser.parse_args(argv)
    for image in (args.first, args.second):
        sys.stdout.write(
            f"{image}: {buildah('inspect', '--type', 'image', '--format', '{{.FromImageDigest}}', image)}\n"
        )
    with mounted(args.first) as a, mounted(args.second) as b:
        left, right = tree(a), tree(b)
    differ = sorted(p for p in left.keys() | right.keys() if left.get(p) != right.get(p))
    for path in differ[: args.limit]:
        sys.stdout.write(f"{path}: {left.get(path)} != {right.get(path)}\n")
    sys.stdout.write(f"{len(differ)} of {len(left.keys() | right.keys())} paths differ\n")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
