"""ListJobs paging on loopback: tamper-evident tokens, a stable order under inserts."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

Job = pb.Job


def _options(digits_data, tmp_path: Path) -> ServerOptions:
    # No runner: created jobs stay QUEUED, so listing them costs no worker.
    return ServerOptions(
        state_dir=str(tmp_path / "state"),
        port=0,
        allowed_prefixes=(str(digits_data.root), str(tmp_path / "out")),
        max_concurrent_jobs=0,
        max_queued_jobs=1000,
    )


@pytest.fixture
def server(digits_data, tmp_path) -> Iterator[BackgroundServer]:
    with BackgroundServer(_options(digits_data, tmp_path)) as s:
        yield s


def _create(stub: pbg.PruningServiceStub, digits_data, tmp_path: Path, n: int) -> list[str]:
    spec = pb.JobSpec(
        model_uri=digits_data.model_path,
        output_uri=str(tmp_path / "out"),
        pruning=pb.PruningSpec(ratio=0.3),
        training=pb.TrainingSpec(epochs=0, eval_data=digits_data.eval_file, measure_steps=1),
    )
    return [stub.CreateJob(pb.CreateJobRequest(spec=spec)).name for _ in range(n)]


def _names(response: pb.ListJobsResponse) -> list[str]:
    return [j.name for j in response.jobs]


def _refusal(call) -> tuple[grpc.RpcError, list[str]]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    status = rpc_status.from_call(info.value)
    fields = []
    for detail in status.details if status else []:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            fields += [v.field for v in br.field_violations]
    return info.value, fields


def test_pages_neverRepeatOrSkip_whenJobsAreCreatedBetweenPages(
    server, digits_data, tmp_path
) -> None:
    stub = pbg.PruningServiceStub(grpc.insecure_channel(server.target))
    first = _create(stub, digits_data, tmp_path, 7)
    newest_first = list(reversed(first))
    page = stub.ListJobs(pb.ListJobsRequest(page_size=3))
    seen = _names(page)
    assert seen == newest_first[:3] and page.next_page_token
    later = _create(stub, digits_data, tmp_path, 2)  # an offset token would now repeat 2 jobs
    while page.next_page_token:
        page = stub.ListJobs(pb.ListJobsRequest(page_size=3, page_token=page.next_page_token))
        assert len(page.jobs) <= 3
        seen += _names(page)
    assert seen == newest_first  # every job once, in order; the newer ones start a new listing
    everything = stub.ListJobs(pb.ListJobsRequest(page_size=0))  # 0: the default size
    assert _names(everything) == list(reversed(first + later))
    assert not everything.next_page_token


def test_pageToken_survivesRestart_andIsBoundToItsFilter(digits_data, tmp_path) -> None:
    opts = _options(digits_data, tmp_path)
    with BackgroundServer(opts) as s:
        stub = pbg.PruningServiceStub(grpc.insecure_channel(s.target))
        names = _create(stub, digits_data, tmp_path, 3)
        token = stub.ListJobs(
            pb.ListJobsRequest(page_size=2, state=Job.STATE_QUEUED)
        ).next_page_token
    with BackgroundServer(opts) as s:
        stub = pbg.PruningServiceStub(grpc.insecure_channel(s.target))
        rest = stub.ListJobs(
            pb.ListJobsRequest(page_size=2, state=Job.STATE_QUEUED, page_token=token)
        )
        assert _names(rest) == names[:1] and not rest.next_page_token
        err, fields = _refusal(
            lambda: stub.ListJobs(pb.ListJobsRequest(state=Job.STATE_FAILED, page_token=token))
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and fields == ["page_token"]
        assert "state=QUEUED" in err.details()


def test_forgedGarbledOrHugeTokens_invalidArgument(server, digits_data, tmp_path) -> None:
    stub = pbg.PruningServiceStub(grpc.insecure_channel(server.target))
    _create(stub, digits_data, tmp_path, 3)
    real = stub.ListJobs(pb.ListJobsRequest(page_size=1)).next_page_token
    tampered = real[:-2] + ("A" if real[-2] != "A" else "B") + real[-1]
    huge = "A" * 100_000
    for token in (
        base64.urlsafe_b64encode(b"-3").decode(),  # an offset token of the old scheme
        base64.urlsafe_b64encode(b"1").decode(),
        "!!not base64!!",
        "A",
        tampered,
        real + "AAAA",
        huge,
    ):
        err, fields = _refusal(lambda t=token: stub.ListJobs(pb.ListJobsRequest(page_token=t)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, token[:40]
        assert fields == ["page_token"] and "Received:" in err.details()
        assert len(err.details()) < 600  # a huge token is not echoed in full
    assert len(_names(stub.ListJobs(pb.ListJobsRequest(page_size=1, page_token=real)))) == 1
