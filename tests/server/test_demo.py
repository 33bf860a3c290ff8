"""The embedded default job runs end to end on bundled data."""

from __future__ import annotations

import os

from secateur.server.demo import DemoConfig, run_demo


def test_demo_trainsPrunesAndPublishes(tmp_path) -> None:
    cfg = DemoConfig(
        workdir=str(tmp_path), ratios=(0.3,), width=0.125, pretrain_epochs=3,
        finetune_epochs=1, max_accuracy_drop=1.0,
    )  # fmt: skip
    report = run_demo(cfg, log=lambda _m: None)
    assert report["original"]["accuracy"] > 0.5  # real learning on real digits
    assert report["pruned"]["params"] < report["original"]["params"]
    assert os.path.exists(os.path.join(tmp_path, "served", "1", "saved_model.pb"))
