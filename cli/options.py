"""The job options from the command line: ``--spec`` file values overridden by flags."""

from __future__ import annotations

import argparse
from typing import Any


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


SPEC_FIELDS = (
    "ratio",
    "criterion",
    "scope",
    "round_to",
    "min_channels",
    "exclude",
    "reload_weights",
    "seed",
)
TRAIN_FIELDS = ("epochs", "batch_size", "learning_rate")
DATA_FIELDS = ("image_key", "label_key", "resize")
JOB_FIELDS = ("ratios", "train_data", "eval_data", "max_accuracy_drop", "measure_steps", "version")


def load_spec_file(path: str) -> dict[str, Any]:
    """Read a YAML/JSON spec file into a flat dict of known fields."""
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(
            f"spec file must hold a mapping. Received: {type(data).__name__} in {path}"
        )
    known = set(SPEC_FIELDS + TRAIN_FIELDS + DATA_FIELDS + JOB_FIELDS)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown field(s) in {path}; known: {sorted(known)}. Received: {unknown}")
    if "ratios" in data and isinstance(data["ratios"], str):
        data["ratios"] = parse_ratios(data["ratios"])
    return data


def merged_options(args: argparse.Namespace) -> dict[str, Any]:
    """Spec file values overridden by flags that were given."""
    values = load_spec_file(args.spec) if args.spec else {}
    for name in SPEC_FIELDS + TRAIN_FIELDS + DATA_FIELDS + JOB_FIELDS:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    return values
