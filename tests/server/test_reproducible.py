"""Reproducible by default: the same job twice gives the same plan, accuracy and weights.

The digits VGG ends in Dropout(0.5): its seed is drawn when the model is
loaded and rebuilt, so only a job that seeds every generator from its seed
(Python, NumPy, TensorFlow, Keras's global generator) repeats itself.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from secateur.pruner import PruneSpec
from secateur.pruner.config import MeasureConfig, TrainConfig
from secateur.pruner.modelio import load_model
from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.server.pipeline.job_request import JobRequest
from secateur.server.pipeline.prune_job import PruneJob
from secateur.server.storage import Storage
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

QUICK = MeasureConfig(warmup_steps=1, steps=1, rounds=1, latency_runs=1)


def _request(data, out, **train) -> JobRequest:
    return JobRequest(
        model_uri=data.model_path,
        output_uri=str(out),
        spec=PruneSpec(ratio=0.4, seed=7),
        train=TrainConfig(**({"epochs": 1, "batch_size": 128} | train)),
        train_data=str(data.root / "train-0.tfrecord"),  # 700 examples: 6 steps
        eval_data=data.eval_file,
        measure=QUICK,
    )


def _weights(version_dir) -> list[np.ndarray]:
    return [np.asarray(v) for v in load_model(str(version_dir)).weights]


def _assert_same_weights(a, b) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert np.array_equal(x, y), f"variable {i} differs by up to {np.max(np.abs(x - y))}"


def test_pipelineTwice_identicalPlanAccuracyAndWeights(digits_data, tmp_path) -> None:
    from tensorflow.python.framework import config as tf_config

    before = tf_config.is_op_determinism_enabled()
    reports = [
        PruneJob(_request(digits_data, tmp_path / f"out{i}"), Storage()).run() for i in (0, 1)
    ]
    first, second = reports
    assert first["plan"] == second["plan"]
    assert first["candidates"][0]["accuracy"] == second["candidates"][0]["accuracy"]
    assert first["pruned"]["accuracy"] == second["pruned"]["accuracy"]
    assert first["candidates"][0]["history"] == second["candidates"][0]["history"]
    _assert_same_weights(_weights(tmp_path / "out0" / "1"), _weights(tmp_path / "out1" / "1"))
    assert first["reproducibility"]["seed"] == 7
    assert first["reproducibility"]["deterministic"] is True
    assert "op determinism on" in first["reproducibility"]["how"]
    assert first["pruned"]["how"]["op_determinism"] is True
    # Op determinism is process-wide: a library caller gets its own setting back.
    assert tf_config.is_op_determinism_enabled() == before


def test_deterministicOff_reportSaysSo(digits_data, tmp_path) -> None:
    request = dataclasses.replace(
        _request(digits_data, tmp_path / "out", epochs=0, deterministic=False),
        train_data=None,
    )
    report = PruneJob(request, Storage()).run()
    repro = report["reproducibility"]
    assert repro == {"seed": 7, "deterministic": False, "how": repro["how"]}
    assert "op determinism off (deterministic: false" in repro["how"]
    assert report["train"]["deterministic"] is False
    assert report["original"]["how"]["op_determinism"] is False
    assert report["pruned"]["how"]["op_determinism"] is False


def test_deterministic_mustBeABool() -> None:
    from secateur.pruner.errors import InvalidSpecError

    with pytest.raises(InvalidSpecError) as info:
        TrainConfig(deterministic="yes")  # type: ignore[arg-type]
    assert str(info.value) == "deterministic must be true or false. Received: 'yes'"


def _wait_done(stub, name: str, timeout: float = 300) -> pb.Job:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = stub.GetJob(pb.GetJobRequest(name=name))
        if job.state in (pb.Job.STATE_SUCCEEDED, pb.Job.STATE_FAILED, pb.Job.STATE_CANCELLED):
            return job
        time.sleep(0.2)
    raise AssertionError(f"{name} did not finish within {timeout} s")


def test_serverTwice_sameSpec_identicalPublishedWeightsAndAccuracies(digits_data, tmp_path) -> None:
    import grpc

    out = tmp_path / "out"
    opts = ServerOptions(
        state_dir=str(tmp_path / "state"),
        port=0,
        allowed_prefixes=(str(digits_data.root), str(out)),
    )
    spec = pb.JobSpec(
        model_uri=digits_data.model_path,
        output_uri=str(out),
        pruning=pb.PruningSpec(ratio=0.4, seed=7),
        training=pb.TrainingSpec(
            epochs=1,
            batch_size=128,
            train_data=str(digits_data.root / "train-0.tfrecord"),
            eval_data=digits_data.eval_file,
            measure_steps=1,
        ),
    )
    with BackgroundServer(opts) as server:
        stub = pbg.PruningServiceStub(grpc.insecure_channel(server.target))
        names = [stub.CreateJob(pb.CreateJobRequest(spec=spec)).name for _ in range(2)]
        jobs = [_wait_done(stub, name) for name in names]
    for job in jobs:
        assert job.state == pb.Job.STATE_SUCCEEDED, job.error.message
        assert job.result.pruned.how["op_determinism"] is True
    first, second = (job.result for job in jobs)
    assert {first.output_uri, second.output_uri} == {str(out / "1"), str(out / "2")}
    assert [c.metrics.accuracy for c in first.candidates] == [
        c.metrics.accuracy for c in second.candidates
    ]
    assert first.plan == second.plan
    _assert_same_weights(_weights(out / "1"), _weights(out / "2"))


def test_noDeterministicFlag_reachesTheJobRequest() -> None:
    from secateur.cli.options import job_spec
    from secateur.cli.parser import build_parser
    from secateur.server.pipeline.convert import job_request

    def request(*words: str) -> JobRequest:
        args = build_parser().parse_args(["prune", "m.keras", "out", *words])
        return job_request(job_spec(args))

    assert request().train.deterministic is True
    assert request("--no-deterministic").train.deterministic is False
    assert request("--deterministic").train.deterministic is True
