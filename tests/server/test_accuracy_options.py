"""Issue 12's accuracy options through the request schema and a real job."""

from __future__ import annotations

import grpc
import pytest

from secateur.pruner.modelio import load_model
from secateur.server.errors import ServiceError
from secateur.server.pipeline.convert import job_request
from secateur.server.pipeline.prune_job import PruneJob
from secateur.server.storage import Storage
from secateur.v1 import pruning_pb2 as pb


def _spec(data, out, **training) -> pb.JobSpec:
    return pb.JobSpec(
        model_uri=data.model_path,
        output_uri=str(out),
        pruning=pb.PruningSpec(ratio=0.3),
        training=pb.TrainingSpec(
            train_data=data.train_glob, eval_data=data.eval_file, batch_size=64, **training
        ),
    )


def test_sparsityTraining_job_prunesTheSparsifiedCopy_baselineAndOutputClean(
    digits_data, tmp_path
) -> None:
    spec = _spec(
        digits_data, tmp_path / "out", epochs=0, sparsity_epochs=1, sparsity_lambda=1e-3,
        measure_steps=2,
    )  # fmt: skip
    req = job_request(spec)
    assert (req.train.sparsity_epochs, req.train.sparsity_lambda) == (1, 1e-3)
    events = []
    report = PruneJob(req, Storage(), events.append).run()
    assert any("sparsity training" in e.message for e in events if e.stage == "ANALYZING")
    assert report["train"]["sparsity_epochs"] == 1 and report["train"]["sparsity_lambda"] == 1e-3
    # The measured baseline is the user's model, not the sparsity-trained copy.
    assert report["original"]["accuracy"] == pytest.approx(digits_data.eval_accuracy, abs=1e-3)
    published = load_model(str(tmp_path / "out" / "1" / "assets.extra/secateur/model.keras"))
    assert published.losses == []
    assert all(getattr(layer, "gamma_regularizer", None) is None for layer in published.layers)


def test_sparsityEpochs_withoutTrainData_invalidArgumentNamingTheField(digits_data, tmp_path):
    spec = _spec(digits_data, tmp_path / "out", sparsity_epochs=1)
    spec.training.train_data = ""
    with pytest.raises(ServiceError) as exc:
        job_request(spec)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "sparsity_epochs needs train_data" in exc.value.message
    assert [f for f, _ in exc.value.violations] == ["spec.training.sparsity_epochs"]


def test_distillation_sweep_trainsEachCandidateAgainstOneTeacher(digits_data, tmp_path) -> None:
    spec = _spec(
        digits_data, tmp_path / "out", epochs=1, distill_alpha=0.5, distill_temperature=3.0,
        measure_steps=2,
    )  # fmt: skip
    spec.pruning.ratios.extend([0.2, 0.4])
    req = job_request(spec)
    assert (req.train.distill_alpha, req.train.distill_temperature) == (0.5, 3.0)
    job = PruneJob(req, Storage())
    report = job.run()
    assert report["train"]["distill_alpha"] == 0.5
    assert report["train"]["distill_temperature"] == 3.0
    for c in report["candidates"]:
        assert len(c["history"]["loss"]) == 1 and c["figures"]["accuracy"] > 0.5
    # The teacher is the user's model, frozen, and is not what was measured as the original.
    assert job._teacher is not None and not job._teacher.trainable
    assert report["original"]["accuracy"] == pytest.approx(digits_data.eval_accuracy, abs=1e-3)


def _kept(plan: dict) -> int:
    return sum(g["size_after"] for g in plan["groups"] if g["size_before"] > 1 and not g["frozen"])


def test_iterative_twoRounds_reachOneShotChannelCount_reportEachRound(digits_data, tmp_path):
    spec = _spec(digits_data, tmp_path / "one", epochs=0, measure_steps=2)
    spec.pruning.ratio = 0.5
    one_shot = PruneJob(job_request(spec), Storage()).run()["candidates"][0]
    spec.output_uri = str(tmp_path / "two")
    spec.pruning.iterative_steps = 2
    spec.pruning.iterative_schedule = "geometric"
    req = job_request(spec)
    assert (req.spec.iterative_steps, req.spec.iterative_schedule) == (2, "geometric")
    report = PruneJob(req, Storage()).run()
    [cand] = report["candidates"]
    rounds = cand["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["params"] > rounds[1]["params"] and rounds[0]["flops"] > rounds[1]["flops"]
    assert all(r["accuracy"] is not None for r in rounds)
    assert rounds[1]["params"] == cand["figures"]["params"]
    groups = sum(1 for g in cand["plan"]["groups"] if g["size_before"] > 1 and not g["frozen"])
    assert abs(_kept(cand["plan"]) - _kept(one_shot["plan"])) <= groups
    assert "rounds" not in one_shot


@pytest.mark.slow  # two jobs; every fine-tuning job in the default suite recalibrates
def test_bnRecalibration_onlyTheBatchNormStatisticsDiffer(digits_data, tmp_path) -> None:
    published = {}
    for batches in (0, 3):
        spec = _spec(
            digits_data, tmp_path / f"out{batches}", epochs=1, measure_steps=2,
            bn_recalibration_batches=batches, learning_rate=0.001,
        )  # fmt: skip
        req = job_request(spec)
        assert req.train.bn_recalibration_batches == batches
        report = PruneJob(req, Storage()).run()
        assert report["train"]["bn_recalibration_batches"] == batches
        path = tmp_path / f"out{batches}" / "1" / "assets.extra/secateur/model.keras"
        published[batches] = load_model(str(path))
    off, on = published[0], published[3]
    stats = 0
    for a, b in zip(off.layers, on.layers):
        for wa, wb in zip(a.weights, b.weights):
            if "moving_" in wa.path:
                stats += int(not (wa.numpy() == wb.numpy()).all())
            else:  # the same seed trains the same weights; only the statistics move
                assert (wa.numpy() == wb.numpy()).all(), wa.path
    assert stats > 0


def test_bnRecalibrationBatches_negative_invalidArgumentNamingTheField(digits_data, tmp_path):
    spec = _spec(digits_data, tmp_path / "bad", bn_recalibration_batches=-1)
    with pytest.raises(ServiceError) as exc:
        job_request(spec)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in exc.value.violations] == ["spec.training.bn_recalibration_batches"]
