"""The model download cap (issue 18, item 7): counted while streaming, for local
paths and gs:// (the in-process GCS emulator), a typed error past it and no partial
copy left; on a real server a job over ``--max-model-bytes`` ends FAILED
RESOURCE_EXHAUSTED saying which flag."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from secateur.server.errors import status_of
from secateur.server.storage import DownloadTooLargeError, Storage
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .test_serve_hardening import Served

CAP = 4096


def _leftovers(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_localFileAndTree_overTheCap_typedError_noPartialCopy(tmp_path) -> None:
    src = tmp_path / "src"
    (src / "tree" / "variables").mkdir(parents=True)
    (src / "big.keras").write_bytes(b"x" * (CAP + 1))
    (src / "tree" / "saved_model.pb").write_bytes(b"y" * 3000)
    (src / "tree" / "variables" / "v").write_bytes(b"z" * 3000)  # 6000 in all
    (src / "small.keras").write_bytes(b"s" * CAP)
    storage = Storage(None, max_download_bytes=CAP)
    out = tmp_path / "out"
    for name in ("big.keras", "tree"):
        with pytest.raises(DownloadTooLargeError) as err:
            storage.download(str(src / name), str(out))
        assert "--max-model-bytes" in str(err.value) and str(CAP) in str(err.value)
        status = status_of(err.value)
        assert status is not None and status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _leftovers(out) == []  # no partial file, no temporary left
    assert os.path.getsize(storage.download(str(src / "small.keras"), str(out))) == CAP


def test_gcsObjectAndPrefix_overTheCap_typedError_noPartialCopy(
    tmp_path, gcs_client, gcs_bucket
) -> None:
    bucket = gcs_client.bucket(gcs_bucket)
    bucket.blob("big.keras").upload_from_string(b"x" * (CAP + 1))
    bucket.blob("tree/saved_model.pb").upload_from_string(b"y" * 3000)
    bucket.blob("tree/variables/v").upload_from_string(b"z" * 3000)
    bucket.blob("small.keras").upload_from_string(b"s" * CAP)
    storage = Storage(None, gcs_client=gcs_client, max_download_bytes=CAP)
    out = tmp_path / "out"
    for name in ("big.keras", "tree"):
        with pytest.raises(DownloadTooLargeError):
            storage.download(f"gs://{gcs_bucket}/{name}", str(out))
        assert _leftovers(out) == []
    got = storage.download(f"gs://{gcs_bucket}/small.keras", str(out))
    assert os.path.getsize(got) == CAP


@pytest.mark.slow  # ~22 s: a server and one job process
def test_jobOverMaxModelBytes_failsResourceExhausted_onARealServer(tmp_path) -> None:
    models = tmp_path / "state" / "models"
    models.mkdir(parents=True)
    (models / "m.keras").write_bytes(b"x" * (CAP + 1))
    s = Served(tmp_path, "--max-model-bytes", str(CAP))
    try:
        s.wait_serving()
        stub = pbg.PruningServiceStub(s.channel)
        spec = pb.JobSpec(
            model_uri=str(models / "m.keras"),
            output_uri=str(models / "out"),
            pruning=pb.PruningSpec(ratio=0.3),
        )
        job = stub.CreateJob(pb.CreateJobRequest(spec=spec), timeout=30)
        deadline = time.monotonic() + 180
        while job.state in (pb.Job.STATE_QUEUED, pb.Job.STATE_RUNNING):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
            job = stub.GetJob(pb.GetJobRequest(name=job.name), timeout=30)
        assert job.state == pb.Job.STATE_FAILED, job
        assert job.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], job.error
        assert "--max-model-bytes" in job.error.message
        work = tmp_path / "state" / "work"
        assert not any(f.endswith(".keras") for _, _, fs in os.walk(work) for f in fs)
    finally:
        s.close()
