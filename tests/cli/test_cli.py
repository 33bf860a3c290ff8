"""`secateur prune` as a user runs it: real subprocesses, real files, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from secateur.cli.options import job_spec, merged_options
from secateur.cli.outcome import EXIT_BAD_INPUT, EXIT_GATE, EXIT_OK
from secateur.cli.parser import build_parser

SECATEUR = [sys.executable, "-m", "secateur.cli"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [*SECATEUR, *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


def test_cli_sweepWithBudget_publishesAndWritesReportAndCurves(digits_data, tmp_path) -> None:
    out, report = tmp_path / "served", tmp_path / "report.json"
    proc = _run(
        "prune", digits_data.model_path, out, "--ratios", "0.2,0.5", "--criterion", "l1",
        "--scope", "layerwise", "--round-to", "2", "--epochs", "1", "--batch-size", "64",
        "--learning-rate", "0.01", "--train-data", digits_data.train_glob,
        "--eval-data", digits_data.eval_file, "--max-accuracy-drop", "1.0",
        "--measure-steps", "2", "--report", report,
    )  # fmt: skip
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "FINE_TUNING" in proc.stderr and "EXPORTING" in proc.stderr  # progress
    assert "MEASURING" in proc.stderr
    percents = [int(p) for p in re.findall(r"^[A-Z_]+\s+(\d+)%", proc.stderr, re.M)]
    assert len(percents) > 5 and percents == sorted(percents)  # never back across the sweep
    for noise in ("ran out of data", "shuffle=True", "cuInit", "I0000", "absl::"):
        assert noise not in proc.stderr, proc.stderr
    assert "peak train memory" in proc.stdout and "pruned 0.5" in proc.stdout  # the table
    data = json.loads(report.read_text())
    assert data["output_uri"] == str(out / "1") and data["selected_ratio"] == 0.5
    for section in ("original", "pruned"):
        for key in (
            "params",
            "weight_bytes",
            "flops",
            "peak_memory_bytes",
            "train_step_seconds",
            "train_step_p10_seconds",
            "accuracy",
        ):
            assert data[section][key] is not None, (section, key)
    assert data["plan"]["spec"]["round_to"] == 2 and data["plan"]["spec"]["ratio"] == 0.5
    assert (tmp_path / "report.csv").exists() and (tmp_path / "report.png").exists()
    assert (out / "1" / "saved_model.pb").exists()


def test_cli_corruptModel_exit2_nothingWritten(tmp_path) -> None:
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a model")
    proc = _run("prune", bad, tmp_path / "out", "--ratio", "0.3")
    assert proc.returncode == EXIT_BAD_INPUT
    assert "corrupt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_gateFails_exit3(digits_data, tmp_path) -> None:
    proc = _run(
        "prune", digits_data.model_path, tmp_path / "out", "--ratio", "0.9", "--epochs", "0",
        "--eval-data", digits_data.eval_file, "--max-accuracy-drop", "0", "--measure-steps", "1",
    )  # fmt: skip
    assert proc.returncode == EXIT_GATE, proc.stderr
    assert "accuracy gate failed" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--ratio", "1.5"], "ratio must be in [0, 1). Received: ratio=1.5"),
        (["--round-to", "0"], "round_to=0"),
        (["--max-accuracy-drop", "0.1"], "eval_data"),
    ],
)
def test_cli_invalidSpec_exit2_withTheReason(tmp_path, args, match) -> None:
    proc = _run("prune", tmp_path / "m.keras", tmp_path / "out", *args)
    assert proc.returncode == EXIT_BAD_INPUT
    assert match in proc.stderr


def test_cli_specFile_flagsOverrideIt(tmp_path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("ratio: 0.4\ncriterion: l2\nexclude: [conv1]\nepochs: 3\nratios: '0.1,0.2'\n")
    args = build_parser().parse_args(["prune", "m", "o", "--spec", str(spec), "--criterion", "l1"])
    opts = merged_options(args)
    assert opts["ratio"] == 0.4 and opts["criterion"] == "l1" and opts["exclude"] == ["conv1"]
    assert opts["epochs"] == 3
    spec_msg = job_spec(args)  # the file's '0.1,0.2' is read like the --ratios flag
    assert list(spec_msg.pruning.ratios) == [0.1, 0.2] and spec_msg.training.epochs == 3
    spec.write_text("ratoi: 0.4\n")
    with pytest.raises(ValueError, match="ratoi"):
        merged_options(args)


def test_cli_helpAndImport_doNotLoadTensorflow() -> None:
    code = (
        "import sys, secateur.client, secateur.cli.parser as c\n"
        "c.build_parser().format_help()\n"
        "heavy = {'tensorflow', 'keras'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
