"""Smoke checks of the built image (components/build-image.sh runs this after a build).

Everything runs inside the image as uid 10001 with a read-only root filesystem and a
tmpfs /tmp (the chart's securityContext: readOnlyRootFilesystem, runAsUser 10001,
HOME=/tmp), in this machine's network namespace so loopback servers are shared:

1. ``ggufship --version`` with plain ``buildah run --user 10001:10001``;
2. ``ggufship export`` of the tiny test checkpoint (made here by
   ggufship.demo_checkpoint, as the tests make it, and bind-mounted read-only);
3. ``ggufship keygen``, ``sign``, ``verify --public-key``;
4. ``ggufship serve`` of that export on 127.0.0.1, answered from this machine with
   the official ``openai`` client (chat + completion);
5. each KFP component of components/kfp_components.py the way the KFP launcher runs
   it: the component's compiled container command and args (``sh -ec`` writes the
   function source to a file, then ``python3 -m kfp.dsl.executor_main``) with the
   ``{{$}}`` placeholder replaced by an executor input JSON; artifacts under /minio
   (KFP's local path of ``minio://`` URIs, kfp/dsl/types/artifact_types.py
   Artifact._get_path), publish to the docker-registry of ``ggufship up`` on loopback;
6. ``buildah push`` of the image to that registry, ``buildah pull`` back by digest,
   ``ggufship --version`` in the pulled image.

The results go to ~/.cache/ggufship/image/last-smoke.json; exit 1 when a check fails.

    .venv/bin/python components/smoke_image.py --image localhost/ggufship:0.1.0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("smoke_image")
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GGUFSHIP_IMAGE_CACHE", Path.home() / ".cache" / "ggufship" / "image"))
UID = "10001:10001"
QUANT = "Q8_0"


class SmokeError(Exception):
    """A smoke check failed; the message names the step and what went wrong."""


def sh(
    argv: list[str], *, timeout: float, check: bool = True, label: str = "", **kw: Any
) -> subprocess.CompletedProcess[str]:
    logger.debug("$ %s", shlex.join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SmokeError(f"{label or shlex.join(argv)[:300]} exited {proc.returncode}:\n{tail}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ImageRoot:
    """The image's root filesystem (``buildah from`` + ``buildah mount``), run the way the
    chart runs the containers: private mount namespace, the root bind-mounted read-only,
    tmpfs /tmp, /proc, /dev, the given host directories bound in, ``chroot`` as 10001."""

    def __init__(self, image: str, binds: dict[str, tuple[Path, bool]]) -> None:
        self.image = image
        self.binds = binds  # container path → (host path, writable)
        self.container = ""
        self.mount = ""
        self.env: list[str] = []
        self.workdir = "/"

    def __enter__(self) -> ImageRoot:
        self.container = sh(["buildah", "from", "--pull=never", self.image], timeout=300).stdout.strip()
        self.mount = sh(["buildah", "mount", self.container], timeout=60).stdout.strip()
        config = json.loads(sh(["buildah", "inspect", "--type", "image", self.image], timeout=60).stdout)
        oci = config["OCIv1"]["config"]
        self.env = [e for e in oci.get("Env", []) if not e.startswith("HOME=")] + ["HOME=/tmp"]
        self.workdir = oci.get("WorkingDir") or "/"
        for target in self.binds:  # mount points, in the throw-away working container
            Path(self.mount, target.lstrip("/")).mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        sh(["buildah", "umount", self.container], timeout=60, check=False)
        sh(["buildah", "rm", self.container], timeout=120, check=False)

    def argv(self, command: list[str], env: dict[str, str] | None = None) -> list[str]:
        m = shlex.quote(self.mount)
        steps = [
            f"mount --bind {m} {m}",
            f"mount -o remount,bind,ro {m}",
            f"mount -t tmpfs -o size=512m,mode=1777 tmpfs {m}/tmp",
            f"mount -t proc proc {m}/proc",
            f"mount --rbind /dev {m}/dev",
        ]
        for target, (host, writable) in self.binds.items():
            t = shlex.quote(self.mount + target)
            steps.append(f"mount --bind {shlex.quote(str(host))} {t}")
            if not writable:
                steps.append(f"mount -o remount,bind,ro {t}")
        envs = self.env + [f"{k}={v}" for k, v in (env or {}).items()]
        inner = [
            "chroot",
            f"--userspec={UID}",
            self.mount,
            "/usr/bin/env",
            "-i",
            "-C",
            self.workdir,
            *envs,
            *command,
        ]
        steps.append("exec " + shlex.join(inner))
        return ["unshare", "--mount", "--fork", "sh", "-ec", " && ".join(steps)]

    def run(self, command: list[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
        label = "in the image: " + shlex.join(command)[:300]
        return sh(self.argv(command, env), timeout=timeout, label=label).stdout

    @contextlib.contextmanager
    def background(self, command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                self.argv(command), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@dataclass
class Smoke:
    image: str
    work: Path
    results: list[dict[str, Any]] = field(default_factory=list)

    def step(self, name: str, fn: Callable[[], str]) -> None:
        start = time.monotonic()
        try:
            detail, ok = fn(), True
        except (SmokeError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as exc:
            detail, ok = f"{type(exc).__name__}: {exc}", False
        took = time.monotonic() - start
        self.results.append({"step": name, "ok": ok, "seconds": round(took, 1), "detail": detail[-2000:]})
        logger.info(
            "%s %-28s %6.1fs  %s",
            "PASS" if ok else "FAIL",
            name,
            took,
            detail.splitlines()[0] if detail else "",
        )


def buildah_version(image: str) -> str:
    ctr = sh(["buildah", "from", "--pull=never", image], timeout=300).stdout.strip()
    try:
        run = ["buildah", "run", "--isolation", "chroot", "--user", UID, ctr, "--"]
        out = sh([*run, "ggufship", "--version"], timeout=120).stdout
        who = sh([*run, "id", "-u"], timeout=60).stdout.strip()
    finally:
        sh(["buildah", "rm", ctr], timeout=120, check=False)
    if "ggufship" not in out or who != "10001":
        raise SmokeError(f"ggufship --version said {out!r} as uid {who!r}")
    return out.strip()


def serve_and_ask(root: ImageRoot, work: Path) -> str:
    import httpx
    import openai

    port = free_port()
    cmd = ["ggufship", "serve", "/data/export", "--quant", QUANT, "--public-key", "/data/keys/smoke.pub"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n-ctx", "512"]
    log = work / "serve.log"
    with root.background(cmd, log) as proc:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SmokeError(f"serve exited {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SmokeError(
                    f"serve not ready on 127.0.0.1:{port} within 180 s: {log.read_text()[-2000:]}"
                )
            time.sleep(1)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60
        )
        models = [m.id for m in client.models.list().data]
        chat = client.chat.completions.create(
            model=models[0], messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
        )
        completion = client.completions.create(model=models[0], prompt="The", max_tokens=8, temperature=0)
    if not chat.choices or chat.usage is None or chat.usage.completion_tokens < 1:
        raise SmokeError(f"chat completion without tokens: {chat}")
    if not completion.choices or completion.usage is None or completion.usage.completion_tokens < 1:
        raise SmokeError(f"completion without tokens: {completion}")
    return (
        f"models={models} chat={chat.usage.completion_tokens} tokens "
        f"completion={completion.usage.completion_tokens} tokens ({chat.choices[0].finish_reason})"
    )


def kfp_components() -> list[Any]:
    spec = importlib.util.spec_from_file_location(
        "ggufship_kfp_components", ROOT / "components" / "kfp_components.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    components = [getattr(module, name) for name in module.__all__]
    # The pipeline's order (each step consumes the Model of the one before); others last.
    order = ["export-model", "sign-model", "publish-model", "deploy-and-await", "rollback-release"]
    rank = {name: i for i, name in enumerate(order)}
    return sorted(components, key=lambda c: rank.get(c.component_spec.name, len(order)))


class KfpRun:
    """Executor inputs for the components, chained: every input artifact is the last output Model."""

    def __init__(self, root: ImageRoot, host_minio: Path, host_out: Path, params: dict[str, Any]) -> None:
        self.root, self.host_minio, self.host_out, self.params = root, host_minio, host_out, params
        self.last_model: dict[str, Any] | None = None
        self.outputs: dict[str, Any] = {}

    def executor_input(self, component: Any) -> dict[str, Any]:
        spec = component.component_spec
        name = spec.name
        inputs: dict[str, Any] = {"parameterValues": {}, "artifacts": {}}
        for key, inp in (spec.inputs or {}).items():
            if str(inp.type).startswith("system."):
                if self.last_model is None:
                    raise SmokeError(f"{name}: input artifact {key!r} but no earlier step made a Model")
                inputs["artifacts"][key] = {"artifacts": [self.last_model]}
            elif key in self.params:
                inputs["parameterValues"][key] = self.params[key]
            else:
                raise SmokeError(f"{name}: no smoke value for input parameter {key!r}")
        outputs: dict[str, Any] = {"artifacts": {}, "parameters": {}}
        for key, out in (spec.outputs or {}).items():
            if str(out.type).startswith("system."):
                schema = str(out.type).split("@")[0]
                uri = f"minio://mlpipeline/smoke/{name}/{key}"
                outputs["artifacts"][key] = {
                    "artifacts": [{"name": key, "type": {"schemaTitle": schema}, "uri": uri, "metadata": {}}]
                }
            else:
                outputs["parameters"][key] = {"outputFile": f"/kfp/{name}/parameters/{key}"}
        outputs["outputFile"] = f"/kfp/{name}/output_metadata.json"
        return {"inputs": inputs, "outputs": outputs}

    def run(self, component: Any) -> str:
        spec = component.component_spec
        container = spec.implementation.container
        payload = json.dumps(self.executor_input(component))
        # The launcher substitutes {{$}} with the executor input (kfp/dsl/placeholders.py
        # ExecutorInputPlaceholder) and runs command + args in the component's image.
        argv = [payload if a == "{{$}}" else a for a in [*container.command, *(container.args or [])]]
        # The registry is on loopback: plain HTTP is the default there (no GGUFSHIP_OCI_* needed).
        self.root.run(argv, timeout=900)
        result = json.loads((self.host_out / spec.name / "output_metadata.json").read_text())
        artifacts = result.get("artifacts", {})
        for key, value in artifacts.items():
            art = value["artifacts"][0]
            out = spec.outputs[key]
            if str(out.type).startswith("system.Model"):
                self.last_model = {
                    "name": key,
                    "type": {"schemaTitle": "system.Model"},
                    "uri": art["uri"],
                    "metadata": art.get("metadata", {}),
                }
            if str(out.type).startswith("system.Metrics"):
                # Metrics live in the artifact's metadata (Metrics.log_metric), not in a file.
                if not art.get("metadata"):
                    raise SmokeError(f"{spec.name}: metrics artifact {key} has no metrics")
                continue
            local = self.host_minio / art["uri"].removeprefix("minio://")
            if not local.exists():
                raise SmokeError(f"{spec.name}: output artifact {key} not written at {art['uri']}")
        self.outputs[spec.name] = result
        params = result.get("parameterValues", {})
        return f"artifacts={sorted(artifacts)} parameters={params}"


def push_and_pull(image: str, registry: str) -> str:
    digest_file = Path(tempfile.mkdtemp()) / "digest"
    dest = f"{registry}/ggufship/ggufship:smoke"
    sh(
        [
            "buildah",
            "push",
            "--tls-verify=false",
            "--digestfile",
            str(digest_file),
            image,
            f"docker://{dest}",
        ],
        timeout=900,
    )
    digest = digest_file.read_text().strip()
    by_digest = f"{registry}/ggufship/ggufship@{digest}"
    pulled = sh(
        ["buildah", "pull", "--tls-verify=false", f"docker://{by_digest}"], timeout=900
    ).stdout.strip()
    version = buildah_version(by_digest)
    sh(["buildah", "rmi", by_digest], timeout=300, check=False)
    return f"pushed {dest} {digest}; pulled by digest (image id {pulled[:12]}): {version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--no-push", action="store_true", help="skip the registry push/pull")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[smoke %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    sys.path.insert(0, str(ROOT / "src"))
    from ggufship.demo_checkpoint import build_checkpoint
    from ggufship.services import ServicesSettings, down, up

    work = Path(tempfile.mkdtemp(prefix="ggufship-smoke-"))
    data, minio, kfp_out = work / "data", work / "minio", work / "kfp"
    for d in (data, minio, kfp_out):
        d.mkdir()
    work.chmod(0o755)
    build_checkpoint(work / "checkpoint")
    # The pod's volumes belong to its fsGroup; the checkpoint is mounted read-only.
    sh(["chown", "-R", UID, str(work / "checkpoint"), str(data), str(minio), str(kfp_out)], timeout=60)
    state_dir = work / "services"
    smoke = Smoke(args.image, work)
    started = time.monotonic()
    try:
        statuses = up(ServicesSettings(state_dir=state_dir, services=("registry",), start_timeout_s=60.0))
        registry = statuses[0].info.endpoint.removeprefix("http://")
        binds = {
            "/checkpoint": (work / "checkpoint", False),
            "/data": (data, True),
            "/minio": (minio, True),
            "/kfp": (kfp_out, True),
        }
        smoke.step("buildah run --version", lambda: buildah_version(args.image))
        with ImageRoot(args.image, binds) as root:
            smoke.step("read-only root", lambda: read_only_check(root))
            smoke.step(
                "export",
                lambda: root.run(
                    [
                        "ggufship",
                        "export",
                        "/checkpoint",
                        "-o",
                        "/data/export",
                        "--name",
                        "tiny",
                        "--version",
                        "0.1.0",
                        "--quant",
                        QUANT,
                    ],
                    timeout=900,
                ).strip()[-300:],
            )
            smoke.step(
                "keygen",
                lambda: root.run(["ggufship", "keygen", "-o", "/data/keys", "--name", "smoke"], timeout=120),
            )
            smoke.step(
                "sign",
                lambda: root.run(
                    ["ggufship", "sign", "/data/export", "--private-key", "/data/keys/smoke.key"], timeout=300
                ),
            )
            smoke.step(
                "verify",
                lambda: root.run(
                    ["ggufship", "verify", "/data/export", "--public-key", "/data/keys/smoke.pub"],
                    timeout=300,
                ),
            )
            smoke.step("serve + openai client", lambda: serve_and_ask(root, work))
            params = {
                "checkpoint": "/checkpoint",
                "name": "tiny",
                "version": "0.1.0",
                "adapter": "",
                "quantizations": QUANT,
                "release": "",
                "release_repo": "",
                "release_revision": "",
                "method": "key",
                "private_key": "/data/keys/smoke.key",
                "certificate": "",
                "certificate_chain": "",
                "trust_config": "",
                "s3": "",
                "oci": f"oci://{registry}/models/tiny:0.1.0",
                "gitops": "",
                "environment": "smoke",
                "force": True,
                "create_bucket": False,
                "mode": "none",
                "model_uri": "",
                "model_sha256": "",
                "rollout_name": "",
                "namespace": "default",
                "stable_model": "",
                "state_dir": "",
                "timeout_s": 60.0,
                # PipelineTaskFinalStatus as the KFP driver passes it to an exit handler
                # (kfp/dsl/executor.py Executor.execute reads state, error.code, error.message)
                "status": {
                    "state": "SUCCEEDED",
                    "pipelineJobResourceName": "smoke",
                    "pipelineTaskName": "exit-handler",
                    "error": {},
                },
            }
            kfp = KfpRun(root, minio, kfp_out, params)
            for component in kfp_components():
                smoke.step(f"kfp {component.component_spec.name}", lambda c=component: kfp.run(c))
        if not args.no_push:
            smoke.step("push + pull by digest", lambda: push_and_pull(args.image, registry))
    finally:
        with contextlib.suppress(Exception):
            down(state_dir, stop_timeout_s=10.0)
        if not args.keep:
            sh(["rm", "-rf", str(work)], timeout=120, check=False)
    failed = [r["step"] for r in smoke.results if not r["ok"]]
    report = {
        "image": args.image,
        "ok": not failed,
        "seconds": round(time.monotonic() - started, 1),
        "steps": smoke.results,
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "last-smoke.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "%d/%d checks passed (%s)",
        len(smoke.results) - len(failed),
        len(smoke.results),
        CACHE / "last-smoke.json",
    )
    return 1 if failed else 0


def read_only_check(root: ImageRoot) -> str:
    out = root.run(
        [
            "sh",
            "-c",
            "id -u; touch /opt/venv/x 2>/dev/null && echo root-writable || echo root-read-only; "
            "touch /tmp/x && echo tmp-writable",
        ],
        timeout=60,
    ).split()
    if out != ["10001", "root-read-only", "tmp-writable"]:
        raise SmokeError(f"expected uid 10001, read-only root, writable /tmp; got {out}")
    return " ".join(out)


if __name__ == "__main__":
    sys.exit(main())
