"""Issue 18, item 2: publishing to gs:// leaves no half version (the real GCS emulator);
local versions are recognised as their job's the same way.

A version is committed by copying its blobs with the job's publication marker first
and ``saved_model.pb`` last (the commit point: TF Serving skips a version dir
without it). A publish killed in between (a real process, SIGKILL at the hold
point ``before_pb``, server/holds.py) leaves a version readers skip, which the
job's next attempt recognises by its marker and rolls back; a 412 on an object
of our own (a copy retried after its response was lost) is success when the
content matches, and never so on another job's object (the emulator's copy is
made to answer 412 as GCS does: it ignores preconditions, see gcs_preconditions).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secateur.server.holds import HOLD_ENV
from secateur.server.pipeline.publish import own_version, publish_version, write_marker
from secateur.server.storage import Storage, StorageExistsError
from secateur.server.storage.backend import PUBLICATION_MARKER
from secateur.server.storage.gcs import GcsBackend
from secateur.server.storage.location import Location

PUBLISH = (
    "import sys\n"
    "from secateur.server.storage import Storage\n"
    "from secateur.server.pipeline.publish import publish_version\n"
    "print(publish_version(Storage(), sys.argv[1], sys.argv[2], None, job_id=sys.argv[3]))\n"
)


@pytest.fixture
def gcs_preconditions(gcs_emulator: str) -> Iterator[None]:
    """The emulator's copy honours ``ifGenerationMatch=0`` as GCS does (412 when the
    destination exists): gcp-storage-emulator ignores preconditions, so without this
    every copy would overwrite and no 412 could be seen."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    table = next(h for _, h in server.HANDLERS if objects.copy in h.values())
    method = next(m for m, handler in table.items() if handler is objects.copy)

    def copy(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        if request.query.get("ifGenerationMatch") == ["0"]:
            params = request.params
            try:
                storage.get_file_obj(params["dest_bucket_name"], params["dest_object_id"])
            except NotFound:
                pass
            else:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        return objects.copy(request, response, storage, *args, **kwargs)

    table[method] = copy
    try:
        yield
    finally:
        table[method] = objects.copy


def _version_dir(root: Path, graph: bytes = b"graph") -> str:
    """A version as a job exports it (a stand-in SavedModel and the job's report)."""
    version = root / "version"
    (version / "variables").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(graph)
    (version / "variables" / "variables.index").write_bytes(b"index")
    (version / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(4096))
    (version / "assets.extra" / "secateur").mkdir(parents=True)
    report = {"decision": "published", "pruned": {"params": 7}}
    (version / "assets.extra" / "secateur" / "report.json").write_text(json.dumps(report))
    return str(version)


def _blobs(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    """``{name under prefix: generation}`` of the bucket's blobs."""
    return {b.name[len(prefix) :]: b.generation for b in client.list_blobs(bucket, prefix=prefix)}


def test_publishKilledBeforeSavedModelPb_nextAttemptRollsBackItsHalfVersion_publishesOnce(
    gcs_bucket: str, gcs_client: Any, tmp_path: Path
) -> None:
    local, base = _version_dir(tmp_path), f"gs://{gcs_bucket}/out"
    holds = tmp_path / "holds"
    holds.mkdir()
    (holds / "before_pb").touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISH, local, base, "job-a"],
        env=os.environ | {HOLD_ENV: str(holds)},
    )
    try:
        deadline = time.monotonic() + 60
        while not (holds / "before_pb.reached").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no publish reached the pb"
            time.sleep(0.05)
    finally:
        proc.kill()  # killed between the marker and saved_model.pb
        proc.wait()
    half = _blobs(gcs_client, gcs_bucket, "out/1/")
    assert PUBLICATION_MARKER in half and "variables/variables.index" in half
    assert "saved_model.pb" not in half  # no reader takes it for a version
    storage = Storage()
    assert own_version(storage, f"{base}/1", "job-b") is None  # not job-b's: left alone
    assert _blobs(gcs_client, gcs_bucket, "out/1/") == half
    assert own_version(storage, f"{base}/1", "job-a") is None  # job-a's half version...
    assert _blobs(gcs_client, gcs_bucket, "out/1/") == {}  # ...rolled back
    uri = publish_version(storage, local, base, None, job_id="job-a")  # the next attempt
    assert uri == f"{base}/1"
    assert {PUBLICATION_MARKER, "saved_model.pb"} <= set(_blobs(gcs_client, gcs_bucket, "out/1/"))
    report = own_version(storage, uri, "job-a")  # and an attempt after it: recognised, kept
    assert report is not None and (report["output_uri"], report["pruned"]) == (uri, {"params": 7})
    assert storage.list_versions(base) == [1]


def _committed(backend: GcsBackend, local: str, final: Location) -> Any:
    staging = backend.begin(_base(final))
    backend.stage(local, staging)
    backend.commit(staging, final)
    return staging


def _base(final: Location) -> Location:
    return Location.parse(final.uri.rsplit("/", 1)[0])


def test_copyRetriedAfterItsResponseWasLost_412OnOurOwnObject_isSuccess(
    gcs_bucket: str, gcs_client: Any, gcs_preconditions: None, tmp_path: Path
) -> None:
    local = _version_dir(tmp_path)
    write_marker(local, "job-a")
    backend = GcsBackend(gcs_client)
    final = Location.parse(f"gs://{gcs_bucket}/out/1")
    staging = _committed(backend, local, final)  # every copy landed...
    landed = _blobs(gcs_client, gcs_bucket, "out/1/")
    retry = dataclasses.replace(staging, committed=[])
    backend.commit(retry, final)  # ...and is made again (no answer came): each one is a 412
    assert sorted(retry.committed) == sorted(f"out/1/{rel}" for rel in landed)
    assert _blobs(gcs_client, gcs_bucket, "out/1/") == landed  # same objects, not rewritten


def test_412OnAnotherJobsVersion_isAlreadyExists_andTheirObjectsStay(
    gcs_bucket: str, gcs_client: Any, gcs_preconditions: None, tmp_path: Path
) -> None:
    backend = GcsBackend(gcs_client)
    final = Location.parse(f"gs://{gcs_bucket}/out/1")
    theirs = _version_dir(tmp_path / "a")
    write_marker(theirs, "job-a")
    _committed(backend, theirs, final)
    landed = _blobs(gcs_client, gcs_bucket, "out/1/")
    ours = _version_dir(tmp_path / "b")
    write_marker(ours, "job-b")
    staging = backend.begin(_base(final))
    backend.stage(ours, staging)
    with pytest.raises(StorageExistsError):
        backend.commit(staging, final)  # the marker differs: job-a's version
    backend.rollback(staging)
    assert _blobs(gcs_client, gcs_bucket, "out/1/") == landed


def test_412OnAnUnmarkedVersion_isAlreadyExists_evenWithTheSameContent(
    gcs_bucket: str, gcs_client: Any, gcs_preconditions: None, tmp_path: Path
) -> None:
    backend = GcsBackend(gcs_client)
    final = Location.parse(f"gs://{gcs_bucket}/out/1")
    local = _version_dir(tmp_path)  # no job's marker (secateur prune, or another tool)
    _committed(backend, local, final)
    staging = backend.begin(_base(final))
    backend.stage(local, staging)
    with pytest.raises(StorageExistsError):
        backend.commit(staging, final)
    backend.rollback(staging)
    assert "saved_model.pb" in _blobs(gcs_client, gcs_bucket, "out/1/")


def test_localVersion_ownRecognised_changedOrOthersLeftAlone(tmp_path: Path) -> None:
    """Local publishing stays one rename; its versions are recognised the same way."""
    storage, base = Storage(), str(tmp_path / "out")
    uri = publish_version(storage, _version_dir(tmp_path), base, None, job_id="job-a")
    assert uri == f"{base}/1"
    report = own_version(storage, uri, "job-a")
    assert report is not None and report["output_uri"] == uri
    assert own_version(storage, uri, "job-b") is None  # another job's version
    (tmp_path / "out" / "1" / "variables" / "variables.index").write_bytes(b"changed")
    assert own_version(storage, uri, "job-a") is None  # complete, but not as published...
    assert (tmp_path / "out" / "1" / "saved_model.pb").exists()  # ...and never deleted
    assert sorted(os.listdir(tmp_path / "out")) == ["1"]
