"""``s3://`` pipeline inputs (checkpoint, adapter, release) on the embedded S3 (SeaweedFS): fetched, checked,
refused with an error naming the URI; and a kfp.local run whose checkpoint is an s3:// URI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ggufship.errors import UnsafePathError
from ggufship.pipeline.inputs import (
    InputFetchError,
    fetch_s3_prefix,
    resolve_dir_input,
    resolve_release_input,
)
from tests.publish_fixtures import embedded_s3, embedded_s3_env

pytest_plugins = ["tests.services_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ckpts"


@pytest.fixture
def s3(services_factory, monkeypatch: pytest.MonkeyPatch):
    """A started embedded S3 with bucket ``ckpts``; the environment points the steps at it."""
    from ggufship.publish._s3 import S3Target, client_for, resolve_connection

    state_dir, _ = services_factory(services=("s3",))
    for var, value in embedded_s3_env(state_dir).items():  # the CLI passes these on
        monkeypatch.setenv(var, value)
    client = client_for(resolve_connection(S3Target(bucket=BUCKET)))
    client.make_bucket(BUCKET)
    return client


def upload_dir(client, src: Path, prefix: str) -> None:
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        client.fput_object(BUCKET, f"{prefix}/{path.relative_to(src).as_posix()}", str(path))


def put(client, key: str, data: bytes) -> None:
    import io

    client.put_object(BUCKET, key, io.BytesIO(data), len(data))


def test_fetch_checkpoint_every_object(s3, llama_ckpt: Path, tmp_path: Path) -> None:
    upload_dir(s3, llama_ckpt, "runs/7/ckpt")
    got = resolve_dir_input(f"s3://{BUCKET}/runs/7/ckpt", "checkpoint", tmp_path / "w")
    want = sorted(p.relative_to(llama_ckpt).as_posix() for p in llama_ckpt.rglob("*") if p.is_file())
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == want
    for rel in want:
        assert (got / rel).read_bytes() == (llama_ckpt / rel).read_bytes()
    # a local path is returned as it is (no fetch)
    assert resolve_dir_input(str(llama_ckpt), "checkpoint", tmp_path / "x") == llama_ckpt


def test_missing_and_empty_prefix(s3, tmp_path: Path) -> None:
    with pytest.raises(InputFetchError, match=r"s3://ckpts/nope: no objects under this prefix"):
        resolve_dir_input(f"s3://{BUCKET}/nope", "checkpoint", tmp_path / "a")
    with pytest.raises(InputFetchError, match=r"s3://no-such-bucket/x: bucket 'no-such-bucket' does not"):
        resolve_dir_input("s3://no-such-bucket/x", "checkpoint", tmp_path / "b")
    put(s3, "empty-sibling/a.txt", b"x")  # a prefix that only shares a beginning is not "under" it
    with pytest.raises(InputFetchError, match=r"s3://ckpts/empty: no objects"):
        resolve_dir_input(f"s3://{BUCKET}/empty", "checkpoint", tmp_path / "c")


def test_not_a_checkpoint(s3, tmp_path: Path) -> None:
    put(s3, "notckpt/README.md", b"hello")
    with pytest.raises(InputFetchError, match=r"s3://ckpts/notckpt: not a checkpoint — no config.json"):
        resolve_dir_input(f"s3://{BUCKET}/notckpt", "checkpoint", tmp_path / "a")
    with pytest.raises(InputFetchError, match=r"not a adapter — no adapter_config.json"):
        resolve_dir_input(f"s3://{BUCKET}/notckpt", "adapter", tmp_path / "b")


def test_truncated_safetensors(s3, llama_ckpt: Path, tmp_path: Path) -> None:
    upload_dir(s3, llama_ckpt, "trunc")
    whole = (llama_ckpt / "model.safetensors").read_bytes()
    put(s3, "trunc/model.safetensors", whole[: len(whole) - 100])
    with pytest.raises(InputFetchError, match=r"s3://ckpts/trunc: object 'trunc/model.safetensors'.*trunc"):
        resolve_dir_input(f"s3://{BUCKET}/trunc", "checkpoint", tmp_path / "a")


def test_unsafe_key_refused(s3, tmp_path: Path) -> None:
    put(s3, "evil/config.json", b"{}")
    put(s3, "evil/\u202etxt.exe", b"x")  # a bidi override: the name shows other than it is
    with pytest.raises(UnsafePathError, match=r"s3://ckpts/evil: object 'evil/.*U\+202E"):
        fetch_s3_prefix(f"s3://{BUCKET}/evil", tmp_path / "a")


def test_release_spec_uri(s3, release_yaml: Path, tmp_path: Path) -> None:
    upload_dir(s3, release_yaml.parent, "rel")
    spec = resolve_release_input(f"s3://{BUCKET}/rel/{release_yaml.name}", tmp_path / "w")
    assert spec.read_bytes() == release_yaml.read_bytes()
    with pytest.raises(InputFetchError, match=r"s3://ckpts/rel: a release spec URI names the spec object"):
        resolve_release_input(f"s3://{BUCKET}/rel", tmp_path / "x")
    with pytest.raises(InputFetchError, match=r"s3://ckpts/rel/other.yaml: no such object"):
        resolve_release_input(f"s3://{BUCKET}/rel/other.yaml", tmp_path / "y")


def test_local_run_checkpoint_from_s3(tmp_path: Path, services_factory, llama_ckpt: Path) -> None:
    """kfp.local: the export step fetches the checkpoint from s3:// on the embedded S3 and exports it."""
    from ggufship.pipeline import embedded_targets, run_local
    from ggufship.publish._s3 import client_for, resolve_connection

    state_dir, _ = services_factory(services=("s3",))
    targets, env = embedded_targets(state_dir, "tiny")
    client = client_for(resolve_connection(embedded_s3(state_dir, bucket=BUCKET)))
    client.make_bucket(BUCKET)
    upload_dir(client, llama_ckpt, "runs/1/checkpoint")
    params = {
        "checkpoint": f"s3://{BUCKET}/runs/1/checkpoint",
        "name": "tiny",
        "version": "3.0.0",
        "quantizations": "Q8_0",
        "signing_method": "none",
        "deploy_mode": "none",
        **targets,
    }
    result = run_local(params, pipeline_root=tmp_path / "kfp", root=ROOT, env=env)
    (run_dir,) = [p for p in result.pipeline_root.iterdir() if p.name.startswith("export-to-canary-")]
    export_meta = json.loads((run_dir / "export-model" / "executor_output.json").read_text())
    model_meta = export_meta["artifacts"]["model"]["artifacts"][0]["metadata"]
    assert model_meta["version"] == "3.0.0" and model_meta["quantization"] == "Q8_0"
    assert len(model_meta["sha256"]) == 64 and model_meta["size"] > 0
    published = json.loads((run_dir / "publish-model" / "executor_output.json").read_text())
    published = published["parameterValues"]
    assert published["s3_uri"] == "s3://ggufship-models/models/tiny/3.0.0/"


def test_export_step_refuses_bad_s3_checkpoint_writing_nothing(s3, tmp_path: Path) -> None:
    """The export step (what the KFP component calls) fails on a missing prefix before writing output."""
    from ggufship.pipeline import steps

    out = tmp_path / "out"
    with pytest.raises(InputFetchError, match=r"s3://ckpts/runs/404: no objects under this prefix"):
        steps.export(checkpoint=f"s3://{BUCKET}/runs/404", out_dir=str(out), name="tiny", version="1.0.0")
    assert not out.exists()
