"""The release spec read from the release Git repository at the pushed revision (what the Argo Events
Sensor sends: ``release_repo``, ``release_revision``, ``release`` = the spec's path in the repo), on
a real git repository: resolved, refused with errors naming the repository and revision, the Git
token sent as a header; and a kfp.local run that exports with the spec of the given revision."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ggufship.errors import UnsafePathError
from ggufship.pipeline.inputs import InputFetchError, resolve_release_input
from tests.test_git_token import TOKEN, _expected_header, recording_server  # noqa: F401 (fixture)

pytest_plugins = ["tests.services_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
SPEC = "releases/tiny-4.0.0.yaml"
FIRST, LATER = "Released from the first commit.", "Changed in a later commit."


def _git(repo: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "PATH": "/usr/bin:/bin",
        "HOME": str(repo),
    }
    done = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def release_repo(tmp_path: Path, release_yaml: Path) -> tuple[Path, str, str]:
    """A release repository with the spec (and its golden data beside it) in two commits that
    differ in the description: ``(path, first commit, second commit)``."""
    repo = tmp_path / "ml-releases"
    (repo / "releases").mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    shutil.copytree(release_yaml.parent / "data", repo / "releases" / "data")
    text = release_yaml.read_text()
    assert "Tiny test fine-tune." in text
    (repo / SPEC).write_text(text.replace("Tiny test fine-tune.", FIRST))
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "release tiny 4.0.0")
    first = _git(repo, "rev-parse", "HEAD")
    (repo / SPEC).write_text(text.replace("Tiny test fine-tune.", LATER))
    _git(repo, "commit", "-q", "-am", "change the description")
    return repo, first, _git(repo, "rev-parse", "HEAD")


def test_spec_at_the_revision(release_repo, tmp_path: Path) -> None:
    repo, first, second = release_repo
    spec = resolve_release_input(SPEC, tmp_path / "a", repo=str(repo), revision=first)
    assert FIRST in spec.read_text() and LATER not in spec.read_text()
    assert (spec.parent / "data" / "a.jsonl").is_file()  # the golden data beside it, same checkout
    assert LATER in resolve_release_input(SPEC, tmp_path / "b", repo=str(repo), revision=second).read_text()
    # a branch name, and no revision at all (the remote's HEAD)
    assert LATER in resolve_release_input(SPEC, tmp_path / "c", repo=str(repo), revision="main").read_text()
    assert LATER in resolve_release_input(SPEC, tmp_path / "d", repo=f"file://{repo}").read_text()


def test_bad_git_release_inputs(release_repo, tmp_path: Path) -> None:
    repo, first, _ = release_repo
    missing = "0" * 40
    with pytest.raises(InputFetchError, match=rf"{repo}@{missing}: no such commit, tag or branch"):
        resolve_release_input(SPEC, tmp_path / "a", repo=str(repo), revision=missing)
    with pytest.raises(InputFetchError, match=rf"{repo}@{first}: no file 'releases/other.yaml'"):
        resolve_release_input("releases/other.yaml", tmp_path / "b", repo=str(repo), revision=first)
    with pytest.raises(UnsafePathError, match=rf"{repo}@{first}: release '../x.yaml'"):
        resolve_release_input("../x.yaml", tmp_path / "c", repo=str(repo), revision=first)
    with pytest.raises(InputFetchError, match=r"release_revision '--upload-pack=touch' is not a commit"):
        resolve_release_input(SPEC, tmp_path / "d", repo=str(repo), revision="--upload-pack=touch")
    with pytest.raises(InputFetchError, match=r"release_revision 'abc' given without release_repo"):
        resolve_release_input(SPEC, tmp_path / "e", revision="abc")
    with pytest.raises(InputFetchError, match=r"either an s3:// release or release_repo"):
        resolve_release_input("s3://b/r.yaml", tmp_path / "f", repo=str(repo))
    gone = tmp_path / "no-such-repo"
    with pytest.raises(InputFetchError, match=rf"{gone}@{first}: git clone failed"):
        resolve_release_input(SPEC, tmp_path / "g", repo=str(gone), revision=first)


def test_private_release_repo_gets_the_token_as_header(
    recording_server,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GGUFSHIP_GIT_TOKEN reaches the release repository's server (a real loopback HTTP server that
    refuses) as an Authorization header; the error names the repository and carries no token."""
    url, seen = recording_server
    monkeypatch.setenv("GGUFSHIP_GIT_TOKEN", TOKEN)
    with pytest.raises(InputFetchError, match=r"git clone failed") as info:
        resolve_release_input(SPEC, tmp_path / "a", repo=url, revision="main")
    assert seen and all(r.get("authorization") == _expected_header() for r in seen)
    assert url in str(info.value) and TOKEN not in str(info.value)
    assert _expected_header().split()[1] not in str(info.value)


def test_local_run_release_from_git(tmp_path: Path, services_factory, llama_ckpt: Path, release_repo) -> None:
    """kfp.local: export and evaluate read the release spec from the Git repository at the given
    revision (not its newest commit); the export's metadata carries that revision's description."""
    from ggufship.pipeline import embedded_targets, run_local

    repo, first, _ = release_repo
    state_dir, _ = services_factory(services=("s3",))
    targets, env = embedded_targets(state_dir, "tiny")
    params = {
        "checkpoint": str(llama_ckpt),
        "name": "tiny",
        "version": "4.0.0",
        "quantizations": "Q8_0",
        "release": SPEC,
        "release_repo": f"file://{repo}",
        "release_revision": first,
        "signing_method": "none",
        "deploy_mode": "none",
        **targets,
    }
    result = run_local(params, pipeline_root=tmp_path / "kfp", env=env)
    (run_dir,) = [p for p in result.pipeline_root.iterdir() if p.name.startswith("export-to-canary-")]
    export_meta = json.loads((run_dir / "export-model" / "executor_output.json").read_text())
    model_meta = export_meta["artifacts"]["model"]["artifacts"][0]["metadata"]
    assert model_meta["version"] == "4.0.0"
    export_dir = run_dir / "export-model" / "model"
    texts = "".join(
        p.read_text(errors="replace") for p in export_dir.glob("*") if p.suffix in (".md", ".json")
    )
    assert FIRST in texts and LATER not in texts
