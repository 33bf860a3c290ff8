"""The committed generated code is exactly what grpcio-tools makes from the .proto."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATED = ["pruning_pb2.py", "pruning_pb2.pyi", "pruning_pb2_grpc.py"]


def test_generatedCode_matchesProto(tmp_path) -> None:
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
    )
    committed = os.path.join(ROOT, "proto", "secateur", "v1")
    fresh = tmp_path / "secateur" / "v1"
    for name in GENERATED:
        assert filecmp.cmp(fresh / name, os.path.join(committed, name), shallow=False), (
            f"{name} is stale: run python tools/gen_proto.py"
        )


def test_contract_importsWithoutTensorflow() -> None:
    code = (
        "import sys\n"
        "from secateur.v1 import pruning_pb2, pruning_pb2_grpc\n"
        "assert 'tensorflow' not in sys.modules\n"
        "assert pruning_pb2.Job.State.Name(3) == 'STATE_SUCCEEDED'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pipelineStages_matchTheContractsStageEnum() -> None:
    from secateur.server.pipeline.job_request import STAGES
    from secateur.v1 import pruning_pb2

    names = pruning_pb2.Job.Stage.keys()[1:]
    assert tuple(n.removeprefix("STAGE_") for n in names) == STAGES


def test_criteria_theRegistryAndTheContractEnumAgree() -> None:
    """Criterion names have one source, the pruner's registry; the enum spells them."""
    from secateur.pruner.scoring import criteria
    from secateur.v1 import enums, pruning_pb2

    assert tuple(n.lower() for n in enums.short_names(pruning_pb2.Criterion)) == criteria()


def test_scopesAndOutcomes_matchTheLibrarysNames() -> None:
    from secateur.pruner.spec import SCOPES
    from secateur.server.pipeline.report import OUTCOMES
    from secateur.v1 import enums, pruning_pb2

    assert tuple(n.lower() for n in enums.short_names(pruning_pb2.Scope)) == SCOPES
    assert tuple(n.lower() for n in enums.OUTCOMES) == OUTCOMES


def test_metricsFields_areTheFiguresTheLibraryMeasures() -> None:
    """Figure names come from the Metrics descriptor; the library's Figures has them all."""
    import dataclasses

    from secateur.client.protospec import FIGURE_TYPES
    from secateur.pruner.measure import Figures
    from secateur.v1 import pruning_pb2

    names = [f.name for f in pruning_pb2.Metrics.DESCRIPTOR.fields if f.name != "how"]
    assert list(FIGURE_TYPES) == names
    assert set(names) <= {f.name for f in dataclasses.fields(Figures)}


def test_enums_everyValueIsPrefixedWithItsEnumName() -> None:
    """buf's ENUM_VALUE_PREFIX, checked without buf: short names round-trip."""
    from secateur.v1 import enums, pruning_pb2

    for enum in (pruning_pb2.Criterion, pruning_pb2.Scope, pruning_pb2.Job.State,
                 pruning_pb2.Job.Stage, pruning_pb2.JobResult.Outcome):  # fmt: skip
        for short in enums.short_names(enum):
            number = enums.from_short_name(enum, short.lower())
            assert enums.short_name(enum, number) == short
