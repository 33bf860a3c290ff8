"""`secateur prune --target-*`: flags and spec-file keys of the one schema become
the library's Targets; a target with a ratio is refused naming the field."""

from __future__ import annotations

import json

from secateur.cli.local import build_request
from secateur.cli.main import main
from secateur.cli.options import job_spec
from secateur.cli.parser import build_parser
from secateur.pruner.targets import Targets


def _args(*words: str):
    return build_parser().parse_args(["prune", "m.keras", "out", *words])


def test_targetFlags_becomeTheLibrarysTargets_withoutARatio() -> None:
    args = _args("--target-step-time", "0.6", "--target-max-params", "120000",
                 "--target-tolerance", "0.05")  # fmt: skip
    spec = job_spec(args)
    assert spec.pruning.targets.step_time == 0.6 and spec.pruning.targets.max_params == 120000
    assert not spec.pruning.HasField("ratio")
    request = build_request(args)
    assert request.spec.targets == Targets(step_time=0.6, max_params=120000, tolerance=0.05)
    assert "ratio" not in request.spec.to_dict()


def test_targetKeys_inASpecFile_sameAsFlags(tmp_path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("target_flops: 0.5\ntarget_latency_ms: 4.5\ntarget_latency_batch: 8\n")
    from_file = job_spec(_args("--spec", str(spec_file)))
    flags = job_spec(_args("--target-flops", "0.5", "--target-latency-ms", "4.5",
                           "--target-latency-batch", "8"))  # fmt: skip
    assert from_file == flags
    assert build_request(_args("--spec", str(spec_file))).spec.targets == Targets(
        flops=0.5, latency_ms=4.5, latency_batch=8
    )


def test_targetWithRatio_refusedNamingTheRatio(capsys) -> None:
    assert main(["prune", "m.keras", "out", "--ratio", "0.4", "--target-params", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "ratio cannot be combined with targets" in err and "Received: ratio=0.4" in err
    assert main(["prune", "m.keras", "out", "--target-step-time", "2"]) == 2
    err = capsys.readouterr().err
    assert "step_time must be a finite number in (0, 1]. Received: step_time=2.0" in err


def test_plan_targetFlag_localPlanMeetsTheCountedTarget(digits_data, capsys) -> None:
    assert main(["plan", digits_data.model_path, "--target-flops", "0.5", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["flops_after"] <= 0.5 * plan["flops_before"]
    assert plan["targets"][0]["metric"] == "flops" and plan["targets"][0]["met"]
