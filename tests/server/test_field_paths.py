"""A library error's field name becomes the JobSpec path a client can point at."""

from __future__ import annotations

import pytest

from secateur.server.pipeline import convert


@pytest.mark.parametrize(
    "name,path",
    [
        ("train_data", "spec.training.train_data"),
        ("eval_data", "spec.training.eval_data"),
        ("steps", "spec.training.measure_steps"),  # MeasureConfig.steps
        ("learning_rate", "spec.training.learning_rate"),
        ("ratio", "spec.pruning.ratio"),
        ("ratios", "spec.pruning.ratios"),
        ("round_to", "spec.pruning.round_to"),
        ("model_uri", "spec.model_uri"),
        ("output_uri", "spec.output_uri"),
        ("max_accuracy_drop", "spec.max_accuracy_drop"),
        ("spec.training.train_data", "spec.training.train_data"),  # already a path
    ],
)
def test_field_path_names_the_request_field(name: str, path: str) -> None:
    assert convert.field_path(name) == path


def test_every_library_field_maps_to_its_own_path() -> None:
    for path, (_owner, name) in convert.LIBRARY_FIELDS.items():
        if "auto" in path:  # round_to_auto shares round_to's library field
            continue
        assert convert.field_path(name) == f"spec.{path}", name
