"""Progress: heartbeat lines on a plain stream, never backwards, a bar on a terminal."""

from __future__ import annotations

import io
import re
import time

from secateur.cli.progress import ProgressDisplay, elapsed_text
from secateur.server.pipeline.job_request import (
    STAGES,
    StageEvent,
    overall_progress,
    sweep_progress,
)
from secateur.v1 import pruning_pb2 as pb

PERCENT = re.compile(r"^(\S+)\s+(\d+)%\s+(\d+:\d\d)")


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_plainStream_heartbeatWhileAStageIsSilent() -> None:
    out = io.StringIO()
    with ProgressDisplay(out, heartbeat_s=0.05) as bar:
        bar.update("MEASURING", 0.8, "round 1/3 original")
        time.sleep(0.4)
    lines = _lines(out)
    # One line for the change, then heartbeats repeating the state.
    assert len(lines) >= 4, lines
    for line in lines:
        stage, percent, _ = PERCENT.match(line).groups()  # type: ignore[union-attr]
        assert (stage, percent) == ("MEASURING", "80") and line.endswith("round 1/3 original")
    count = len(_lines(out))
    time.sleep(0.2)
    assert len(_lines(out)) == count  # closed: no more heartbeats


def test_plainStream_oneLinePerChange_stepsOnlyByHeartbeat() -> None:
    out = io.StringIO()
    bar = ProgressDisplay(out, heartbeat_s=3600)
    for step in range(1, 50):
        detail = {"epoch": 1, "epochs": 1, "step": step, "steps": 50, "loss": 1.0 / step}
        bar(
            StageEvent(
                "FINE_TUNING", "ratio 0.5", sweep_progress("FINE_TUNING", 0, 1, step / 50), detail
            )
        )
    bar(StageEvent("EVALUATING", "ratio 0.5", sweep_progress("EVALUATING", 0, 1)))
    bar.close()
    lines = _lines(out)
    assert len(lines) == 2, lines
    assert (
        lines[0].startswith("FINE_TUNING")
        and "ratio 0.5 epoch 1/1 step 1/50 loss 1.000" in lines[0]
    )
    assert lines[1].startswith("EVALUATING")


def test_overallProgress_neverGoesBackAcrossASweep() -> None:
    """The fractions a 3-ratio sweep reports, in pipeline order, only grow."""
    n, seen = 3, []
    seen += [overall_progress("FETCHING", 0.0), overall_progress("ANALYZING", 0.0)]
    for i in range(n):
        seen.append(overall_progress("SCORING", sweep_progress("SCORING", i, n)))
        seen.append(overall_progress("REBUILDING", sweep_progress("REBUILDING", i, n)))
        for frac in (0.0, 0.5, 1.0):
            seen.append(overall_progress("FINE_TUNING", sweep_progress("FINE_TUNING", i, n, frac)))
        seen.append(overall_progress("EVALUATING", sweep_progress("EVALUATING", i, n)))
    seen += [overall_progress("MEASURING", f) for f in (0.0, 0.5, 1.0)]
    seen.append(overall_progress("EXPORTING", 0.0))
    assert seen == sorted(seen)
    assert seen[-1] == STAGES.index("EXPORTING") / len(STAGES)


def test_display_clampsToMonotone_whateverItIsFed() -> None:
    out = io.StringIO()
    bar = ProgressDisplay(out, heartbeat_s=3600)
    for stage, progress in [("SCORING", 0.5), ("REBUILDING", 0.3), ("EVALUATING", 0.9), ("x", -1)]:
        bar.job(pb.Job(state=pb.Job.STATE_RUNNING, stage=pb.Job.STAGE_SCORING, progress=progress,
                       message=f"{stage.lower()}: ratio 0.5"))  # fmt: skip
        bar.update(stage, progress)
    bar.close()
    percents = [int(PERCENT.match(line).group(2)) for line in _lines(out)]  # type: ignore[union-attr]
    assert percents == sorted(percents) and percents[-1] == 90


def test_terminal_drawsARichBar() -> None:
    out = io.StringIO()
    with ProgressDisplay(out, tty=True) as bar:
        bar.update("FINE_TUNING", 0.5, "ratio 0.3")
    text = out.getvalue()
    assert "FINE_TUNING" in text and "50%" in text and "ratio 0.3" in text and "━" in text


def test_elapsedText() -> None:
    assert [elapsed_text(s) for s in (0, 59.9, 61, 3600 + 62)] == [
        "0:00",
        "0:59",
        "1:01",
        "1:01:02",
    ]
