"""A real Prometheus scrapes a server that ran jobs: gRPC and domain series with values."""

from __future__ import annotations

import grpc

from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from .prometheus_fixture import run_prometheus


def test_prometheus_scrapesServerThatRanAJob(digits_data, tmp_path) -> None:
    opts = ServerOptions(
        state_dir=str(tmp_path / "state"), port=0, metrics_port=0,
        allowed_prefixes=(str(digits_data.root), str(tmp_path / "out")),
    )  # fmt: skip
    with BackgroundServer(opts) as server:
        stub = pbg.PruningServiceStub(grpc.insecure_channel(server.target))
        spec = pb.JobSpec(
            model_uri=digits_data.model_path, output_uri=str(tmp_path / "out"),
            pruning=pb.PruningSpec(ratio=0.5),
            training=pb.TrainingSpec(epochs=0, eval_data=digits_data.eval_file, measure_steps=1),
        )  # fmt: skip
        job = stub.CreateJob(pb.CreateJobRequest(spec=spec))
        final = list(stub.WatchJob(pb.WatchJobRequest(name=job.name), timeout=240))[-1]
        assert final.state == pb.Job.STATE_SUCCEEDED
        # A second job misses its accuracy budget: counted by its result's outcome.
        gated = pb.JobSpec()
        gated.CopyFrom(spec)
        gated.output_uri, gated.pruning.ratio, gated.max_accuracy_drop = (
            str(tmp_path / "out" / "gated"), 0.9, 0.0,
        )  # fmt: skip
        job2 = stub.CreateJob(pb.CreateJobRequest(spec=gated))
        last = list(stub.WatchJob(pb.WatchJobRequest(name=job2.name), timeout=240))[-1]
        assert last.result.outcome == pb.JobResult.OUTCOME_GATE_FAILED, last
        try:
            stub.GetJob(pb.GetJobRequest(name="jobs/missing"))
        except grpc.RpcError:
            pass
        result = last.result  # the figures are the last finished job's
        with run_prometheus([f"127.0.0.1:{server.metrics_port}"], tmp_path / "prom") as prom:

            def one(q: str) -> float:
                return prom.wait_for(q)[0].value

            svc = 'grpc_service="secateur.v1.PruningService"'
            assert (
                one(f'grpc_server_handled_total{{{svc},grpc_method="CreateJob",grpc_code="OK"}}')
                == 2
            )
            assert (
                one(
                    f'grpc_server_handled_total{{{svc},grpc_method="GetJob",grpc_code="NOT_FOUND"}}'
                )
                == 1
            )
            assert one(f'grpc_server_started_total{{{svc},grpc_method="WatchJob"}}') == 2
            assert one(f'grpc_server_handling_seconds_count{{{svc},grpc_method="CreateJob"}}') == 2
            assert one("secateur_jobs_submitted_total") == 2
            assert one('secateur_jobs_completed_total{outcome="succeeded"}') == 1
            assert one('secateur_jobs_completed_total{outcome="gate_failed"}') == 1
            assert one('secateur_jobs_completed_total{outcome="failed"}') == 0
            assert one("secateur_jobs_queued") == 0 and one("secateur_jobs_running") == 0
            assert one('secateur_params{variant="original"}') == result.original.params
            assert one('secateur_params{variant="pruned"}') == result.pruned.params
            assert (
                one('secateur_peak_memory_bytes{variant="pruned"}')
                == result.pruned.peak_memory_bytes
            )
            step = one('secateur_train_step_seconds{variant="pruned"}')
            assert abs(step - result.pruned.train_step_seconds) < 1e-9
            assert one("secateur_params_saved_ratio") > 0.5
            stages = prom.wait_for("secateur_stage_duration_seconds_count")
            assert {s.labels["stage"] for s in stages} >= {"FETCHING", "MEASURING", "EXPORTING"}
            assert one('secateur_build_info{version="0.1.0"}') == 1
            for sample in prom.query('{__name__=~"secateur_.*"}'):
                assert not {"job_id", "name"} & set(sample.labels)
