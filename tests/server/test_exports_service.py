"""JobSpec.exports end to end: the service publishes LiteRT/ONNX files inside the version,
refuses a format whose runtime it lacks at CreateJob, and a job whose model a format cannot
take fails before anything is published."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import grpc
import pytest

from secateur.client.protospec import report_from_job
from secateur.pruner import PruneSpec
from secateur.pruner._keras import keras
from secateur.pruner.errors import ExportError
from secateur.pruner.exports import ATOL
from secateur.pruner.measure import MeasureConfig
from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.server.errors import status_of
from secateur.server.pipeline.job_request import JobRequest
from secateur.server.pipeline.prune_job import PruneJob
from secateur.server.storage import Storage
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .test_service import _error, _violations, _wait

ASSETS = os.path.join("assets.extra", "secateur")


@pytest.fixture
def stub(tmp_path) -> Iterator[pbg.PruningServiceStub]:
    opts = ServerOptions(
        state_dir=str(tmp_path / "state"), port=0, allowed_prefixes=(str(tmp_path),)
    )
    with BackgroundServer(opts) as server:
        yield pbg.PruningServiceStub(grpc.insecure_channel(server.target))


def _small_model(path: str, interpolation: str = "") -> str:
    """A small conv net (with a Resizing layer when ``interpolation`` is given), saved."""
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    if interpolation:
        x = keras.layers.Resizing(8, 8, interpolation=interpolation, name="shrink")(x)
    x = keras.layers.Conv2D(16, 3, padding="same")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(path)
    return path


def _spec(tmp_path, *exports: int) -> pb.JobSpec:
    return pb.JobSpec(
        model_uri=_small_model(str(tmp_path / "m.keras")),
        output_uri=str(tmp_path / "out"),
        pruning=pb.PruningSpec(ratio=0.5),
        training=pb.TrainingSpec(epochs=0, batch_size=8, measure_steps=1),
        exports=list(exports),
    )


def test_job_withExports_publishedVersionHoldsCheckedArtifacts(stub, tmp_path) -> None:
    for module in ("tf2onnx", "onnx", "onnxruntime"):
        pytest.importorskip(module, reason=f"{module} is missing: pip install 'secateur[exports]'")
    spec = _spec(tmp_path, pb.EXPORT_FORMAT_LITERT, pb.EXPORT_FORMAT_ONNX)
    job = _wait(stub, stub.CreateJob(pb.CreateJobRequest(spec=spec)).name)
    assert job.state == pb.Job.STATE_SUCCEEDED, job.error.message
    assets = tmp_path / "out" / "1" / ASSETS
    report = json.loads((assets / "report.json").read_text())
    entries = {e["format"]: e for e in report["exports"]}
    assert set(entries) == {"litert", "onnx"}
    for fmt, name in (("litert", "model.tflite"), ("onnx", "model.onnx")):
        e = entries[fmt]
        assert e["file"] == name and e["bytes"] == os.path.getsize(assets / name) > 0
        # Checked on 4 seeded inputs (no data given) within the tolerance, else the job fails.
        assert e["samples"] == 4 and e["atol"] == ATOL and 0 <= e["max_abs_diff"] < 1e-3, e
    assert (tmp_path / "out" / "1" / "saved_model.pb").exists()  # the contract stays
    # The job's result carries the same entries, for clients that never read the version.
    assert report_from_job(job)["exports"] == report["exports"]
    assert [e.format for e in job.result.exports] == list(spec.exports)


def test_createJob_exportWithoutItsRuntime_invalidArgumentNamingTheExtra(
    stub, tmp_path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not importable in this server
    spec = _spec(tmp_path, pb.EXPORT_FORMAT_ONNX)
    err = _error(lambda: stub.CreateJob(pb.CreateJobRequest(spec=spec)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "onnxruntime" in err.details() and "secateur[exports]" in err.details()
    assert _violations(err) == ["spec.exports"]
    assert not stub.ListJobs(pb.ListJobsRequest()).jobs


def test_job_modelTheFormatCannotTake_failsBeforePruning_publishingNothing(tmp_path) -> None:
    # tf.ScaleAndTranslate: no LiteRT builtin (area would do too, but has no gradient to train)
    _small_model(str(tmp_path / "m.keras"), "lanczos3")
    request = JobRequest(
        model_uri=str(tmp_path / "m.keras"),
        output_uri=str(tmp_path / "out"),
        spec=PruneSpec(ratio=0.25),
        measure=MeasureConfig(warmup_steps=1, steps=1, rounds=1, latency_runs=1),
        exports=("litert",),
    )
    events: list = []
    with pytest.raises(ExportError) as info:
        PruneJob(request, Storage(), events.append).run()
    # Checked on the original while analysing: no scoring, training or measuring first.
    assert {e.stage for e in events} == {"FETCHING", "ANALYZING"}
    assert info.value.ops == ("ScaleAndTranslate",) and "layer 'shrink'" in str(info.value)
    status = status_of(info.value)
    assert status is not None and status.code == grpc.StatusCode.FAILED_PRECONDITION
    out = tmp_path / "out"
    assert not out.exists() or not os.listdir(out)  # no version, not even a temporary one
