"""Bad data past the first records ends the job as bad input, naming the file and the
record, with nothing published: in the library, in a server job, and from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tensorflow as tf
from google.rpc import error_details_pb2

from secateur.pruner import PruneSpec
from secateur.pruner.errors import DataError
from secateur.pruner.finetune import TrainConfig
from secateur.pruner.measure import MeasureConfig
from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.server.pipeline.job_request import JobRequest
from secateur.server.pipeline.prune_job import PruneJob
from secateur.server.storage import Storage
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

BAD = 281  # well past any sample of the first records


@pytest.fixture(scope="module")
def bad_data(digits_data, tmp_path_factory) -> dict[str, str]:
    """``label``: train-0 with label 99 at record 281; ``truncated``: eval cut mid-record."""
    root = tmp_path_factory.mktemp("bad-data")
    label = str(root / "bad-label.tfrecord")
    with tf.io.TFRecordWriter(label) as writer:
        for i, raw in enumerate(
            tf.data.TFRecordDataset(str(digits_data.root / "train-0.tfrecord"))
        ):
            example = tf.train.Example.FromString(raw.numpy())
            if i == BAD:
                example.features.feature["label"].int64_list.value[:] = [99]
            writer.write(example.SerializeToString())
    data = Path(digits_data.eval_file).read_bytes()
    truncated = root / "truncated.tfrecord"
    truncated.write_bytes(data[: len(data) * 6 // 10 + 7])  # 7: never on a record boundary
    return {"label": label, "truncated": str(truncated), "root": str(root)}


def _request(data, out, **kw) -> JobRequest:
    defaults = dict(
        model_uri=data.model_path,
        output_uri=str(out),
        spec=PruneSpec(ratio=0.3),
        train=TrainConfig(epochs=1, batch_size=64),
        train_data=data.train_glob,
        eval_data=data.eval_file,
        measure=MeasureConfig(warmup_steps=1, steps=1, rounds=1, latency_runs=1),
    )
    return JobRequest(**(defaults | kw))


@pytest.mark.parametrize(
    "field,which,record", [("train_data", "label", BAD), ("eval_data", "truncated", None)]
)
def test_job_badDataPastTheFirstRecords_dataErrorNothingPublished(
    digits_data, bad_data, tmp_path, field, which, record
) -> None:
    out = tmp_path / "out"
    req = _request(digits_data, out, **{field: bad_data[which]})
    with pytest.raises(DataError) as info:
        PruneJob(req, Storage()).run()
    err = info.value
    assert err.file == bad_data[which] and err.field == field
    if record is not None:
        assert err.record == record and f"record {record} of {bad_data[which]}" in str(err)
    else:
        assert err.record is not None and "truncated" in str(err)
    assert "secateur-job-" not in str(err)  # the user's path, not the local copy
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture(scope="module")
def server(digits_data, bad_data, tmp_path_factory) -> Iterator[tuple[BackgroundServer, Path]]:
    """A real server on loopback, and the output root it may write under."""
    root = tmp_path_factory.mktemp("data-errors-server")
    opts = ServerOptions(
        state_dir=str(root / "state"),
        port=0,
        allowed_prefixes=(str(digits_data.root), bad_data["root"], str(root / "out")),
    )
    with BackgroundServer(opts) as s:
        yield s, root / "out"


def test_serverJob_badLabelAtRecord281_failsInvalidArgumentNamingFileAndRecord(
    server, digits_data, bad_data
) -> None:
    running, out_root = server
    stub = pbg.PruningServiceStub(grpc.insecure_channel(running.target))
    out = out_root / "label"
    spec = pb.JobSpec(
        model_uri=digits_data.model_path,
        output_uri=str(out),
        pruning=pb.PruningSpec(ratio=0.3),
        training=pb.TrainingSpec(
            epochs=1, batch_size=64, train_data=bad_data["label"], measure_steps=1
        ),
    )
    job = stub.CreateJob(pb.CreateJobRequest(spec=spec))
    deadline = time.time() + 240
    while job.state not in (pb.Job.STATE_SUCCEEDED, pb.Job.STATE_FAILED, pb.Job.STATE_CANCELLED):
        assert time.time() < deadline, pb.Job.State.Name(job.state)
        time.sleep(0.3)
        job = stub.GetJob(pb.GetJobRequest(name=job.name))
    assert job.state == pb.Job.STATE_FAILED, pb.Job.State.Name(job.state)
    assert job.error.code == 3, job.error.message  # INVALID_ARGUMENT
    assert f"record {BAD} of {bad_data['label']}" in job.error.message
    assert "server log" not in job.error.message
    (detail,) = job.error.details  # the JobSpec path of the bad field, not the library's name
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["spec.training.train_data"]
    assert not out.exists() or not any(out.iterdir())


def test_cli_badLabelAtRecord281_exit2_noTraceback_nothingPublished(
    digits_data, bad_data, tmp_path
) -> None:
    from secateur.cli.outcome import EXIT_BAD_INPUT

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "secateur.cli", "prune", digits_data.model_path, str(out),
         "--ratio", "0.3", "--epochs", "1", "--batch-size", "64",
         "--train-data", bad_data["label"], "--measure-steps", "1"],
        capture_output=True, text=True, timeout=300,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert f"record {BAD} of {bad_data['label']}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
