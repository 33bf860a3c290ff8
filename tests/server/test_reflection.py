"""Generic gRPC clients decode our errors' details through server reflection.

The service answers bad input with google.rpc.Status details (BadRequest
field violations); reflection serves google/rpc/error_details.proto so a
client that knows nothing of Secateur (buf curl, grpcurl) can decode them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from secateur.server.api.service import BackgroundServer, ServerOptions

from ..test_buf_lint import buf_command


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[BackgroundServer]:
    state = tmp_path_factory.mktemp("reflection") / "state"
    with BackgroundServer(ServerOptions(state_dir=str(state), port=0)) as s:
        yield s


def test_reflection_servesErrorDetailsAndStatus(server: BackgroundServer) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        details = db.FindFileContainingSymbol("google.rpc.BadRequest")
        assert details.name == "google/rpc/error_details.proto"
        assert db.FindFileByName("google/rpc/status.proto").package == "google.rpc"
        contract = db.FindFileContainingSymbol("secateur.v1.PruningService")
        assert "google/rpc/status.proto" in contract.dependency


def test_bufCurl_getsTheTypedBadRequestDetailOfARefusedJob(server: BackgroundServer) -> None:
    """A client that knows nothing of Secateur gets the detail's type name and bytes.

    (buf curl 1.75 prints details as type + base64; decoding them needs the
    type, which reflection serves: the test above.)
    """
    import base64

    from google.rpc import error_details_pb2

    request = {"spec": {"model_uri": "m.keras", "output_uri": "out", "pruning": {"ratio": 1.5}}}
    proc = subprocess.run(
        [
            buf_command(), "curl", "--protocol", "grpc", "--http2-prior-knowledge",
            "--data", json.dumps(request),
            f"http://{server.target}/secateur.v1.PruningService/CreateJob",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout
    error = json.loads(proc.stderr)
    assert error["code"] == "invalid_argument", error
    (detail,) = error["details"]
    assert detail["type"] == "google.rpc.BadRequest", detail
    raw = base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
    (violation,) = error_details_pb2.BadRequest.FromString(raw).field_violations
    assert violation.field == "spec.pruning.ratio"
    assert "Received: ratio=1.5" in violation.description
