"""The embedded default: train on bundled data, serve in-process, prune through gRPC."""

from __future__ import annotations

import os

from secateur.cli.demo import DemoConfig, run_demo
from secateur.v1 import pruning_pb2 as pb


def test_demo_trainsServesAndPrunesThroughGrpc(tmp_path) -> None:
    cfg = DemoConfig(
        workdir=str(tmp_path), ratios=(0.3,), width=0.125, pretrain_epochs=3,
        finetune_epochs=1, max_accuracy_drop=1.0,
    )  # fmt: skip
    updates: list[pb.Job] = []
    job = run_demo(cfg, on_update=updates.append, log=lambda _m: None)
    assert job.state == pb.Job.STATE_SUCCEEDED, job.error
    assert any(u.state == pb.Job.STATE_RUNNING for u in updates)
    assert job.result.original.accuracy > 0.5  # real learning on real digits
    assert job.result.pruned.params < job.result.original.params
    assert os.path.exists(os.path.join(tmp_path, "served", "1", "saved_model.pb"))
