"""SavedModels without Keras metadata through the service on loopback (graph import).

PlanPruning shrinks an exported model; a job publishes a version whose
``serving_default`` has the original's keys and shapes and, removing only dead
channels, reproduces the original SavedModel's outputs; an op the importer does
not know is FAILED_PRECONDITION naming it. The keras.applications models are slow.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from secateur.pruner.modelio import read_serving_signature
from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg
from tests import exported_models as em

Job = pb.Job


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exported")


@pytest.fixture(scope="module")
def stub(digits_data, root) -> Iterator[pbg.PruningServiceStub]:
    opts = ServerOptions(
        state_dir=str(root / "state"),
        port=0,
        allowed_prefixes=(str(digits_data.root), str(root / "models"), str(root / "out")),
    )
    with BackgroundServer(opts) as server:
        channel = grpc.insecure_channel(server.target)
        yield pbg.PruningServiceStub(channel)
        channel.close()


def _job(stub, digits_data, model_uri: str, out: Path, epochs: int = 0) -> Any:
    training = pb.TrainingSpec(
        epochs=epochs, batch_size=32, eval_data=digits_data.eval_file, measure_steps=1,
        train_data=digits_data.train_glob if epochs else "",
    )  # fmt: skip
    spec = pb.JobSpec(
        model_uri=model_uri,
        output_uri=str(out),
        pruning=pb.PruningSpec(ratio=em.DEAD_RATIO, criterion=pb.CRITERION_BN_SCALE),
        training=training,
    )
    job = stub.CreateJob(pb.CreateJobRequest(spec=spec))
    done = list(stub.WatchJob(pb.WatchJobRequest(name=job.name), timeout=1200))[-1]
    assert done.state == Job.STATE_SUCCEEDED, done.error.message
    return done


def _through_the_service(stub, digits_data, root: Path, model: Any, name: str, how: str) -> None:
    assert em.kill_channels(model) > 0
    original = em.export(model, str(root / "models" / f"{name}-{how}"), how)
    plan = stub.PlanPruning(
        pb.PlanPruningRequest(model_uri=original, pruning=pb.PruningSpec(ratio=0.5)), timeout=600
    )
    assert plan.params_after < plan.params_before
    done = _job(stub, digits_data, original, root / "out" / f"{name}-{how}")
    version = done.result.output_uri
    assert read_serving_signature(version) == read_serving_signature(original)
    assert done.result.pruned.params < done.result.original.params
    x = em.images()
    em.assert_same(em.served(original, x), em.served(version, x))


def test_service_exportedSmallCnn_plansAndPrunesExactly_signatureKept(
    stub, digits_data, root
) -> None:
    _through_the_service(stub, digits_data, root, em.small_cnn(), "small", "export")


@pytest.mark.slow
def test_service_savedModelSave_fineTunes_signatureKept(stub, digits_data, root) -> None:
    original = em.export(em.small_cnn(), str(root / "models" / "tuned"), "saved_model_save")
    done = _job(stub, digits_data, original, root / "out" / "tuned", epochs=1)
    assert read_serving_signature(done.result.output_uri) == read_serving_signature(original)


# The CLI tests (tests/cli/test_exported_savedmodels_cli.py) prune all five
# applications in both export kinds; through the service the pruning is the same
# code, so two models (a residual and a depthwise one), one per export kind, show
# that large imported graphs go through a job subprocess and back.
SERVICE_APPLICATIONS = (("ResNet50", em.EXPORTS[0]), ("MobileNetV2", em.EXPORTS[1]))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "how"), SERVICE_APPLICATIONS)
def test_service_exportedApplication_plansAndPrunesExactly_signatureKept(
    stub, digits_data, root, name, how
) -> None:
    _through_the_service(stub, digits_data, root, em.application(name), name, how)


def test_service_unsupportedOp_failedPreconditionNamingIt(stub, digits_data, root) -> None:
    path = em.unsupported_op_savedmodel(str(root / "models" / "scan"))
    with pytest.raises(grpc.RpcError) as info:
        stub.PlanPruning(pb.PlanPruningRequest(model_uri=path), timeout=300)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Cumsum" in info.value.details()
    spec = pb.JobSpec(
        model_uri=path, output_uri=str(root / "out" / "scan"), pruning=pb.PruningSpec(ratio=0.3)
    )
    job = stub.CreateJob(pb.CreateJobRequest(spec=spec))
    done = list(stub.WatchJob(pb.WatchJobRequest(name=job.name), timeout=300))[-1]
    assert done.state == Job.STATE_FAILED
    assert done.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "Cumsum" in done.error.message
    assert not (root / "out" / "scan").exists()
