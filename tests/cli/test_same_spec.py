"""`secateur prune` and `secateur submit` build the same JobSpec, for every flag.

Both take their flags from the one schema (client/schema.py, derived from the
contract's JobSpec); `prune` then converts the JobSpec with the server's own
conversion (convert.job_request), so unset flags mean the library defaults
in both.
"""

from __future__ import annotations

import pytest

from secateur.cli.options import job_spec
from secateur.cli.parser import build_parser
from secateur.client.schema import SPEC_FIELDS, SpecField, options_from_job_spec


def _flags(f: SpecField) -> list[str]:
    """Command-line words that set ``f`` to a value other than its default."""
    if f.kind is bool:
        return [f.flag.replace("--", "--no-", 1)] if f.key != "round_to_auto" else [f.flag]
    if f.repeated and f.choices:  # every name, comma-separated (--exports litert,onnx)
        return [f.flag, ",".join(f.choices)]
    if f.repeated:
        value = "0.1,0.2" if f.kind is float else "conv1"
        return [f.flag, value] + ([f.flag, "fc"] if f.kind is str else [])
    if f.choices:
        return [f.flag, f.choices[-1]]
    if f.kind is str:
        return [f.flag, f"value-of-{f.key}"]
    return [f.flag, "0.05" if f.kind is float else "3"]


def _spec(command: str, words: list[str]):
    args = build_parser().parse_args([command, "m.keras", "out", *words])
    return job_spec(args)


@pytest.mark.parametrize("field", SPEC_FIELDS, ids=[f.key for f in SPEC_FIELDS])
def test_everyFlag_pruneAndSubmitBuildTheSameJobSpec(field: SpecField) -> None:
    words = _flags(field)
    pruned, submitted = _spec("prune", words), _spec("submit", words)
    assert pruned == submitted, (words, pruned, submitted)
    assert field.key in options_from_job_spec(pruned), (words, pruned)


def test_allFlagsTogether_sameJobSpec_andTheSpecFileGivesItToo(tmp_path) -> None:
    import yaml

    words = [w for f in SPEC_FIELDS if f.key != "round_to_auto" for w in _flags(f)]
    pruned, submitted = _spec("prune", words), _spec("submit", words)
    assert pruned == submitted
    options = options_from_job_spec(pruned)
    assert set(options) == {f.key for f in SPEC_FIELDS} - {"round_to_auto"}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(options))
    assert _spec("submit", ["--spec", str(spec_file)]) == pruned


def test_noFlags_bothLeaveEverythingUnset_andTheConversionGivesTheLibraryDefaults() -> None:
    from secateur.cli.local import build_request
    from secateur.pruner.config import TrainConfig
    from secateur.pruner.spec import PruneSpec

    spec = _spec("submit", [])
    assert spec == _spec("prune", []) and options_from_job_spec(spec) == {}
    request = build_request(build_parser().parse_args(["prune", "m.keras", "out"]))
    # Before issue 9, submit without --ratio pruned nothing and trained 0 epochs.
    assert request.spec == PruneSpec() and request.spec.ratio == 0.3
    assert request.train == TrainConfig() and request.train.epochs == 1


def test_roundToAndAuto_together_refused_flagsOverrideTheFilesRounding(tmp_path) -> None:
    with pytest.raises(ValueError, match="round_to and round_to_auto are exclusive"):
        _spec("submit", ["--round-to", "8", "--round-to-auto"])
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("round_to: auto\nratio: 0.4\n")
    spec = _spec("prune", ["--spec", str(spec_file), "--round-to", "8"])
    assert spec.pruning.WhichOneof("rounding") == "round_to" and spec.pruning.round_to == 8
    assert spec.pruning.ratio == 0.4
    assert _spec("prune", ["--round-to", "auto"]).pruning.round_to_auto


def test_prune_badValue_refusedByTheSameConversionAsTheServer_namingThePath(capsys) -> None:
    from secateur.cli.main import main

    assert main(["prune", "m.keras", "out", "--ratio", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "ratio must be in [0, 1). Received: ratio=1.5" in err and err.count("Received:") == 1


@pytest.mark.parametrize("command", ["prune", "submit"])
def test_help_everySpecFlagShowsItsDefault(command: str) -> None:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    formatter = sub._get_formatter()
    spec_actions = [a for a in sub._actions if getattr(a, "spec_path", None)]
    assert {a.spec_path for a in spec_actions} == {f.path for f in SPEC_FIELDS}
    for action in spec_actions:
        assert "(default: " in formatter._get_help_string(action), action.option_strings
    text = " ".join(sub.format_help().split())
    assert "--ratio RATIO fraction of prunable channels to remove, in [0, 1) (default: 0.3)" in text
    assert "(default: bn_scale)" in text and "--no-reload" in text
