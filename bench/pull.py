"""Pull + verify of a signed export vs. (raw transfer + one hashlib pass), side by side (issue 12 part 1).

    .venv/bin/python bench/pull.py [--size-mib 1024] [--runs 3] [--kinds s3,oci]

Starts its own SeaweedFS S3 and docker-registry (``ggufship up`` in a temporary state
dir), builds an export in the real layout — one GGUF-named file of ``--size-mib``
random bytes (``bench-1.0.0-Q4_K_M.gguf``), its ``.sha256`` sidecar, ``README.md``,
``manifest.json`` — signs it with a fresh EC key (``model.sig``), publishes it to S3
and the registry, pulls once per kind untimed (imports, connection pools), then runs
``--runs`` A/B pairs per kind — baseline and pull back to back, the order alternating —
and reports the median of the per-run ratios (robust to a machine whose load changes
between runs; the 1-minute load average is printed with each run) and the ratio of each
side's fastest run (what the work costs when the host adds nothing, as ``timeit`` takes the
minimum: on the test machine the CPU seconds of the same step jump between two levels from
run to run, on both sides):

* transfer: ``curl`` GET of the GGUF (S3 object, SigV4; registry blob) into a file;
* hash: one ``hashlib.sha256`` pass over the downloaded file (4 MiB reads);
* pull: ``ggufship.publish.pull_verified`` with the public key as policy — the GGUF,
  manifest, sidecar, README and signature fetched, every digest and the signature
  checked — into a fresh directory.

Target: pull <= 1.2 x (transfer + hash). Prints a Markdown table for bench/RESULTS.md.
The pull also fsyncs what it wrote (an atomic, durable directory); curl does not. The CPU
column (user + system seconds, medians: curl's plus the hash pass's, and the pull's over
all its threads) does not depend on how the machine's other load shares the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ggufship.integrity import sidecar_text  # noqa: E402
from ggufship.manifest import MANIFEST_NAME, Manifest, ManifestFile, SourceInfo  # noqa: E402
from ggufship.publish import PublishRequest, S3Target, publish, pull_verified  # noqa: E402
from ggufship.publish._oci import OciTarget  # noqa: E402
from ggufship.services import ServicesSettings, down, load_credentials, load_state, up  # noqa: E402
from ggufship.sign import SigningRequest, VerificationPolicy, generate_keypair, sign_export  # noqa: E402

MIB = 1024 * 1024
GGUF = "bench-1.0.0-Q4_K_M.gguf"


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_seconds() -> float:
    """user + system CPU of this process (all threads) and of its waited-for children (curl)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def hash_pass(path: Path) -> None:
    digest = hashlib.sha256()
    buf = bytearray(4 * MIB)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])


def build_export(root: Path, size_mib: int) -> Path:
    export = root / "bench-1.0.0"
    export.mkdir(parents=True)
    gguf = export / GGUF
    digest = hashlib.sha256()
    with gguf.open("wb") as fh:
        for _ in range(size_mib):
            block = os.urandom(MIB)
            digest.update(block)
            fh.write(block)
    sha = digest.hexdigest()
    (export / f"{GGUF}.sha256").write_text(sidecar_text(sha, GGUF), encoding="utf-8")
    readme = export / "README.md"
    readme.write_text("# bench\n\nRandom bytes in an export's layout.\n", encoding="utf-8")
    manifest = Manifest(
        name="bench",
        version="1.0.0",
        files=(
            ManifestFile(path=GGUF, sha256=sha, size=size_mib * MIB, kind="gguf", quantization="Q4_K_M"),
            ManifestFile(
                path="README.md",
                sha256=hashlib.sha256(readme.read_bytes()).hexdigest(),
                size=readme.stat().st_size,
                kind="model-card",
            ),
        ),
        source=SourceInfo(checkpoint_sha256="0" * 64, architecture="bench", weights_format="safetensors"),
    )
    (export / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return export


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kinds", default="s3,oci")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]

    work = Path(tempfile.mkdtemp(prefix="ggufship-bench-pull-"))
    state_dir = work / "state"
    try:
        up(ServicesSettings(state_dir=state_dir, services=("s3", "registry")))
        state = load_state(state_dir)
        s3_endpoint = state.services["s3"].endpoint
        registry = state.services["registry"].endpoint.removeprefix("http://")
        creds = load_credentials(state_dir).s3
        export = build_export(work, args.size_mib)
        private, public = generate_keypair(work / "keys")
        sign_export(export, SigningRequest(private_key=private))
        s3 = S3Target(
            bucket="bench",
            endpoint=s3_endpoint,
            access_key=creds.access_key,
            secret_key=creds.secret_key,
            create_bucket=True,
        )
        oci = OciTarget(registry=registry, repository="models/bench")
        t_publish = timed(lambda: publish(export, PublishRequest(s3=s3, oci=oci)))
        print(f"published in {t_publish:.1f} s", file=sys.stderr)
        sha = Manifest.load(export / MANIFEST_NAME).files[0].sha256
        uris = {"s3": "s3://bench/models/bench/1.0.0/", "oci": f"oci://{registry}/models/bench:1.0.0"}
        gets = {
            "s3": [
                "--aws-sigv4",
                "aws:amz:us-east-1:s3",
                "--user",
                f"{creds.access_key}:{creds.secret_key.get_secret_value()}",
                "-H",
                "x-amz-content-sha256: UNSIGNED-PAYLOAD",
                f"{s3_endpoint}/bench/models/bench/1.0.0/{GGUF}",
            ],
            "oci": ["-L", f"http://{registry}/v2/models/bench/blobs/sha256:{sha}"],
        }
        policy = VerificationPolicy(public_key=public)

        def baseline(kind: str) -> tuple[float, float, float]:
            raw = work / "raw.bin"
            cpu = cpu_seconds()
            t_get = timed(lambda: subprocess.run(["curl", "-sSf", "-o", str(raw), *gets[kind]], check=True))
            if raw.stat().st_size != args.size_mib * MIB:
                raise SystemExit(f"{kind}: curl fetched {raw.stat().st_size} bytes")
            t_hash = timed(lambda: hash_pass(raw))
            cpu = cpu_seconds() - cpu
            raw.unlink()
            return t_get, t_hash, cpu

        def ours(kind: str, run: int) -> tuple[float, float]:
            dest = work / f"pulled-{kind}-{run}"
            cpu = cpu_seconds()
            t_pull = timed(lambda: pull_verified(uris[kind], dest, policy=policy, s3=s3))
            cpu = cpu_seconds() - cpu
            shutil.rmtree(dest)
            return t_pull, cpu

        for kind in kinds:  # imports (model_signing, cryptography) and connection pools: not timed
            t_warm, _ = ours(kind, -1)
            print(f"warm-up {kind}: pull {t_warm:.2f} s (not counted)", file=sys.stderr)
        rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
        cpus: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        loads: list[float] = [os.getloadavg()[0]]
        for run in range(args.runs):
            for kind in kinds:
                # A/B per run, the order alternating: both sides see the same load and neither
                # always runs on a freshly dirtied page cache
                if run % 2:
                    t_pull, cpu_pull = ours(kind, run)
                    t_get, t_hash, cpu_base = baseline(kind)
                else:
                    t_get, t_hash, cpu_base = baseline(kind)
                    t_pull, cpu_pull = ours(kind, run)
                rows[kind].append((t_get, t_hash, t_pull))
                cpus[kind].append((cpu_base, cpu_pull))
                loads.append(os.getloadavg()[0])
                print(
                    f"run {run} {kind}: curl {t_get:.2f} s, hash {t_hash:.2f} s, pull {t_pull:.2f} s, "
                    f"ratio {t_pull / (t_get + t_hash):.2f}; CPU {cpu_base:.2f} s vs {cpu_pull:.2f} s "
                    f"(load {loads[-1]:.1f})",
                    file=sys.stderr,
                )

        print(
            f"\n{args.size_mib} MiB GGUF (random bytes) + sidecar + README + manifest, signed (EC key); "
            f"{args.runs} A/B runs per source (order alternating), medians; "
            f"1-min load average {min(loads):.1f}-{max(loads):.1f} during the runs; "
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs\n"
        )
        print(
            "| source | curl GET (s) | hashlib pass (s) | transfer + hash (s) | ggufship pull (s) "
            "| ratio, median (min-max) | ratio of the best runs | CPU s: curl + hash / pull |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for kind in kinds:
            got = rows[kind]
            ratios = [p / (g + h) for g, h, p in got]
            cells = " | ".join(
                f"{statistics.median(v):.2f}"
                for v in ([g for g, _, _ in got], [h for _, h, _ in got], [g + h for g, h, _ in got])
            )
            pull_med = statistics.median(p for _, _, p in got)
            spread = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            # each side's fastest run: what the work costs when the host adds nothing (as timeit's min)
            best = min(p for _, _, p in got) / (min(g for g, _, _ in got) + min(h for _, h, _ in got))
            cpu_cells = " / ".join(f"{statistics.median(c[i] for c in cpus[kind]):.2f}" for i in (0, 1))
            print(f"| {kind} | {cells} | {pull_med:.2f} | {spread} | {best:.2f} | {cpu_cells} |")
    finally:
        down(state_dir)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
