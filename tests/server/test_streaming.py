"""Data is read where it lies: gs:// TFRecords stream from the storage emulator into
training and evaluation, nothing is copied under the job's work directory, and a data
set larger than the job's local disk budget still trains."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from secateur.pruner import PruneSpec
from secateur.pruner.data import write_examples
from secateur.pruner.errors import DataError
from secateur.pruner.finetune import TrainConfig
from secateur.pruner.measure import MeasureConfig
from secateur.server.pipeline.job_request import JobRequest
from secateur.server.pipeline.prune_job import PruneJob
from secateur.server.storage import DiskBudgetError, Storage
from secateur.server.storage.tfrecord import RecordFramingError
from tests.conftest import digits

QUICK = MeasureConfig(warmup_steps=1, steps=1, rounds=1, latency_runs=1)


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory) -> list[Path]:
    """Two train shards and an eval file of raw float pixels (12 KiB a record, ~10 MB)."""
    root = tmp_path_factory.mktemp("raw-shards")
    images, labels = digits()
    paths = []
    for i in range(2):
        path = root / f"train-{i}.tfrecord"
        part = slice(i * 200, (i + 1) * 200)
        write_examples(str(path), images[part], labels[part], "raw")
        paths.append(path)
    write_examples(str(root / "eval.tfrecord"), images[1400:], labels[1400:], "raw")
    return [*paths, root / "eval.tfrecord"]


def _upload(gcs_client, bucket_name: str, files: dict[str, Path]) -> None:
    bucket = gcs_client.bucket(bucket_name)
    for name, path in files.items():
        bucket.blob(name).upload_from_filename(str(path))


def _request(base: str, **kw) -> JobRequest:
    defaults = dict(
        model_uri=f"{base}/models/vgg.keras",
        output_uri=f"{base}/served/digits",
        spec=PruneSpec(ratio=0.3),
        train=TrainConfig(epochs=1, batch_size=64),
        train_data=f"{base}/data/train-*.tfrecord",
        eval_data=f"{base}/data/eval.tfrecord",
        measure=QUICK,
    )
    return JobRequest(**(defaults | kw))


def _local_files(root: str) -> list[tuple[str, int]]:
    return [
        (os.path.join(d, f), os.path.getsize(os.path.join(d, f)))
        for d, _, fs in os.walk(root)
        for f in fs
    ]


def test_gcsData_streamedNeverCopied_trainsPastATinyDiskBudget(
    digits_data, raw_shards, gcs_client, gcs_bucket, tmp_path, monkeypatch
) -> None:
    files = {f"data/{p.name}": p for p in raw_shards} | {
        "models/vgg.keras": Path(digits_data.model_path)
    }
    _upload(gcs_client, gcs_bucket, files)
    data_bytes = sum(p.stat().st_size for p in raw_shards)
    model_bytes = Path(digits_data.model_path).stat().st_size
    # Room for the model copy and the exported version; the data is half as big again.
    budget = 3 * model_bytes
    assert data_bytes > 1.5 * budget
    # Every temporary file the job makes (its work directory included) lands here.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    walks: list[list[tuple[str, int]]] = []

    def on_event(e) -> None:
        if e.stage in ("FINE_TUNING", "EVALUATING", "MEASURING"):
            walks.append(_local_files(str(tmp)))

    base = f"gs://{gcs_bucket}"
    job = PruneJob(_request(base), Storage([base]), on_event, disk_budget_bytes=budget)
    report = job.run()

    assert report["output_uri"] == f"{base}/served/digits/1"
    assert report["candidates"][0]["history"]["loss"]  # it trained on the streamed data
    assert report["original"]["accuracy"] == pytest.approx(digits_data.eval_accuracy, abs=0.05)
    assert len(walks) > 3
    seen = {path for walk in walks for path, _ in walk}
    assert not [p for p in seen if p.endswith(".tfrecord")], seen
    assert any(p.endswith("vgg.keras") for p in seen)  # the model copy is all it fetched
    peak = max(sum(size for _, size in walk) for walk in walks)
    assert peak <= budget
    # The work directory is gone (TensorFlow's autograph cache of generated code stays).
    assert [p for p, _ in _local_files(str(tmp)) if "__autograph_generated" not in p] == []


def test_diskBudgetBelowTheModel_failsBeforeTraining_nothingPublished(
    digits_data, gcs_client, gcs_bucket, monkeypatch
) -> None:
    _upload(gcs_client, gcs_bucket, {"models/vgg.keras": Path(digits_data.model_path)})
    base = f"gs://{gcs_bucket}"
    stages = []
    # The worker-wide setting (the CLI, serve and worker read it alike).
    monkeypatch.setenv("SECATEUR_LOCAL_DISK_BUDGET_BYTES", "1000")
    req = _request(base, train_data=digits_data.train_glob, eval_data=None)
    job = PruneJob(req, Storage(), lambda e: stages.append(e.stage))
    with pytest.raises(DiskBudgetError, match="local disk budget of 1000 bytes") as info:
        job.run()
    assert info.value.uri == f"{base}/models/vgg.keras"
    assert set(stages) == {"FETCHING"}
    assert not list(gcs_client.list_blobs(gcs_bucket, prefix="served/"))


def _truncated(data: bytes) -> bytes:
    return data[: len(data) * 6 // 10 + 7]  # 7: never on a record boundary


def _flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


def test_gcsEvalDataTruncated_dataErrorNamesTheGsUriAndRecord(
    digits_data, gcs_client, gcs_bucket, tmp_path
) -> None:
    whole = Path(digits_data.eval_file).read_bytes()
    (tmp_path / "cut.tfrecord").write_bytes(_truncated(whole))
    _upload(
        gcs_client,
        gcs_bucket,
        {
            "models/vgg.keras": Path(digits_data.model_path),
            "data/cut.tfrecord": tmp_path / "cut.tfrecord",
        },
    )
    complete = 0
    with pytest.raises(RecordFramingError):
        for _ in Storage().read_records(str(tmp_path / "cut.tfrecord")):
            complete += 1
    assert complete > 100
    base = f"gs://{gcs_bucket}"
    uri = f"{base}/data/cut.tfrecord"
    req = _request(base, train_data=None, eval_data=uri)
    with pytest.raises(DataError) as info:
        PruneJob(req, Storage([base])).run()
    err = info.value
    assert err.file == uri and err.field == "eval_data" and err.record == complete
    assert "truncated record" in str(err) and f"at record {complete} of {uri}" in str(err)
    assert "secateur-job-" not in str(err)
    assert not list(gcs_client.list_blobs(gcs_bucket, prefix="served/"))


def test_readRecords_matchesTensorFlowAndRefusesCutOrCorruptFiles(digits_data, tmp_path) -> None:
    store = Storage()
    path = digits_data.eval_file
    expected = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    assert list(store.read_records(path)) == expected
    assert list(store.read_records(f"file://{path}")) == expected
    whole = Path(path).read_bytes()
    cut = tmp_path / "cut.tfrecord"
    cut.write_bytes(_truncated(whole))
    with pytest.raises(RecordFramingError, match="truncated record"):
        list(store.read_records(str(cut)))
    flipped = tmp_path / "flipped.tfrecord"
    first = len(expected[0]) + 16
    flipped.write_bytes(_flipped(whole, first + 12 + 5))  # inside the second record's data
    records = store.read_records(str(flipped))
    assert next(records) == expected[0]
    with pytest.raises(RecordFramingError, match=f"corrupted record at byte {first}"):
        next(records)


def test_gcsReadRecords_streamsInChunks_allowListed(digits_data, gcs_client, gcs_bucket) -> None:
    from secateur.server.storage import StorageNotFoundError, StoragePermissionError

    _upload(gcs_client, gcs_bucket, {"data/eval.tfrecord": Path(digits_data.eval_file)})
    base = f"gs://{gcs_bucket}"
    expected = [r.numpy() for r in tf.data.TFRecordDataset(digits_data.eval_file)]
    assert list(Storage([f"{base}/data"]).read_records(f"{base}/data/eval.tfrecord")) == expected
    with pytest.raises(StoragePermissionError):
        list(Storage([f"{base}/other"]).read_records(f"{base}/data/eval.tfrecord"))
    with pytest.raises(StorageNotFoundError, match=f"Received: {base}/data/missing"):
        list(Storage().read_records(f"{base}/data/missing"))
    assert np.asarray(expected).size > 0
