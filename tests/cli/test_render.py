"""What the command prints: the before/after table (units, drop, spread) and the plan."""

from __future__ import annotations

import pytest

from secateur.cli.plan import format_plan
from secateur.cli.render import format_table, human, jobs_table

HOW = {
    "device": "CPU (x86)",
    "batch_size": 32,
    "steps": 10,
    "warmup_steps": 3,
    "xla": False,
    "memory": "allocator peak",
}
ORIGINAL = {
    "params": 14_987_722,
    "weight_bytes": 59_950_888,
    "flops": 313_000_000,
    "peak_memory_bytes": 812_000_000,
    "train_step_seconds": 0.0132,
    "train_step_p10_seconds": 0.0121,
    "train_step_p90_seconds": 0.0149,
    "latency_batch1_seconds": 0.00042,
    "latency_batch_seconds": 0.0031,
    "accuracy": 0.9861,
    "how": HOW,
}
PRUNED = ORIGINAL | {
    "params": 5_000_000,
    "weight_bytes": 20_000_000,
    "flops": 100_000_000,
    "peak_memory_bytes": 300_000_000,
    "train_step_seconds": 0.0145,
    "train_step_p10_seconds": 0.0118,
    "train_step_p90_seconds": 0.0161,
    "latency_batch1_seconds": 0.000385,
    "latency_batch_seconds": 0.0012,
    "accuracy": 0.9583,
}


def test_table_adaptiveUnits_dropAgainstTheBudget_andStepSpread() -> None:
    report = {
        "original": ORIGINAL,
        "candidates": [
            {"ratio": 0.3, "figures": PRUNED, "accuracy_drop": 0.0278},
            # A report from before p10 was measured: the spread is n/a, not 0.
            {"ratio": 0.5, "figures": PRUNED | {"train_step_p10_seconds": 0.0},
             "accuracy_drop": -0.001},
        ],
        "max_accuracy_drop": 0.02,
        "decision": "published ratio 0.5",
        "output_uri": "/srv/model/1",
    }  # fmt: skip
    assert format_table(report) == "\n".join(
        [
            "metric                    original            pruned 0.3         pruned 0.5",
            "───────────────────────────────────────────────────────────────────────────",
            "params                       15.0M         5.00M (0.33x)      5.00M (0.33x)",
            "weight bytes              57.2 MiB      19.1 MiB (0.33x)   19.1 MiB (0.33x)",
            "FLOPs/example                 313M          100M (0.32x)       100M (0.32x)",
            "peak train memory          774 MiB       286 MiB (0.37x)    286 MiB (0.37x)",
            "train step (median)        13.2 ms       14.5 ms (1.10x)    14.5 ms (1.10x)",
            "train step p10-p90    12.1-14.9 ms          11.8-16.1 ms                n/a",
            "latency batch 1             420 µs        385 µs (0.92x)     385 µs (0.92x)",
            "latency batch              3.10 ms       1.20 ms (0.39x)    1.20 ms (0.39x)",
            "top-1 accuracy              0.9861                0.9583             0.9583",
            "accuracy drop                    -   +0.0278 (over 0.02)            -0.0010",
            "measured on CPU (x86) batch 32, 10 timed steps after 3 warm-up, xla=False; "
            "memory: allocator peak",
            "decision: published ratio 0.5",
            "published: /srv/model/1",
        ]
    )


def test_table_listsTheExportsPublishedInTheVersion() -> None:
    entry = {"format": "onnx", "file": "model.onnx", "bytes": 934_195, "samples": 4}
    report = {
        "original": ORIGINAL,
        "candidates": [{"ratio": 0.3, "figures": PRUNED, "accuracy_drop": 0.01}],
        "output_uri": "/srv/model/1",
        "exports": [entry | {"max_abs_diff": 8.94e-07}],
    }
    assert format_table(report).endswith(
        "published: /srv/model/1\n  with assets.extra/secateur/model.onnx "
        "(onnx, 912 KiB, max abs diff 8.9e-07 vs Keras on 4 inputs)"
    )


def test_table_unmeasuredFigures_sayNA() -> None:
    figures = ORIGINAL | {"peak_memory_bytes": None, "accuracy": None}
    report = {
        "original": figures,
        "candidates": [{"ratio": 0.2, "figures": figures, "accuracy_drop": None}],
        "decision": "no budget",
    }
    rows = {line[:20].strip(): line[20:].split() for line in format_table(report).splitlines()}
    assert rows["peak train memory"] == ["n/a", "n/a"]
    assert rows["top-1 accuracy"] == ["n/a", "n/a"]
    assert rows["accuracy drop"] == ["-", "n/a"]


@pytest.mark.parametrize(
    ("value", "kind", "shown"),
    [
        (0, "bytes", "0 B"),
        (1023, "bytes", "1023 B"),
        (1024, "bytes", "1.00 KiB"),
        (1536, "bytes", "1.50 KiB"),
        (5 * 2**30 + 2**29, "bytes", "5.50 GiB"),
        (999, "count", "999"),
        (1000, "count", "1.00K"),
        (138_357_544, "count", "138M"),
        (15_470_000_000, "count", "15.5G"),
        (2.5, "s", "2.50 s"),
        (0.5, "s", "500 ms"),
        (0.0132, "s", "13.2 ms"),
        (0.000042, "s", "42.0 µs"),
        (0.98765, "acc", "0.9877"),
        (None, "s", "n/a"),
    ],
)
def test_human_picksTheUnitBySize(value, kind, shown) -> None:
    assert human(value, kind) == shown


PLAN = {
    "model_name": "tiny",
    "spec": {"ratio": 0.5, "criterion": "bn_scale", "scope": "global"},
    "round_to": 2,
    "params_before": 58_676,
    "params_after": 15_117,
    "flops_before": 2_654_292,
    "flops_after": 718_900,
    "groups": [
        {"id": 0, "origins": ["input:image"], "size_before": 3, "size_after": 3,
         "criterion": None, "frozen": ["touches model input"]},
        {"id": 1, "origins": ["block1_conv1"], "size_before": 4, "size_after": 2,
         "criterion": "bn_scale", "frozen": []},
        {"id": 2, "origins": ["block1_conv2", "add"], "size_before": 32, "size_after": 16,
         "criterion": "l1", "frozen": []},
        {"id": 3, "origins": ["logits"], "size_before": 10, "size_after": 10,
         "criterion": None, "frozen": ["touches model output"]},
    ],
}  # fmt: skip


def test_plan_groupsTotalsAndFrozenReasons() -> None:
    assert format_plan(PLAN) == "\n".join(
        [
            "plan for tiny: ratio 0.5, criterion bn_scale, scope global, round to 2",
            "group   layers              kept/total   criterion",
            "──────────────────────────────────────────────────",
            "0       input:image                3/3      frozen",
            "1       block1_conv1               2/4    bn_scale",
            "2       block1_conv2, add        16/32          l1",
            "3       logits                   10/10      frozen",
            "channels kept: 18 of 36 prunable in 2 of 4 groups",
            "params: 58.7K -> 15.1K (0.26x)",
            "FLOPs/example: 2.65M -> 719K (0.27x)",
            "prunable: 73% of channels",
            "frozen: touches model output (10 channels, 1 group)",
            "frozen: touches model input (3 channels, 1 group)",
        ]
    )


def test_plan_showsTheReportItCarries_topFiveReasons() -> None:
    reasons = [
        {
            "reason": f"Block{i}: layer class is not in the registry",
            "channels": 100 - i,
            "groups": 2,
            "example": f"layer 'b{i}' (Block{i}): layer class is not in the registry",
        }
        for i in range(7)
    ]
    text = format_plan({**PLAN, "prunable_share": 0.25, "frozen_reasons": reasons})
    lines = text.splitlines()
    assert lines[-7:] == [
        "prunable: 25% of channels",
        *(
            f"frozen: Block{i}: layer class is not in the registry ({100 - i} channels, 2 groups)"
            for i in range(5)
        ),
        "frozen: 2 more reasons (--json lists them)",
    ]


def test_jobsTable_hasNoRuleAndOneLinePerJob() -> None:
    from secateur.v1 import pruning_pb2 as pb

    jobs = [
        pb.Job(name="jobs/a", state=pb.Job.STATE_RUNNING, stage=pb.Job.STAGE_MEASURING,
               progress=0.8, spec=pb.JobSpec(model_uri="/m.keras")),
        pb.Job(name="jobs/b", state=pb.Job.STATE_QUEUED),
    ]  # fmt: skip
    lines = jobs_table(jobs).splitlines()
    assert lines[0].split() == ["NAME", "STATE", "STAGE", "PROGRESS", "MODEL", "CREATED"]
    assert len(lines) == 3 and lines[1].split()[0] == "jobs/a" and lines[2].split()[0] == "jobs/b"
    assert lines[1].split()[3:] == ["80%", "/m.keras", "-"]


def test_table_accuracyWithItsIntervalAndEvalSetSize() -> None:
    interval = {"accuracy_ci_low": 0.9014, "accuracy_ci_high": 0.9538, "eval_examples": 360}
    figures = ORIGINAL | {"accuracy": 335 / 360} | interval
    report = {
        "original": figures,
        "candidates": [{"ratio": 0.2, "figures": figures, "accuracy_drop": 0.0}],
        "decision": "published",
    }
    line = next(ln for ln in format_table(report).splitlines() if ln.startswith("top-1"))
    assert line.split()[2:] == ["93.1%", "±2.6", "(n=360)", "93.1%", "±2.6", "(n=360)"]


def test_formatTargets_wantedPredictedMeasured_andHowEachWasMeasured() -> None:
    from secateur.cli.render import format_targets

    text = format_targets(
        [
            {"metric": "step_time", "wanted": 0.6, "predicted": 0.571, "measured": 0.59,
             "remeasured": 0.62, "met": True,
             "how": {"device": "CPU (cpu:0)", "batch_size": 32, "xla": False, "timed_steps": 8,
                     "tolerance": 0.02, "profile_measurements": 40, "profile_seconds": 61.5,
                     "profile_cached": True, "rounds": 2}},
            {"metric": "params", "wanted": 120000, "wanted_absolute": True, "predicted": 0.4,
             "measured": 0.45, "met": True, "how": {"method": "counted from the plan (exact)"}},
        ]
    )  # fmt: skip
    lines = text.splitlines()
    assert lines[0].split() == ["target", "wanted", "predicted", "measured", "after", "fine-tune",
                                "met"]  # fmt: skip
    assert lines[2].split() == ["step_time", "0.600", "0.571", "0.590", "0.620", "yes"]
    assert "120000 (abs)" in text and "params: counted from the plan (exact)" in text
    assert "profile of 40 variants in 61.5 s (cached), 2 round(s)" in text


@pytest.mark.parametrize(
    ("extra", "shown"),
    [
        ({"profile_processes": 3}, "61.5 s in 3 child process(es), 2 round(s)"),
        ({"profile_processes": 1, "profile_isolation_failed": "exit status 1: boom"},
         "61.5 s in 1 child process(es) (its child processes failed: measured in the job's "
         "process), 2 round(s)"),
        ({"profile_processes": 0}, "61.5 s, 2 round(s)"),
    ],
)  # fmt: skip
def test_formatTargets_freshProfile_saysWhereItWasMeasured(
    extra: dict[str, object], shown: str
) -> None:
    from secateur.cli.render import format_targets

    how = {"device": "CPU (cpu:0)", "batch_size": 32, "xla": False, "timed_steps": 8,
           "tolerance": 0.02, "profile_measurements": 40, "profile_seconds": 61.5,
           "profile_cached": False, "rounds": 2} | extra  # fmt: skip
    text = format_targets(
        [{"metric": "step_time", "wanted": 0.6, "predicted": 0.57, "measured": 0.59, "met": True,
          "how": how}]
    )  # fmt: skip
    assert shown in text
