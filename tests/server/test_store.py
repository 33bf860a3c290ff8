"""The SQLite job store: records in, records out, across reopening and older databases."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import grpc

from secateur.server.jobstore.jobs_pb import to_pb
from secateur.server.jobstore.records import JobError, JobRecord, JobState, now_ns
from secateur.server.jobstore.sqlite import SqliteJobStore
from secateur.server.pipeline import convert
from secateur.v1 import pruning_pb2 as pb

# The jobs table as servers before issue 9 created it (no report column).
OLD_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    state INTEGER NOT NULL,
    create_time REAL NOT NULL,
    data BLOB NOT NULL
);
"""
REPORT = {
    "output_uri": "/served/1",
    "decision": "single ratio, no accuracy gate: published",
    "original": {"params": 1000, "weight_bytes": 4000, "flops": 9000, "accuracy": 0.9,
                 "how": {"device": "CPU"}},
    "pruned": {"params": 500, "weight_bytes": 2000, "flops": 4000, "accuracy": 0.89,
               "how": {"device": "CPU"}},
    "plan": {"spec": {"ratio": 0.3}, "groups": []},
    "selected_ratio": 0.3,
    "candidates": [{"ratio": 0.3, "figures": {"params": 500, "how": {}}, "accuracy_drop": 0.01,
                    "plan": {"spec": {"ratio": 0.3}}}],
    "curves": [[0.3, 0.01]],  # not in the contract: kept by the store all the same
}  # fmt: skip


def _record(job_id: str, **changes: object) -> JobRecord:
    spec = pb.JobSpec(model_uri="/m.keras", output_uri="/served")
    fields: dict[str, object] = {
        "id": job_id,
        "spec": spec.SerializeToString(),
        "state": JobState.QUEUED,
        "create_ns": now_ns(),
    }
    return JobRecord(**(fields | changes))  # type: ignore[arg-type]


def test_records_roundTripThroughReopening(tmp_path: Path) -> None:
    store = SqliteJobStore(str(tmp_path))
    done = _record(
        "done",
        state=JobState.SUCCEEDED,
        request_id="r1",
        result=REPORT,
        attempts=1,
        start_ns=now_ns(),
        end_ns=now_ns(),
    )
    failed = _record(
        "failed",
        state=JobState.FAILED,
        error=JobError(grpc.StatusCode.INVALID_ARGUMENT, "bad", (("spec.model_uri", "bad"),)),
    )
    running = _record("running", state=JobState.RUNNING, stage="SCORING", progress=0.3)
    for record in (done, failed, running):
        store.insert(record)
    store.close()
    reopened = SqliteJobStore(str(tmp_path))
    assert reopened.get("done") == done and reopened.get("failed") == failed
    assert reopened.get("running") == running and reopened.by_request_id("r1") == done
    assert [r.id for r in reopened.all()] == ["done", "failed", "running"]
    page, more = reopened.page(JobState.FAILED, None, 10)
    assert page == [failed] and more is None
    reopened.close()


def test_databaseFromBeforeReports_isMigrated_andItsJobsReadTheSame(tmp_path: Path) -> None:
    job = pb.Job(name="jobs/old", state=pb.Job.STATE_SUCCEEDED, request_id="r-old", attempts=1)
    job.spec.model_uri, job.spec.output_uri = "/m.keras", "/served"
    job.result.CopyFrom(convert.job_result(REPORT))
    job.create_time.GetCurrentTime()
    with closing(sqlite3.connect(tmp_path / "jobs.sqlite")) as db:
        db.executescript(OLD_SCHEMA)
        db.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?)",
            ("old", "r-old", job.state, job.create_time.ToNanoseconds() / 1e9,
             job.SerializeToString()),
        )  # fmt: skip
        db.commit()
    store = SqliteJobStore(str(tmp_path))
    record = store.get("old")
    assert record is not None and record.state == JobState.SUCCEEDED
    assert to_pb(record) == job  # what GetJob answered before, it answers now
    store.save(record.evolve(message="touched"))  # writes the new column
    store.close()
    with closing(sqlite3.connect(tmp_path / "jobs.sqlite")) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
        added = db.execute("SELECT cancel_requested, publish_uri FROM jobs WHERE id = 'old'")
        assert added.fetchall() == [(0, "")]  # no cancel pending, no version fenced
    # tenant: issue 18, the old jobs' is ""; the exactly-once columns (issue 18 items 1-3)
    assert columns[-4:] == ["report", "tenant", "cancel_requested", "publish_uri"]
    assert record.tenant == ""
