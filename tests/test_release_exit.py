"""A rejected release is undone in Git on every executor: the Argo workflow's ``onExit`` and the
KFP pipeline's exit handler both run ``ggufship rollback`` (see tests/test_rollback.py for the
rollback itself, on a real bare repository)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _workflow() -> dict:
    return yaml.safe_load((ROOT / "pipelines" / "argo" / "release-workflow.yaml").read_text())


def test_argo_awaits_fail_at_once_on_degraded() -> None:
    # Argo Workflows' resource template polls the object and fails the step as soon as the
    # failureCondition matches (argo-workflows workflow/executor/resource.go, WaitResource); a
    # Rollout aborted by its analysis is Degraded (argo-rollouts utils/rollout/rolloututil.go,
    # CalculateRolloutPhase: condition reason RolloutAborted → Degraded).
    templates = {t["name"]: t for t in _workflow()["spec"]["templates"]}
    for name in ("await-canary-start", "await-canary-outcome"):
        assert templates[name]["resource"]["failureCondition"] == "status.phase == Degraded", name


def test_argo_on_exit_rolls_back_unless_succeeded() -> None:
    wf = _workflow()["spec"]
    templates = {t["name"]: t for t in wf["templates"]}
    assert wf["onExit"] == "exit-handler"
    ((step,),) = templates["exit-handler"]["steps"]
    assert step["template"] == "rollback" and step["when"] == "{{workflow.status}} != Succeeded"
    container = templates["rollback"]["container"]
    script = container["args"][0]
    assert script.startswith("exec ggufship rollback ") and "{{" not in script
    flags = ('--gitops "$GITOPS"', '--gitops-env "$ENVIRONMENT"', '--name "$NAME"', '--version "$VERSION"')
    assert all(flag in script for flag in flags), script
    env = {e["name"]: e for e in container["env"]}
    assert env["WORKFLOW_STATUS"]["value"] == "{{workflow.status}}"
    assert env["GIT_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ggufship-git"


def test_rollback_cli_accepts_what_the_workflow_passes() -> None:
    from ggufship.cli.main import build_parser
    from ggufship.cli.settings_flags import resolve

    where = ["--gitops", "https://git.example/x.git", "--gitops-env", "production"]
    what = ["--name", "support-bot", "--version", "1.4.0", "--verdict", "release workflow w ended Failed"]
    args = resolve(build_parser().parse_args(["rollback", *where, *what]))
    assert args.func.__name__ == "run_rollback" and args.version == "1.4.0"
