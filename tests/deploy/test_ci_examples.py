"""examples/ci: the pipelines parse, and their `secateur submit` line is one the CLI accepts."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from secateur.cli.outcome import EXIT_CANCELLED, EXIT_GATE
from secateur.cli.parser import build_parser

REPO = Path(__file__).resolve().parents[2]
CI = REPO / "examples" / "ci"
GITHUB = CI / "github-actions.yml"
CLOUDBUILD = CI / "cloudbuild.yaml"


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def github_scripts() -> list[str]:
    workflow = load(GITHUB)
    return [s["run"] for job in workflow["jobs"].values() for s in job["steps"] if "run" in s]


def cloudbuild_scripts() -> list[str]:
    return [" ".join(s.get("args", [])) for s in load(CLOUDBUILD)["steps"]]


def submit_command(scripts: list[str]) -> str:
    """The one ``secateur submit`` command of the scripts, continuation lines joined."""
    commands = [
        line.strip()
        for script in scripts
        for line in script.replace("\\\n", " ").splitlines()
        if line.strip().startswith("secateur submit")
    ]
    assert len(commands) == 1, commands
    return commands[0]


def as_argv(command: str) -> list[str]:
    """The command's arguments with the CI's placeholders filled in, as a shell passes them."""
    command = re.sub(r"\$\{\{[^}]*\}\}", "placeholder", command)  # ${{ secrets.X }}
    command = re.sub(r"<\([^)]*\)", "/dev/fd/63", command)  # process substitution
    command = re.sub(r"\$\$?\{?(\w+)\}?", lambda m: m.group(1).lower(), command)  # $VAR, $$VAR
    argv = shlex.split(command)
    assert argv[:2] == ["secateur", "submit"], argv
    return argv[1:]


def submit_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices["submit"]
            return sub
    raise AssertionError("no submit subcommand")


@pytest.mark.parametrize(
    "scripts", [github_scripts, cloudbuild_scripts], ids=["github-actions", "cloudbuild"]
)
def test_submitCommand_isAcceptedByTheCli(scripts: Any) -> None:
    argv = as_argv(submit_command(scripts()))
    args = build_parser().parse_args(argv)  # SystemExit on an unknown flag or bad value
    assert args.command == "submit"
    assert args.wait is True
    assert args.max_accuracy_drop == pytest.approx(0.01)
    assert args.report and args.token_file and args.server
    # Every flag spelled out in full (argparse would also accept abbreviations).
    known = {s for action in submit_parser()._actions for s in action.option_strings}
    flags = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    assert flags <= known, f"not flags of `secateur submit`: {sorted(flags - known)}"
    assert {"--wait", "--max-accuracy-drop", "--report", "--server", "--token-file"} <= flags


def test_githubActions_uploadsTheReportAndFailsOnANonZeroExit() -> None:
    workflow = load(GITHUB)
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    (prune,) = [s for s in steps if "secateur submit" in s.get("run", "")]
    assert prune.get("shell") == "bash"  # process substitution <(...)
    assert re.search(r'exit "?\$code"?\s*$', prune["run"].strip()), "stage must exit with the code"
    assert "secrets.SECATEUR_SERVER" in str(prune["env"])
    assert "secrets.SECATEUR_TOKEN" in str(prune["env"])
    (upload,) = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert "cancelled()" in upload["if"] or "always()" in upload["if"]
    assert (
        upload["with"]["path"]
        == build_parser().parse_args(as_argv(submit_command(github_scripts()))).report
    )
    assert steps.index(upload) > steps.index(prune)


def test_cloudbuild_takesTheTokenFromSecretManagerAndGatesOnTheCode() -> None:
    config = load(CLOUDBUILD)
    (secret,) = config["availableSecrets"]["secretManager"]
    assert secret["versionName"].startswith("projects/$PROJECT_ID/secrets/")
    steps = config["steps"]
    (prune,) = [s for s in steps if "secateur submit" in " ".join(s.get("args", []))]
    assert secret["env"] in prune["secretEnv"]
    assert prune["name"].startswith("python:3.1")
    # The last step fails the build with the exit code recorded by the prune step.
    assert "secateur_exit_code" in " ".join(prune["args"])
    assert "exit $$(cat /workspace/secateur_exit_code)" in " ".join(steps[-1]["args"])
    # Every user substitution used has a default.
    used = set(re.findall(r"\$\{(_[A-Z0-9_]+)\}", yaml.safe_dump(config["steps"])))
    assert used <= set(config["substitutions"]), used - set(config["substitutions"])


def test_readme_documentsEveryExitCode() -> None:
    text = (CI / "README.md").read_text()
    for code in range(EXIT_CANCELLED + 1):
        assert re.search(rf"^\| `{code}` \|", text, re.M), f"exit code {code} not in the table"
    assert EXIT_GATE == 3 and "nothing published" in text


@pytest.mark.parametrize(
    "scripts", [github_scripts, cloudbuild_scripts], ids=["github-actions", "cloudbuild"]
)
def test_pipelines_install_the_client_distribution_only(scripts: Any) -> None:
    """secateur-client (packaging/client), never the full distribution and its TensorFlow."""
    installs = [
        shlex.split(line.strip())
        for script in scripts()
        for line in script.replace("\\\n", " ").splitlines()
        if re.search(r"pip install", line) and "--upgrade pip" not in line
    ]
    assert installs, "no pip install"
    for argv in installs:
        targets = [a for a in argv[argv.index("install") + 1 :] if not a.startswith("-")]
        assert targets == ["./packaging/client"], argv
