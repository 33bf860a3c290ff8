"""A keras-hub model through a real server on loopback: refused by a server that does
not trust keras_hub (the error names the package and ``--trust-package``),
planned and pruned by one started with ``--trust-package keras_hub``. A
package that is not installed stops ``serve`` and ``worker`` at start-up."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from secateur.pruner.modelio import load_model
from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.server.main import main as serve_main
from secateur.server.main import worker_main
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .. import trusted_models as tm

pytest.importorskip("keras_hub", reason="keras_hub is not importable; it is in the dev extra")


@dataclass(frozen=True)
class Hub:
    root: Path
    backbone: str
    classifier: str


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Hub:
    root = tmp_path_factory.mktemp("hub-service")
    classifier = str(root / "classifier.keras")
    tm.classifier(classifier)
    return Hub(root, tm.backbone(str(root / "backbone.keras")), classifier)


def _server(hub: Hub, name: str, trusted: tuple[str, ...]) -> Iterator[pbg.PruningServiceStub]:
    opts = ServerOptions(
        state_dir=str(hub.root / name),
        port=0,
        allowed_prefixes=(str(hub.root),),
        trusted_packages=trusted,
    )
    with BackgroundServer(opts) as server, grpc.insecure_channel(server.target) as channel:
        yield pbg.PruningServiceStub(channel)


@pytest.fixture(scope="module")
def untrusting(hub: Hub) -> Iterator[pbg.PruningServiceStub]:
    yield from _server(hub, "untrusting", ())


@pytest.fixture(scope="module")
def trusting(hub: Hub) -> Iterator[pbg.PruningServiceStub]:
    yield from _server(hub, "trusting", tm.TRUSTED)


def _plan(model: str) -> pb.PlanPruningRequest:
    return pb.PlanPruningRequest(model_uri=model, pruning=pb.PruningSpec(ratio=0.3))


def _job(stub: pbg.PruningServiceStub, model: str, out: Path) -> pb.Job:
    """Create a quick job (no fine-tuning, one timed step) and follow it to its end."""
    spec = pb.JobSpec(
        model_uri=model,
        output_uri=str(out),
        pruning=pb.PruningSpec(ratio=0.3),
        training=pb.TrainingSpec(epochs=0, batch_size=8, measure_steps=1),
    )
    name = stub.CreateJob(pb.CreateJobRequest(spec=spec)).name
    *_, last = stub.WatchJob(pb.WatchJobRequest(name=name), timeout=300)
    return last


def _names_the_trust_option(message: str) -> bool:
    return (
        "registered as 'keras_hub>" in message
        and "by package 'keras_hub', which is not trusted" in message
        and "--trust-package keras_hub" in message
    )


def test_planPruning_hubBackbone_serverWithoutTrust_invalidArgumentNamingTheOption(
    untrusting, hub
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        untrusting.PlanPruning(_plan(hub.backbone), timeout=180)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _names_the_trust_option(info.value.details()), info.value.details()
    assert "Received: " + hub.backbone in info.value.details()


def test_createJob_hubTask_serverWithoutTrust_jobFailsNamingTheOption_nothingPublished(
    untrusting, hub
) -> None:
    out = hub.root / "refused-out"
    job = _job(untrusting, hub.classifier, out)
    assert job.state == pb.Job.STATE_FAILED
    assert job.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], job.error
    assert _names_the_trust_option(job.error.message), job.error.message
    assert not out.exists()


def test_planPruning_hubBackbone_trustingServer_plansItsChannels(trusting, hub) -> None:
    plan = trusting.PlanPruning(_plan(hub.backbone), timeout=180)
    assert plan.params_after < plan.params_before
    assert any(g.size_after < g.size_before for g in plan.groups)


@pytest.mark.slow  # about a minute on 2 cores: measuring and exporting; planning above is quick
def test_createJob_hubTask_trustingServer_prunesAndPublishes(trusting, hub) -> None:
    out = hub.root / "out"
    job = _job(trusting, hub.classifier, out)
    assert job.state == pb.Job.STATE_SUCCEEDED, job.error.message
    assert job.result.pruned.params < job.result.original.params
    assert (out / "1" / "saved_model.pb").exists()
    archive = out / "1" / "assets.extra" / "secateur" / "model.keras"
    pruned = load_model(str(archive), trusted=tm.TRUSTED)  # what a next prune reads
    assert pruned.count_params() == job.result.pruned.params


def test_serve_trustPackageNotInstalled_exit2AtStartup(tmp_path, capsys) -> None:
    code = serve_main(
        ["--port", "0", "--state-dir", str(tmp_path), "--trust-package", "no_such_package_xyz"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no package 'no_such_package_xyz' is installed" in err
    assert "secateur serve: --trust-package" in err and "Traceback" not in err


def test_worker_trustPackageNotInstalled_exit2AtStartup(capsys) -> None:
    store = "postgresql://secateur@127.0.0.1:1/secateur"  # never reached
    code = worker_main(["--store", store, "--trust-package", "no_such_package_xyz"])
    err = capsys.readouterr().err
    assert code == 2 and "no package 'no_such_package_xyz' is installed" in err
