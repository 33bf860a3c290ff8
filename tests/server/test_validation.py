"""Requests are validated before any work, and errors stay small and name what
the client sent (issue 8, classes 3, 5, 6, 8 and 9), against a real server on
loopback.

- sizes: every string and repeated field of every request is bounded;
- echoes: an error quoting a huge input still arrives as itself, not as a
  RESOURCE_EXHAUSTED transport error;
- output inside the model: refused at CreateJob and by ``secateur prune``;
- numbers: NaN, infinities and absurd integers are INVALID_ARGUMENT;
- paths: a corrupt model's error names its URI, never the server's work copy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.server.errors import ServiceError, to_status_proto
from secateur.server.pipeline.boundary import preflight
from secateur.server.pipeline.job_request import JobRequest
from secateur.server.storage import Storage
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

Job = pb.Job
BIG = "x" * 100_000
# What gRPC peers accept in a response's headers before RESOURCE_EXHAUSTED.
METADATA_LIMIT = 8 * 1024


@dataclass
class Env:
    root: Path
    models: Path
    out: Path
    state: Path
    stub: pbg.PruningServiceStub

    def spec(self, **fields: Any) -> pb.JobSpec:
        spec = pb.JobSpec(
            model_uri=str(self.models / "bad.keras"),
            output_uri=str(self.out),
            pruning=pb.PruningSpec(ratio=0.3),
            training=pb.TrainingSpec(measure_steps=1),
        )
        for path, value in fields.items():
            *parents, name = path.split(".")
            msg = spec
            for p in parents:
                msg = getattr(msg, p)
            field = getattr(msg, name)
            if isinstance(value, list):
                field.extend(value)
            else:
                setattr(msg, name, value)
        return spec

    def create(self, **fields: Any) -> pb.Job:
        return self.stub.CreateJob(pb.CreateJobRequest(spec=self.spec(**fields)))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("validation")
    models = root / "models"
    models.mkdir()
    (models / "bad.keras").write_bytes(b"not a zip archive")
    (models / "bad.h5").write_bytes(b"not an HDF5 file " * 64)
    saved = models / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"\x08\x01garbage")
    (saved / "keras_metadata.pb").write_bytes(b"\x08\x01garbage")
    (models / "link").symlink_to(saved)
    opts = ServerOptions(
        state_dir=str(root / "state"),
        port=0,
        allowed_prefixes=(str(models), str(root / "out")),
    )
    with BackgroundServer(opts) as server:
        channel = grpc.insecure_channel(server.target)
        yield Env(root, models, root / "out", root / "state", pbg.PruningServiceStub(channel))
        channel.close()


def _error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _violations(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)  # raises when details and code disagree
    assert status is not None, "no google.rpc.Status details"
    out = []
    for detail in status.details:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            out += [v.field for v in br.field_violations]
    return out


def _job_count(env: Env) -> int:
    return len(env.stub.ListJobs(pb.ListJobsRequest(page_size=1000)).jobs)


# -- class 3: every string and repeated field is bounded ---------------------

SIZE_CASES: list[tuple[str, Callable[[Env], Any], str, str]] = [
    ("output_uri", lambda e: e.create(output_uri="/o/" + BIG), "spec.output_uri", "4096"),
    ("model_uri", lambda e: e.create(model_uri="/m/" + "m" * 5000), "spec.model_uri", "4096"),
    (
        "train_data",
        lambda e: e.create(**{"training.train_data": "/d/" + "d" * 5000}),
        "spec.training.train_data",
        "4096",
    ),
    (
        "eval_data",
        lambda e: e.create(**{"training.eval_data": BIG}),
        "spec.training.eval_data",
        "4096",
    ),
    (
        "image_key",
        lambda e: e.create(**{"training.image_key": "k" * 1000}),
        "spec.training.image_key",
        "256",
    ),
    (
        "label_key",
        lambda e: e.create(**{"training.label_key": BIG}),
        "spec.training.label_key",
        "256",
    ),
    (
        "exclude entry",
        lambda e: e.create(**{"pruning.exclude": ["conv1", "c" * 300]}),
        "spec.pruning.exclude[1]",
        "256",
    ),
    (
        "exclude count",
        lambda e: e.create(**{"pruning.exclude": [f"l{i}" for i in range(2000)]}),
        "spec.pruning.exclude",
        "1024",
    ),
    (
        "ratios count",
        lambda e: e.create(**{"pruning.ratios": [0.1] * 100}),
        "spec.pruning.ratios",
        "64",
    ),
    (
        "request_id",
        lambda e: e.stub.CreateJob(pb.CreateJobRequest(spec=e.spec(), request_id="r" * 1000)),
        "request_id",
        "256",
    ),
    ("GetJob", lambda e: e.stub.GetJob(pb.GetJobRequest(name="jobs/" + BIG)), "name", "256"),
    (
        "CancelJob",
        lambda e: e.stub.CancelJob(pb.CancelJobRequest(name="jobs/" + BIG)),
        "name",
        "256",
    ),
    (
        "WatchJob",
        lambda e: list(e.stub.WatchJob(pb.WatchJobRequest(name="jobs/" + BIG))),
        "name",
        "256",
    ),
    (
        "ListJobs",
        lambda e: e.stub.ListJobs(pb.ListJobsRequest(page_token=BIG)),
        "page_token",
        "1024",
    ),
    (
        "PlanPruning model_uri",
        lambda e: e.stub.PlanPruning(pb.PlanPruningRequest(model_uri=BIG)),
        "model_uri",
        "4096",
    ),
    (
        "PlanPruning exclude",
        lambda e: e.stub.PlanPruning(
            pb.PlanPruningRequest(
                model_uri=str(e.models / "bad.keras"),
                pruning=pb.PruningSpec(exclude=["e" * 1000]),
            )
        ),
        "pruning.exclude[0]",
        "256",
    ),
]


@pytest.mark.parametrize("case", SIZE_CASES, ids=[c[0] for c in SIZE_CASES])
def test_oversizedField_invalidArgumentWithLimitAndPath_beforeWork(env, case) -> None:
    _, call, path, limit = case
    before = _job_count(env)
    err = _error(lambda: call(env))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert path in _violations(err)
    assert f"at most {limit}" in err.details()
    assert _job_count(env) == before
    assert not os.path.exists(env.state / "work") or not os.listdir(env.state / "work")


# -- class 5: errors echoing huge input still arrive as themselves ----------


@pytest.mark.parametrize(
    "call",
    [
        lambda s, n: s.GetJob(pb.GetJobRequest(name=n)),
        lambda s, n: s.CancelJob(pb.CancelJobRequest(name=n)),
        lambda s, n: list(s.WatchJob(pb.WatchJobRequest(name=n))),
    ],
    ids=["GetJob", "CancelJob", "WatchJob"],
)
def test_hugeJobName_invalidArgumentNotResourceExhausted(env, call) -> None:
    for name in (BIG, "jobs/" + "é" * 50_000):
        err = _error(lambda n=name: call(env.stub, n))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert _violations(err) == ["name"] and len(err.details()) < 1100


def test_longAllowedUriEchoedTwice_isClippedNotResourceExhausted(env) -> None:
    # 4000 characters fit the URI bound; the allow-list message quotes it twice,
    # in 2-byte UTF-8, percent-encoded in the header: ~50 KB unclipped.
    uri = "/etc/" + "é" * 3990
    err = _error(lambda: env.create(output_uri=uri))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    assert "allowed prefixes" in err.details() and "more chars)" in err.details()


def test_serviceError_anyEchoFitsTheMetadataLimit() -> None:
    err = ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "é" * 100_000,
        [("f" * 10_000, "∂" * 100_000)] * 50,
    )
    status = to_status_proto(err)
    header_bytes = 3 * len(status.message.encode()) + 4 * len(status.SerializeToString()) // 3
    assert header_bytes < METADATA_LIMIT - 1024
    assert status.message.endswith("more chars)")
    br = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(br) and "(and 44 more violations)" in str(br)


# -- class 6: the output is never the model nor inside it --------------------


@pytest.mark.parametrize(
    "model,output",
    [
        ("bad.keras", "{m}/bad.keras"),
        ("bad.keras", "file://{m}/bad.keras"),
        ("bad.keras", "{m}/bad.keras/"),
        ("bad.keras", "{m}/../models/./bad.keras"),
        ("bad.keras", "{m}/bad.keras/nested"),
        ("saved", "{m}/saved"),
        ("saved", "{m}/saved/nested"),
        ("saved", "file://{m}/saved/1/"),
        ("saved", "{m}/link/nested"),
        ("link", "{m}/saved/variables"),
    ],
)
def test_outputInsideModel_refusedAtCreateJob(env, model, output) -> None:
    before = sorted(os.listdir(env.models / "saved"))
    err = _error(
        lambda: env.create(
            model_uri=str(env.models / model), output_uri=output.format(m=env.models)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert _violations(err) == ["spec.output_uri"] and "inside" in err.details()
    assert sorted(os.listdir(env.models / "saved")) == before


def test_outputBesideOrAboveModel_isFine_andGcsFormsNormalised(env) -> None:
    storage = Storage([str(env.models), str(env.out)])
    for output in (env.models, env.out, env.models / "saved-out"):
        preflight(storage, JobRequest(str(env.models / "saved"), str(output)))
    gs = Storage()
    assert gs.within("gs://bkt/m/out/", "gs://bkt/m")
    assert gs.within("gs://bkt/m", "gs://bkt/m/")
    assert gs.within("gs://bkt/m/x", "gs://bkt")
    assert not gs.within("gs://bkt/m2/x", "gs://bkt/m")
    assert not gs.within("gs://ckt/m", "gs://bkt/m")
    assert not gs.within(str(env.models), "gs://bkt/m")


def test_outputInsideModel_cliExits2_nothingWritten(env, capsys) -> None:
    from secateur.cli.main import main

    saved = env.models / "saved"
    code = main(["prune", str(saved), str(saved / "out"), "--allowed-uri-prefix", str(env.root)])
    assert code == 2
    assert "output_uri must not be the model or lie inside it" in capsys.readouterr().err
    assert not (saved / "out").exists()


# -- class 8: numbers are finite and in range --------------------------------

NUMBER_CASES = [
    ({"training.learning_rate": math.inf}, "spec.training.learning_rate"),
    ({"training.learning_rate": math.nan}, "spec.training.learning_rate"),
    ({"training.learning_rate": -0.1}, "spec.training.learning_rate"),
    ({"pruning.ratio": math.nan}, "spec.pruning.ratio"),
    ({"pruning.ratio": -math.inf}, "spec.pruning.ratio"),
    ({"pruning.head_ratio": math.nan}, "spec.pruning.head_ratio"),
    ({"pruning.head_ratio": 1.0}, "spec.pruning.head_ratio"),
    ({"pruning.ratios": [0.2, math.inf]}, "spec.pruning.ratios"),
    ({"max_accuracy_drop": math.nan}, "spec.max_accuracy_drop"),
    ({"max_accuracy_drop": math.inf}, "spec.max_accuracy_drop"),
    ({"training.epochs": 10**9}, "spec.training.epochs"),
    ({"training.batch_size": 2**31 - 1}, "spec.training.batch_size"),
    ({"training.measure_steps": 2**31 - 1}, "spec.training.measure_steps"),
    ({"pruning.round_to": 2**31 - 1}, "spec.pruning.round_to"),
    ({"pruning.min_channels": -5}, "spec.pruning.min_channels"),
    ({"pruning.seed": -1}, "spec.pruning.seed"),
    ({"version": -3}, "spec.version"),
]


@pytest.mark.parametrize("fields,path", NUMBER_CASES, ids=[c[1] for c in NUMBER_CASES])
def test_nonFiniteOrAbsurdNumber_invalidArgumentNamingTheField(env, fields, path) -> None:
    before = _job_count(env)
    err = _error(lambda: env.create(**fields))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert _violations(err) == [path] and "Received:" in err.details()
    assert _job_count(env) == before


def test_planPruning_nonFiniteRatio_invalidArgument(env) -> None:
    request = pb.PlanPruningRequest(
        model_uri=str(env.models / "bad.keras"), pruning=pb.PruningSpec(ratio=math.inf)
    )
    err = _error(lambda: env.stub.PlanPruning(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(err) == ["pruning.ratio"]


# -- class 9: errors name the client's URI, not the server's work copy -------


def _names_only_the_uri(message: str, uri: str, env: Env) -> None:
    assert uri in message, message
    assert str(env.state) not in message and "secateur-" not in message, message


@pytest.mark.parametrize("model", ["bad.keras", "bad.h5", "saved"])
def test_corruptModel_planPruningNamesTheUri(env, model) -> None:
    uri = str(env.models / model)
    err = _error(lambda: env.stub.PlanPruning(pb.PlanPruningRequest(model_uri=uri), timeout=180))
    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    _names_only_the_uri(err.details(), uri, env)


def test_corruptModel_failedJobNamesTheUri(env) -> None:
    uri = "file://" + str(env.models / "bad.h5")
    name = env.create(model_uri=uri, output_uri=str(env.out / "h5")).name
    job = list(env.stub.WatchJob(pb.WatchJobRequest(name=name), timeout=180))[-1]
    assert (
        job.state == Job.STATE_FAILED
        and job.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    )
    _names_only_the_uri(job.error.message, uri, env)
    assert not (env.out / "h5").exists()


def test_corruptModel_cliNamesTheUri(env, capsys) -> None:
    from secateur.cli.main import main

    uri = str(env.models / "bad.h5")
    assert main(["prune", uri, str(env.out / "cli"), "--measure-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert uri in err and "secateur-job-" not in err, err
