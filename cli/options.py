"""The job options from the command line: ``--spec`` file values overridden by flags.

Flags and spec-file keys are the request schema's fields
(:data:`secateur.client.schema.SPEC_FIELDS`, derived from the contract's
``JobSpec``); ``prune`` and ``submit`` both turn them into the same
``JobSpec`` with :func:`job_spec`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from secateur.client.schema import DEFAULTS, KNOWN_OPTIONS, SPEC_FIELDS, job_spec_from_options
from secateur.v1 import pruning_pb2


def parse_ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ratios must be numbers separated by commas: {text!r}"
        ) from None


def parse_round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"round-to must be an integer or 'auto': {text!r}"
        ) from None


# Extra spellings of a few flags, kept for existing scripts (``--no-reload``).
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "reload_weights": ("--reload",),
    "exports": ("--export",),
}
_GROUPS = {
    "pruning": "pruning spec (flags override --spec)",
    "training": "fine-tuning, data and measurement",
    "": "publishing",
}
# The two spellings of rounding: a flag for either replaces both file keys.
_ROUNDING = ("round_to", "round_to_auto")


class SpecHelpFormatter(argparse.HelpFormatter):
    """Every spec flag's help ends with the library default an unset flag takes.

    The defaults are the client's table of them
    (:data:`secateur.client.schema.DEFAULTS`, kept equal to the pruner's by a
    test), so the help needs neither the server nor the pruner installed.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action) or ""
        path = getattr(action, "spec_path", None)
        if path is None:
            return text
        return f"{text} (default: {_shown(DEFAULTS[path])})".lstrip()


def _shown(value: Any) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace("%", "%%")


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per schema field (``--ratio`` ... ``--version``), plus ``--spec``.

    Flags default to None (= not given): the spec file's value or, unset,
    the library default, which the help shows (parsers that carry these
    flags use :class:`SpecHelpFormatter`).
    """
    groups = {prefix: p.add_argument_group(title) for prefix, title in _GROUPS.items()}
    groups["pruning"].add_argument(
        "--spec", help="YAML or JSON file with any of the fields below (key: the flag, _ for -)"
    )
    for f in SPEC_FIELDS:
        group = groups[f.path.split(".")[0] if "." in f.path else ""]
        flags = [f.flag, *FLAG_ALIASES.get(f.key, ())]
        kwargs: dict[str, Any] = {"dest": f.key, "default": None, "help": f.help}
        if f.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.repeated:
            if f.kind is float:
                kwargs.update(type=parse_ratios, metavar="R1,R2,...")
            elif f.choices:  # names checked by the schema: {litert,onnx}, commas allowed
                kwargs.update(action="append", metavar="{" + ",".join(f.choices) + "}")
            else:
                kwargs.update(action="append", metavar=f.key.upper())
        elif f.key == "round_to":
            kwargs.update(type=parse_round_to, metavar="N|auto")
        elif f.choices:
            kwargs.update(type=str.lower, choices=f.choices)
        else:
            kwargs.update(type=f.kind, metavar=f.key.upper())
        action = group.add_argument(*flags, **kwargs)
        action.spec_path = f.path  # type: ignore[attr-defined]


def load_spec_file(path: str) -> dict[str, Any]:
    """Read a YAML/JSON spec file into a flat dict of schema keys.

    JSON needs nothing more; YAML needs PyYAML, which the full distribution
    installs and the client's ``yaml`` extra adds (``secateur-client[yaml]``).

    Raises:
        ValueError: not a mapping, or an unknown key (the known ones listed);
            a YAML file without PyYAML installed.
    """
    with open(path) as fh:
        text = fh.read()
    if path.endswith(".json"):
        data = json.loads(text) or {}
    else:
        try:
            import yaml
        except ModuleNotFoundError:
            raise ValueError(
                "a YAML spec file needs PyYAML: pip install 'secateur-client[yaml]', or write "
                f"the spec as JSON (a .json file). Received: {path}"
            ) from None
        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(
            f"spec file must hold a mapping. Received: {type(data).__name__} in {path}"
        )
    unknown = sorted(set(data) - KNOWN_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown field(s) in {path}; known: {sorted(KNOWN_OPTIONS)}. Received: {unknown}"
        )
    return data


def merged_options(args: argparse.Namespace) -> dict[str, Any]:
    """Spec file values overridden by the flags that were given (schema keys)."""
    values = load_spec_file(args.spec) if getattr(args, "spec", None) else {}
    flags = {
        f.key: getattr(args, f.key) for f in SPEC_FIELDS if getattr(args, f.key, None) is not None
    }
    if any(k in flags for k in _ROUNDING):  # a rounding flag replaces the file's rounding
        for key in _ROUNDING:
            values.pop(key, None)
    return values | flags


def job_spec(args: argparse.Namespace) -> pruning_pb2.JobSpec:
    """The JobSpec of a ``prune`` or ``submit`` command line: the same for both.

    Raises:
        ValueError: an unknown spec-file key or a value of the wrong type.
    """
    return job_spec_from_options(args.model_uri, args.output_uri, merged_options(args))
