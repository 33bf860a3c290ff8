"""The end-to-end job: publishing, sweeps, gates, gs://, and input that must fail cleanly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from secateur.pruner import PruneSpec
from secateur.pruner.errors import CancelledError, DataError, ModelLoadError
from secateur.pruner.finetune import TrainConfig
from secateur.pruner.measure import MeasureConfig
from secateur.pruner.modelio import load_model, read_serving_signature, signature_of
from secateur.server.pipeline.convert import job_result
from secateur.server.pipeline.job_request import STAGES, JobRequest
from secateur.server.pipeline.prune_job import GateFailed, PruneJob
from secateur.server.storage import (
    Storage,
    StorageExistsError,
    StorageNotFoundError,
    StoragePermissionError,
)
from secateur.v1 import pruning_pb2 as pb

QUICK = MeasureConfig(warmup_steps=1, steps=2, rounds=1, latency_runs=2)


def _request(data, out, **kw) -> JobRequest:
    defaults = dict(
        model_uri=data.model_path,
        output_uri=str(out),
        spec=PruneSpec(ratio=0.3),
        train=TrainConfig(epochs=1, batch_size=64),
        train_data=data.train_glob,
        eval_data=data.eval_file,
        measure=QUICK,
    )
    return JobRequest(**(defaults | kw))


def _tree(path) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
    )


def test_job_publishesServingVersionWithArchiveAndReport(digits_data, tmp_path) -> None:
    events = []
    report = PruneJob(_request(digits_data, tmp_path / "out"), Storage(), events.append).run()
    version = tmp_path / "out" / "1"
    assert report["output_uri"] == str(version)
    files = _tree(version)
    assert "saved_model.pb" in files and "assets.extra/secateur/model.keras" in files
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".tmp")]
    published = json.loads((version / "assets.extra/secateur/report.json").read_text())
    assert published["candidates"][0]["plan"] == report["candidates"][0]["plan"]
    for section in ("original", "candidates"):
        assert section in report
    pruned = report["candidates"][0]["figures"]
    original = report["original"]
    for key in ("params", "weight_bytes", "flops", "peak_memory_bytes"):
        assert pruned[key] < original[key], key
    # Step time is measured, not compared: on a loaded 2-core machine a few timed
    # steps cannot order two small models (benchmarks/measure.py compares them).
    assert pruned["train_step_seconds"] > 0 and original["train_step_seconds"] > 0
    assert original["accuracy"] == pytest.approx(digits_data.eval_accuracy, abs=1e-3)
    layout = report["layout"]
    assert layout["device"] == "CPU" and layout["tile"] == [1, 16]
    rows = layout["variants"]["ratio=0.3"]
    assert all(r["padded_params"] >= r["params"] for r in rows)
    assert sum(r["params"] for r in rows) == pruned["params"]
    assert 0 <= pruned["accuracy"] <= 1
    # Every accuracy carries its evaluation set size and 95% Wilson interval.
    for figures in (original, pruned):
        assert figures["eval_examples"] == 397
        assert figures["accuracy_ci_low"] < figures["accuracy"] < figures["accuracy_ci_high"]
    assert "95% CI [" in report["decision"] and "n=397" in report["decision"]
    # The loop as it ran on this CPU, "auto" settings resolved.
    assert report["fine_tuning"] == {
        "steps_per_execution": 1,
        "mixed_precision": "off",
        "xla": False,
        "steps_per_epoch": 22,
        "data_cache": "in memory when decoded it fits 256 MiB",
    }
    assert events[0].stage == "FETCHING"
    assert {e.stage for e in events} == set(STAGES)
    # The published model serves with the original's keys and can be pruned again.
    original_model = load_model(digits_data.model_path)
    assert (
        read_serving_signature(str(version)).inputs[0].name
        == signature_of(original_model).inputs[0].name
    )
    again = load_model(str(version))
    assert again.count_params() == pruned["params"]
    second = PruneJob(
        _request(digits_data, tmp_path / "out", model_uri=str(version)), Storage()
    ).run()
    assert second["output_uri"] == str(tmp_path / "out" / "2")


def test_job_sweepWithBudget_publishesLargestRatioWithin_andWritesCurves(
    digits_data, tmp_path
) -> None:
    # Without fine-tuning this small net loses most of its accuracy once
    # live channels go, while ratio 0 loses nothing: only 0 is within budget.
    req = _request(
        digits_data, tmp_path / "out", ratios=(0.9, 0.0, 0.3), max_accuracy_drop=0.05,
        train=TrainConfig(epochs=0, batch_size=64),
    )  # fmt: skip
    report = PruneJob(req, Storage()).run()
    drops = {c["ratio"]: c["accuracy_drop"] for c in report["candidates"]}
    assert drops[0.0] == 0.0 and drops[0.3] > 0.05 and drops[0.9] > 0.05
    assert report["selected_ratio"] == 0.0 and report["outcome"] == "published"
    assert report["best_ratio"] == 0.0 and report["best_accuracy_drop"] == 0.0
    assert report["ratios"] == [0.0, 0.3, 0.9]
    assets = tmp_path / "out" / "1" / "assets.extra" / "secateur"
    rows = (assets / "curves.csv").read_text().splitlines()
    assert rows[0].startswith("ratio,accuracy") and len(rows) == 5  # header, unpruned, 3 ratios
    assert (assets / "curves.png").read_bytes()[:4] == b"\x89PNG"
    params = [float(r.split(",")[3]) for r in rows[1:]]
    assert params == sorted(params, reverse=True)


def test_job_gateFails_nothingPublished(digits_data, tmp_path) -> None:
    req = _request(
        digits_data, tmp_path / "out", spec=PruneSpec(ratio=0.9), max_accuracy_drop=0.0,
        train=TrainConfig(epochs=0, batch_size=64),
    )  # fmt: skip
    with pytest.raises(GateFailed) as info:
        PruneJob(req, Storage()).run()
    report = info.value.report
    assert "nothing published" in report["decision"] and report["outcome"] == "gate_failed"
    assert report["best_ratio"] == 0.9 and report["best_accuracy_drop"] > 0.0
    assert report["selected_ratio"] is None
    # The closest miss is stated with its interval; 397 examples cannot resolve a zero budget.
    assert "(closest: ratio 0.9, drop " in report["decision"] and "n=397)" in report["decision"]
    assert report["warnings"] == [
        w for w in report["warnings"] if "evaluation set (397 examples) is too small" in w
    ]
    assert "warning: the evaluation set (397 examples)" in report["decision"]
    result = job_result(report)  # what a job's result says: data, not a sentence
    assert result.outcome == pb.JobResult.OUTCOME_GATE_FAILED
    o = result.original
    assert o.eval_examples == 397 and o.accuracy_ci_low < o.accuracy < o.accuracy_ci_high
    assert (result.max_accuracy_drop, result.best_ratio) == (0.0, 0.9)
    assert not result.HasField("selected_ratio") and not result.output_uri
    assert not (tmp_path / "out").exists() or _tree(tmp_path / "out") == []


def test_job_sweepWithoutBudget_reportsCurvesOnly(digits_data, tmp_path) -> None:
    req = _request(digits_data, tmp_path / "out", ratios=(0.2, 0.4), train=TrainConfig(epochs=0))
    report = PruneJob(req, Storage()).run()
    assert report["output_uri"] is None and "curves only" in report["decision"]
    assert report["outcome"] == "curves_only" and report["best_ratio"] is None


@pytest.mark.parametrize(
    "change,error",
    [
        (lambda d, t: {"model_uri": str(t / "missing.keras")}, StorageNotFoundError),
        (lambda d, t: {"version": 1}, StorageExistsError),
        (lambda d, t: {"model_uri": _corrupt(t)}, ModelLoadError),
        (lambda d, t: {"train_data": _wrong_shape(t)}, DataError),
    ],
)
def test_job_badInput_failsBeforeWriting(digits_data, tmp_path, change, error) -> None:
    out = tmp_path / "out"
    (out / "1").mkdir(parents=True)
    (out / "1" / "keep").write_text("existing version")
    with pytest.raises(error):
        PruneJob(_request(digits_data, out, **change(digits_data, tmp_path)), Storage()).run()
    assert _tree(out) == ["1/keep"]


def test_job_outsideAllowList_permissionDenied(digits_data, tmp_path) -> None:
    storage = Storage([str(tmp_path / "allowed")])
    with pytest.raises(StoragePermissionError):
        PruneJob(_request(digits_data, tmp_path / "elsewhere"), storage).run()


def test_job_cancelledDuringFineTuning_leavesNothing(digits_data, tmp_path) -> None:
    seen = []

    def on_event(e):
        seen.append(e.stage)

    job = PruneJob(
        _request(digits_data, tmp_path / "out"), Storage(), on_event,
        should_cancel=lambda: "FINE_TUNING" in seen,
    )  # fmt: skip
    with pytest.raises(CancelledError):
        job.run()
    assert not (tmp_path / "out").exists() or _tree(tmp_path / "out") == []


def test_job_gcsModelDataAndOutput_endToEnd(digits_data, gcs_client, gcs_bucket, tmp_path) -> None:
    bucket = gcs_client.bucket(gcs_bucket)
    bucket.blob("models/vgg.keras").upload_from_filename(digits_data.model_path)
    for name in ("train-0.tfrecord", "train-1.tfrecord", "eval.tfrecord"):
        bucket.blob(f"data/{name}").upload_from_filename(str(digits_data.root / name))
    base = f"gs://{gcs_bucket}"
    req = _request(
        digits_data, f"{base}/served/digits", model_uri=f"{base}/models/vgg.keras",
        train_data=f"{base}/data/train-*.tfrecord", eval_data=f"{base}/data/eval.tfrecord",
    )  # fmt: skip
    report = PruneJob(req, Storage([base])).run()
    assert report["output_uri"] == f"{base}/served/digits/1"
    names = {b.name for b in gcs_client.list_blobs(gcs_bucket, prefix="served/")}
    assert "served/digits/1/saved_model.pb" in names
    assert "served/digits/1/assets.extra/secateur/model.keras" in names
    assert not [n for n in names if "/.tmp-" in n]


def test_jobRequest_validation() -> None:
    from secateur.pruner.errors import InvalidSpecError

    with pytest.raises(InvalidSpecError, match="eval_data"):
        JobRequest("m.keras", "out", max_accuracy_drop=0.1)
    with pytest.raises(InvalidSpecError, match=r"ratio=1\.5"):
        JobRequest("m.keras", "out", ratios=(0.1, 1.5))


def _corrupt(tmp_path) -> str:
    path = tmp_path / "corrupt.keras"
    path.write_bytes(b"PK\x03\x04 truncated")
    return str(path)


def _wrong_shape(tmp_path) -> str:
    from secateur.pruner.data import write_examples

    path = str(tmp_path / "small.tfrecord")
    write_examples(path, np.zeros((4, 16, 16, 3)), np.zeros(4))
    return path


def _stated_report(n: int, original: float, pruned: float) -> dict:
    def figures(accuracy: float) -> dict:
        return {"accuracy": round(accuracy * n) / n, "eval_examples": n}

    return {
        "original": figures(original),
        "candidates": [
            {"ratio": 0.5, "figures": figures(pruned), "accuracy_drop": original - pruned}
        ],
    }


def test_choose_statesTheDropWithItsInterval_warnsWhenTheEvalSetIsTooSmall(tmp_path) -> None:
    from secateur.server.pipeline.report import choose

    req = JobRequest(model_uri="m", output_uri=str(tmp_path), eval_data="e", max_accuracy_drop=0.01)
    big = _stated_report(10_000, 0.931, 0.923)
    assert choose(big, req) is big["candidates"][0]
    assert big["decision"] == (
        "ratio 0.5 is the largest within max_accuracy_drop=0.01 "
        "(drop 0.8 pt, 95% CI [0.1, 1.5], n=10000)"
    )
    assert "warnings" not in big
    small = _stated_report(360, 0.931, 0.925)
    choose(small, req)
    assert small["warnings"] == [
        "the evaluation set (360 examples) is too small to resolve max_accuracy_drop=0.01: "
        "the drop's 95% CI half-width is 3.9 pt"
    ]
    assert small["decision"].endswith("; warning: " + small["warnings"][0])
