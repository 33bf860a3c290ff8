"""--head-ratio: a spec flag like the others, through secateur prune/submit/plan."""

from __future__ import annotations

import json

import pytest

from secateur.cli.main import main
from secateur.cli.options import job_spec
from secateur.cli.outcome import EXIT_BAD_INPUT, EXIT_OK
from secateur.cli.parser import build_parser
from secateur.server.pipeline.convert import job_request

from ..attention_models import image_attention_model


@pytest.fixture(scope="module")
def attn_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("heads") / "attn.keras"
    image_attention_model().save(str(path))
    return str(path)


@pytest.mark.parametrize("command", ["prune", "submit"])
def test_headRatioFlag_setsTheJobSpec_andTheLibrarySpec(command: str) -> None:
    args = build_parser().parse_args([command, "m.keras", "out", "--head-ratio", "0.25"])
    spec = job_spec(args)
    assert spec.pruning.HasField("head_ratio") and spec.pruning.head_ratio == 0.25
    assert job_request(spec).spec.head_ratio == 0.25
    unset = job_spec(build_parser().parse_args([command, "m.keras", "out"]))
    assert not unset.pruning.HasField("head_ratio")
    assert job_request(unset).spec.head_ratio == 0.0


def test_plan_headRatio_printsHeadsApartFromChannels(attn_model, capsys) -> None:
    assert main(["plan", attn_model, "--ratio", "0", "--head-ratio", "0.5"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "attention heads kept: 2 of 4 in 1 layers" in out
    assert main(["plan", attn_model, "--ratio", "0", "--head-ratio", "0.5", "--json"]) == EXIT_OK
    plan = json.loads(capsys.readouterr().out)
    [heads] = [g for g in plan["groups"] if g["kind"] == "heads"]
    assert (heads["origins"], heads["size_before"], heads["size_after"]) == (["mha:heads"], 4, 2)
    assert plan["spec"]["head_ratio"] == 0.5
    assert all(g["size_after"] == g["size_before"] for g in plan["groups"] if g["kind"] != "heads")


def test_plan_headRatioOutOfRange_refusedNamingTheField(attn_model, capsys) -> None:
    assert main(["plan", attn_model, "--head-ratio", "1.5"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "head_ratio must be in [0, 1). Received: head_ratio=1.5" in err
