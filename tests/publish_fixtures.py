"""Helpers shared by the publish, GitOps and rollback tests: synthetic exports, a stalling
publisher process, and ``git`` on a bare repository."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from ggufship.integrity import sidecar_text
from ggufship.manifest import MANIFEST_NAME, Manifest, ManifestFile, SourceInfo

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def make_export(
    root: Path,
    name: str = "syn",
    version: str = "1.0.0",
    *,
    big: int = 11 * MIB,
    seed: int = 1,
    signature: bool = True,
) -> Path:
    """An export with a real manifest: one 'big' GGUF (multipart), one small, a card, a signature."""
    out = root / f"{name}-{version}"
    out.mkdir(parents=True)
    rng = __import__("random").Random(seed)
    files = []
    for quant, size in (("F16", big), ("Q4_K_M", 4096)):
        fname = f"{name}-{version}-{quant}.gguf"
        data = b"GGUF" + rng.randbytes(size - 4)
        (out / fname).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        (out / f"{fname}.sha256").write_text(sidecar_text(digest, fname))
        files.append(ManifestFile(path=fname, sha256=digest, size=size, kind="gguf", quantization=quant))
    card = f"# {name} {version}\n".encode()
    (out / "README.md").write_bytes(card)
    files.append(
        ManifestFile(
            path="README.md", sha256=hashlib.sha256(card).hexdigest(), size=len(card), kind="model-card"
        )
    )
    manifest = Manifest(
        name=name,
        version=version,
        base_model="acme/base",
        files=tuple(files),
        source=SourceInfo(
            checkpoint_sha256="0" * 64, architecture="LlamaForCausalLM", weights_format="safetensors"
        ),
        metadata={"evaluations": [{"task": "text-generation", "dataset": "d", "metrics": {"accuracy": 0.8}}]},
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json())
    if signature:
        (out / "model.sig").write_text(json.dumps({"signature": rng.randbytes(16).hex()}))
    return out


# A publisher (run as ``python -c STALLING_PUBLISHER EXPORT STATE_DIR``) that stops after two parts
# of the big file are up, prints STALLED and waits on stdin until killed; FINISHED if let through.
STALLING_PUBLISHER = r"""
import sys, contextlib
from pathlib import Path
from ggufship.progress import Reporter
from ggufship.publish import PublishRequest, S3Target, publish
from ggufship.services import load_credentials, load_state

class Stall:
    def __init__(self): self.parts = 0
    def advance(self, amount=1):
        self.parts += 1
        if self.parts == 2:  # two parts of the big file are up: stop here until killed
            sys.stdout.write("STALLED\n"); sys.stdout.flush()
            sys.stdin.read()

class Null:
    def advance(self, amount=1): pass

class StallingReporter(Reporter):
    @contextlib.contextmanager
    def task(self, description, total):
        yield Stall() if description.endswith("F16.gguf") else Null()

state_dir = Path(sys.argv[2])
creds = load_credentials(state_dir).s3
target = S3Target(bucket="models", endpoint=load_state(state_dir).services["s3"].endpoint,
                  access_key=creds.access_key, secret_key=creds.secret_key,
                  part_size=5 * 1024 * 1024, parallel=1, create_bucket=True)
publish(Path(sys.argv[1]), PublishRequest(s3=target), reporter=StallingReporter(enabled=False))
sys.stdout.write("FINISHED\n")
"""


def git_bare(repo: str, *args: str) -> str:
    path = repo.removeprefix("file://")
    out = subprocess.run(["git", f"--git-dir={path}", *args], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def git_show(repo: str, path: str, rev: str = "main") -> str:
    return git_bare(repo, "show", f"{rev}:{path}")


def git_log(repo: str) -> list[str]:
    return git_bare(repo, "log", "--format=%H %an <%ae> %s", "main").splitlines()


def embedded_s3_env(state_dir: Path) -> dict[str, str]:
    """``GGUFSHIP_S3_*`` for the S3 that ``ggufship up`` recorded in ``state_dir`` (what the CLI falls
    back to; the library takes only explicit settings and the environment)."""
    from ggufship.services import load_credentials, load_state

    record = load_state(state_dir).services["s3"]
    creds = load_credentials(state_dir).s3
    return {
        "GGUFSHIP_S3_ENDPOINT": record.endpoint,
        "GGUFSHIP_S3_ACCESS_KEY": creds.access_key,
        "GGUFSHIP_S3_SECRET_KEY": creds.secret_key.get_secret_value(),
    }


def embedded_s3(state_dir: Path, bucket: str = "models", **options: object):  # -> S3Target
    """An explicit :class:`S3Target` for the embedded S3 of ``state_dir`` (``options`` override)."""
    from pydantic import SecretStr

    from ggufship.publish import S3Target

    env = embedded_s3_env(state_dir)
    fields: dict[str, object] = {
        "endpoint": env["GGUFSHIP_S3_ENDPOINT"],
        "access_key": env["GGUFSHIP_S3_ACCESS_KEY"],
        "secret_key": SecretStr(env["GGUFSHIP_S3_SECRET_KEY"]),
    }
    return S3Target(bucket=bucket, **{**fields, **options})  # type: ignore[arg-type]
