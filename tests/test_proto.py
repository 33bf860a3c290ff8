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
        "assert pruning_pb2.Job.State.Name(3) == 'SUCCEEDED'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pipelineStages_matchTheContractsStageEnum() -> None:
    from secateur.server.pipeline import STAGES
    from secateur.v1 import pruning_pb2

    assert tuple(pruning_pb2.Job.Stage.keys()[1:]) == STAGES
