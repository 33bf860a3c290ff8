"""`secateur plan` here and against a real server on loopback; --version; flag defaults in help."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secateur.cli.main import main
from secateur.cli.outcome import EXIT_BAD_INPUT, EXIT_OK
from secateur.cli.parser import build_parser, package_version


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained narrow VGG-16-BN: a plan needs weights, not accuracy."""
    from secateur.pruner.models import vgg16_bn

    path = tmp_path_factory.mktemp("plan") / "tiny.keras"
    vgg16_bn((32, 32, 3), 10, width=0.0625, dense=16, name="tiny").save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def server(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from secateur.server.api.service import BackgroundServer, ServerOptions

    opts = ServerOptions(
        state_dir=str(tmp_path_factory.mktemp("state")),
        port=0,
        allowed_prefixes=(str(Path(tiny_model).parent),),
    )
    with BackgroundServer(opts) as s:
        yield s


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_local_printsGroupsTotalsAndFrozenReasons(tiny_model, capsys) -> None:
    code, out, err = _run(capsys, "plan", tiny_model, "--ratio", "0.5", "--round-to", "2")
    assert code == EXIT_OK, err
    lines = out.splitlines()
    assert lines[0] == "plan for tiny: ratio 0.5, criterion bn_scale, scope global, round to 2"
    assert lines[3].split() == ["0", "input:image", "3/3", "frozen"]
    assert lines[4].split() == ["1", "block1_conv1", "2/4", "bn_scale"]
    assert "channels kept: 132 of 264 prunable in 13 of 16 groups" in lines
    assert "params: 58.7K -> 15.1K (0.26x)" in lines
    assert lines[-4:] == [
        "prunable: 95% of channels",
        "frozen: touches model output (10 channels, 1 group)",
        "frozen: touches model input (3 channels, 1 group)",
        "frozen: a single channel (1 channel, 1 group)",
    ]


def test_plan_json_isThePlanAsData_sameHereAndOnTheServer(tiny_model, server, capsys) -> None:
    code, out, err = _run(
        capsys, "plan", tiny_model, "--ratio", "0.4", "--criterion", "l1", "--json"
    )
    assert code == EXIT_OK, err
    local = json.loads(out)
    assert local["spec"]["ratio"] == 0.4 and local["spec"]["criterion"] == "l1"
    assert local["params_after"] < local["params_before"]
    args = ("plan", tiny_model, "--ratio", "0.4", "--criterion", "l1", "--json")
    code, out, err = _run(capsys, *args, "--server", server.target)
    assert code == EXIT_OK, err
    remote = json.loads(out)
    assert remote == local
    # PlanPruning's plan carries the report: share of prunable channels, reasons for the rest.
    assert 0.9 < remote["prunable_share"] < 1
    assert {r["reason"] for r in remote["frozen_reasons"]} >= {"touches model input"}


def test_plan_server_table_andItsErrors(tiny_model, server, capsys) -> None:
    code, out, err = _run(capsys, "plan", tiny_model, "--ratio", "0.5", "--server", server.target)
    assert code == EXIT_OK, err
    assert "channels kept: 132 of 264 prunable in 13 of 16 groups" in out.splitlines()
    code, _, err = _run(capsys, "plan", "/nowhere/m.keras", "--server", server.target)
    assert code == EXIT_BAD_INPUT and "PERMISSION_DENIED" in err
    code, _, err = _run(capsys, "plan", tiny_model, "--ratio", "1.5", "--server", server.target)
    assert code == EXIT_BAD_INPUT and "ratio" in err


def test_plan_local_badInput_exit2_withTheReason(tiny_model, tmp_path, capsys) -> None:
    code, _, err = _run(capsys, "plan", str(tmp_path / "nope.keras"))
    assert code == EXIT_BAD_INPUT and f"Received: {tmp_path / 'nope.keras'}" in err
    code, _, err = _run(capsys, "plan", tiny_model, "--ratio", "1.5")
    assert code == EXIT_BAD_INPUT and "ratio must be in [0, 1). Received: ratio=1.5" in err


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"secateur {package_version()}"
    proc = subprocess.run(
        [sys.executable, "-m", "secateur.cli", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("secateur ")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_help_everyFlagShowsItsDefault() -> None:
    parser = build_parser()
    commands = _subparsers(parser)
    assert "plan" in commands
    for name, sub in commands.items():
        if name == "serve":  # the server's own parser (secateur serve --help)
            continue
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"secateur {name} {action.option_strings[0]} has no help"
            text = formatter._get_help_string(action) or ""  # type: ignore[attr-defined]
            assert "default" in text, f"secateur {name} {action.option_strings[0]}: {text!r}"
    help_text = " ".join(commands["demo"].format_help().split())
    assert "(default: 0.3,0.5,0.7)" in help_text and "(default: 4)" in help_text
    assert "--wait" in commands["submit"].format_help()
    assert "(default: off)" in commands["submit"].format_help()
