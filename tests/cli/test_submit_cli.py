"""`secateur submit/status/watch/cancel/list` against the fake server: output and exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from secateur import cli
from secateur.cli.main import main
from secateur.cli.outcome import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_GATE,
    EXIT_INTERNAL,
    EXIT_OK,
)
from secateur.cli.parser import build_parser
from secateur.cli.remote import server_address
from secateur.v1 import pruning_pb2
from tests.client.fake_server import FakePruningService, FakeServer

Job = pruning_pb2.Job


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    monkeypatch.delenv("SECATEUR_TOKEN", raising=False)
    with FakeServer() as s:
        monkeypatch.setenv("SECATEUR_SERVER", s.target)  # --server's default
        yield s


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def submit(capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    return run(capsys, "submit", "/m/model.keras", "/served", "--ratio", "0.3", *extra)


def test_submit_noWait_printsTheJobName(server: FakeServer, capsys) -> None:
    code, out, _ = submit(capsys, "--criterion", "l2", "--no-reload", "--epochs", "2")
    assert code == EXIT_OK and out.strip() == "jobs/job0001"
    spec = server.service.job("jobs/job0001").spec
    assert spec.pruning.criterion == pruning_pb2.CRITERION_L2
    assert spec.pruning.HasField("reload_weights") and not spec.pruning.reload_weights
    assert spec.training.epochs == 2 and spec.model_uri == "/m/model.keras"


def test_submit_explicitServer_and_specFile(server: FakeServer, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SECATEUR_SERVER", "127.0.0.1:1")  # --server wins
    spec = tmp_path / "spec.yaml"
    spec.write_text("ratios: [0.2, 0.4]\nmax_accuracy_drop: 0.02\nversion: 3\n")
    code, out, _ = run(
        capsys, "submit", "/m", "/o", "--server", server.target, "--spec", spec, "--seed", "5"
    )
    assert code == EXIT_OK
    job = server.service.job(out.strip())
    assert list(job.spec.pruning.ratios) == [0.2, 0.4] and job.spec.version == 3
    assert job.spec.max_accuracy_drop == 0.02 and job.spec.pruning.seed == 5


def test_submit_wait_success_printsTableAndWritesReport(server, capsys, tmp_path) -> None:
    report = tmp_path / "report.json"
    code, out, err = submit(capsys, "--wait", "--report", report)
    assert code == EXIT_OK, err
    assert "peak train memory" in out and "pruned 0.3" in out
    assert "published: /served/1" in out and "decision: single ratio" in out
    assert "submitted jobs/job0001" in err and "FINE_TUNING" in err and "SUCCEEDED" in err
    data = json.loads(report.read_text())
    assert data["output_uri"] == "/served/1" and data["original"]["params"] == 1_000_000
    assert data["candidates"][0]["figures"]["accuracy"] == pytest.approx(0.92)


def test_submit_wait_gateFailed_exit3(server: FakeServer, capsys, tmp_path) -> None:
    server.service.outcome = "gate"
    report = tmp_path / "r.json"
    code, out, err = submit(capsys, "--max-accuracy-drop", "0", "--wait", "--report", report)
    assert code == EXIT_GATE
    assert "pruned 0.3" in out and "published:" not in out  # the figures are still shown
    assert "accuracy gate failed: no candidate within" in err
    assert json.loads(report.read_text())["output_uri"] is None


def test_submit_badSpec_exit2_withTheViolation(server: FakeServer, capsys) -> None:
    code, out, err = run(capsys, "submit", "/m", "/o", "--ratio", "1.5", "--wait")
    assert code == EXIT_BAD_INPUT and out == ""
    assert "INVALID_ARGUMENT: invalid job spec" in err
    assert "spec.pruning.ratio: ratio must be in [0, 1). Received: ratio=1.5" in err
    assert server.service.count("CreateJob") == 1


def test_submit_localBadInput_exit2_beforeAnyCall(server: FakeServer, capsys, tmp_path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("ratoi: 0.4\n")
    code, _, err = submit(capsys, "--spec", spec)
    assert code == EXIT_BAD_INPUT and "ratoi" in err
    code, _, err = submit(capsys, "--client-cert", tmp_path / "c.pem")
    assert code == EXIT_BAD_INPUT and "--client-key" in err
    code, _, err = submit(capsys, "--token-file", tmp_path / "missing")
    assert code == EXIT_BAD_INPUT and "token file" in err
    assert server.service.calls == []


def test_submit_wait_jobFailsOnBadInput_exit2(server: FakeServer, capsys) -> None:
    server.service.outcome = "bad_input"
    code, out, err = submit(capsys, "--wait")
    assert code == EXIT_BAD_INPUT
    assert "jobs/job0001  FAILED" in out  # no figures: the summary line
    assert "failed: INVALID_ARGUMENT: data does not fit the model" in err
    assert "spec.training.eval_data: labels go up to 11" in err


def test_submit_wait_internalFailure_exit1(server: FakeServer, capsys) -> None:
    server.service.outcome = "internal"
    code, _, err = submit(capsys, "--wait")
    assert code == EXIT_INTERNAL and "INTERNAL: worker crashed" in err


def test_submit_wait_cancelled_exit4(server: FakeServer, capsys) -> None:
    server.service.outcome = "cancelled"
    code, _, err = submit(capsys, "--wait")
    assert code == EXIT_CANCELLED and "was cancelled; nothing was published" in err


def test_submit_serverUnavailable_exit1_afterRetries(server: FakeServer, capsys) -> None:
    server.service.fail_next(5)
    code, out, err = submit(capsys, "--retries", "1")
    assert code == EXIT_INTERNAL and out == ""
    assert f"server {server.target} unavailable after 2 attempt(s)" in err
    assert server.service.count("CreateJob") == 2


def test_submit_nothingListening_exit1(capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = submit(capsys, "--server", f"127.0.0.1:{port}", "--retries", "0")
    assert code == EXIT_INTERNAL and "unavailable after 1 attempt(s)" in err


def test_submit_token(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("SECATEUR_TOKEN", raising=False)
    with FakeServer(FakePruningService(token="t0k")) as server:
        monkeypatch.setenv("SECATEUR_SERVER", server.target)
        code, _, err = submit(capsys)
        assert code == EXIT_BAD_INPUT and "UNAUTHENTICATED" in err
        token = tmp_path / "token"
        token.write_text("t0k\n")
        code, out, _ = submit(capsys, "--token-file", token)
        assert code == EXIT_OK and out.startswith("jobs/")
        monkeypatch.setenv("SECATEUR_TOKEN", "t0k")
        assert submit(capsys)[0] == EXIT_OK
        assert server.service.calls[-1][2]["authorization"] == "Bearer t0k"


def test_submit_requestId_isIdempotent_andValidateOnlyCreatesNothing(server, capsys) -> None:
    first = submit(capsys, "--request-id", "ci-run-42")[1]
    again = submit(capsys, "--request-id", "ci-run-42")[1]
    assert first == again == "jobs/job0001\n"
    code, out, _ = submit(capsys, "--validate-only")
    assert code == EXIT_OK and out.startswith("valid:")
    assert server.service.calls[-1][1].validate_only
    assert [j for j in server.service._order] == ["jobs/job0001"]


@pytest.mark.parametrize("cancel", [False, True])
def test_submit_wait_interrupted(server: FakeServer, capsys, monkeypatch, cancel) -> None:
    def interrupted(self, name, on_update=None):
        raise KeyboardInterrupt

    monkeypatch.setattr("secateur.client.client.PruningClient.wait", interrupted)
    code, _, err = submit(capsys, "--wait", *(["--cancel-on-interrupt"] if cancel else []))
    assert code == EXIT_CANCELLED
    state = server.service.job("jobs/job0001").state
    if cancel:
        assert state == Job.STATE_CANCELLED and "cancelled jobs/job0001" in err
    else:
        assert state == Job.STATE_QUEUED and "secateur cancel jobs/job0001" in err


def test_status_runningThenFinished(server: FakeServer, capsys, tmp_path) -> None:
    submit(capsys)
    code, out, _ = run(capsys, "status", "job0001")  # the id alone is enough
    assert code == EXIT_OK and out.startswith("jobs/job0001  RUNNING  FETCHING  0%  /m/model.keras")
    for _ in range(8):
        run(capsys, "status", "jobs/job0001")
    report = tmp_path / "r.json"
    code, out, _ = run(capsys, "status", "jobs/job0001", "--report", report)
    assert code == EXIT_OK
    assert "SUCCEEDED" in out.splitlines()[0] and "peak train memory" in out
    assert json.loads(report.read_text())["state"] == "SUCCEEDED"


def test_status_exitCodeFollowsTheJob(server: FakeServer, capsys) -> None:
    server.service.outcome = "gate"
    submit(capsys, "--wait")
    code, _, err = run(capsys, "status", "job0001")
    assert code == EXIT_GATE and "accuracy gate failed" in err
    code, _, err = run(capsys, "status", "jobs/unknown")
    assert code == EXIT_BAD_INPUT and "NOT_FOUND" in err


def test_watch_followsToTheEnd(server: FakeServer, capsys) -> None:
    server.service.outcome_by_model["/m/bad.keras"] = "internal"
    submit(capsys)
    code, out, err = run(capsys, "watch", "job0001")
    assert code == EXIT_OK and "pruned 0.3" in out and "EXPORTING" in err
    run(capsys, "submit", "/m/bad.keras", "/o", "--ratio", "0.3")
    code, _, err = run(capsys, "watch", "jobs/job0002")
    assert code == EXIT_INTERNAL and "worker crashed" in err


def test_cancel_printsTheNewState(server: FakeServer, capsys) -> None:
    server.service.outcome = "hang"
    submit(capsys)
    code, out, _ = run(capsys, "cancel", "job0001")
    assert code == EXIT_OK and out.strip() == "jobs/job0001 CANCELLED"
    code, out, err = run(capsys, "watch", "job0001")
    assert code == EXIT_CANCELLED and "was cancelled" in err
    server.service.outcome = "succeeded"
    submit(capsys, "--wait")
    code, out, _ = run(capsys, "cancel", "jobs/job0002")
    assert code == EXIT_OK and out.strip() == "jobs/job0002 SUCCEEDED (had ended)"


def test_list_table_stateFilter_andLimit(server: FakeServer, capsys) -> None:
    for _ in range(3):
        submit(capsys)
    run(capsys, "cancel", "job0002")
    run(capsys, "status", "job0003")  # now RUNNING
    code, out, _ = run(capsys, "list")
    lines = out.splitlines()
    assert code == EXIT_OK and lines[0].split() == [
        "NAME",
        "STATE",
        "STAGE",
        "PROGRESS",
        "MODEL",
        "CREATED",
    ]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["jobs/job0003", "RUNNING", "FETCHING"],
        ["jobs/job0002", "CANCELLED", "-"],
        ["jobs/job0001", "QUEUED", "-"],
    ]
    assert "/m/model.keras" in lines[1] and lines[1].split()[-2][:2] == "20"  # a date
    code, out, _ = run(capsys, "list", "--state", "cancelled")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["jobs/job0002"]
    code, out, _ = run(capsys, "list", "--limit", "2")
    assert len(out.splitlines()) == 3 and server.service.calls[-1][1].page_size == 2


def test_help_documentsExitCodes(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["submit", "--help"])
    out = capsys.readouterr().out
    assert "3 accuracy gate failed" in out and "--server" in out and "--wait" in out
    assert "SECATEUR_SERVER" in cli.__doc__


def test_defaultServer(monkeypatch) -> None:
    monkeypatch.delenv("SECATEUR_SERVER", raising=False)
    args = build_parser().parse_args(["list"])
    assert server_address(args) == "localhost:50051"


@pytest.mark.parametrize("outcome,expected", [("succeeded", EXIT_OK), ("gate", EXIT_GATE)])
def test_submit_asASubprocess(server: FakeServer, tmp_path, outcome, expected) -> None:
    server.service.outcome = outcome
    report = tmp_path / "report.json"
    env = os.environ | {"SECATEUR_SERVER": "127.0.0.1:1"}  # --server given: this is unused
    args = ["--ratio", "0.3", "--server", server.target, "--wait", "--report", str(report)]
    proc = subprocess.run(
        [sys.executable, "-m", "secateur.cli", "submit", "/m/model.keras", "/served", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == expected, proc.stderr
    assert "top-1 accuracy" in proc.stdout and "Traceback" not in proc.stderr
    assert json.loads(report.read_text())["job"] == "jobs/job0001"
