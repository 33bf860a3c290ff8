"""Training data whose every epoch has an order fixed by a seed alone.

:func:`secateur.pruner.data.make_dataset`'s training set reshuffles on every
pass, so the order an epoch sees depends on how many passes came before it in
the same process. A job that resumes from a checkpoint in a new process
(``server/pipeline/checkpoint.py``) needs epoch ``e`` of candidate ``i`` to
see the same examples in the same order as an uninterrupted run did:
:meth:`EpochData.epoch` builds that pass from its seed (with op determinism
on, tf.data keeps that order exactly).

:func:`fit_by_epoch` (``finetune(by_epoch=...)``) trains one epoch at a time on
those passes, can start from a :class:`TrainState` (every model and optimizer
variable, the history) and hands one out after each epoch for a checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from secateur.pruner.data import (
    DataSpec,
    RecordReader,
    _checked,
    _pipeline,
    _records,
    _tf,
    fits_cache,
)


def make_training_data(
    files: Sequence[str],
    image_shape: Sequence[int],
    batch_size: int,
    spec: DataSpec = DataSpec(),
    seed: int = 0,
    num_classes: int | None = None,
    names: Sequence[str] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    read_records: RecordReader | None = None,
) -> tuple[Any, EpochData]:
    """Training data checked once, two ways: ``make_dataset(shuffle=True)``'s dataset,
    and an :class:`EpochData` whose every pass has an order fixed by a seed alone."""
    shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
    parse, count = _checked(files, shape, spec, num_classes, names, should_cancel, read_records)
    dataset = _pipeline(files, parse, count, shape, batch_size, spec, True, seed, read_records)
    cached = None
    if fits_cache(count, shape, spec):  # the files in one order (the job's seed), decoded once
        cached = _records(files, parse, count, read_records, seed, reshuffle=False).cache()
    return dataset, EpochData(tuple(files), parse, count, batch_size, read_records, cached)


@dataclass(frozen=True)
class EpochData:
    """Checked training files, one pass of them per seed (see :meth:`epoch`).

    A dataset that reshuffles on every pass gives an epoch an order that
    depends on how many passes came before it in this process; a job that
    resumes in a new process needs each epoch's order from its seed alone.
    """

    files: tuple[str, ...]
    parse: Any
    count: int
    batch_size: int
    read_records: RecordReader | None
    #: The decoded records, files in one fixed order, when they fit the memory cache.
    cached: Any = None

    def epoch(self, seed: int) -> Any:
        """One batched pass, files and examples shuffled by ``seed`` (the same every time)."""
        tf = _tf()
        records = self.cached
        if records is None:
            records = _records(
                self.files, self.parse, self.count, self.read_records, seed, reshuffle=False
            )
        records = records.shuffle(10 * self.batch_size, seed=seed, reshuffle_each_iteration=False)
        return records.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)


@dataclass(frozen=True)
class TrainState:
    """Where fine-tuning stands after ``epochs_done`` whole epochs: enough to go on.

    ``variables`` are every variable of the trained model (weights, BatchNorm
    statistics, Dropout's seed states), ``optimizer`` the optimizer's
    (iterations, momenta, a loss scale), ``history`` the figures per epoch so far.
    """

    epochs_done: int
    variables: list[Any]
    optimizer: list[Any]
    history: dict[str, list[float]]


@dataclass(frozen=True)
class ByEpoch:
    """Fine-tune one epoch at a time, epoch ``e`` on ``epoch_data(e)`` (its own fixed order).

    ``start``: go on from that state (its epochs are not trained again);
    ``on_epoch``: called after each epoch with a function that snapshots the
    state (a checkpoint's contents; taken only when asked for).
    """

    epoch_data: Callable[[int], Any]
    start: TrainState | None = None
    on_epoch: Callable[[int, Callable[[], TrainState]], None] | None = None


def fit_by_epoch(
    fitted: Any, trained: Any, config: Any, hooks: Any, plan: ByEpoch
) -> dict[str, list[float]]:
    """One ``fit`` per epoch on the epoch's own data; from ``plan.start`` when given.

    ``hooks``: finetune's progress and cancellation callback (``.cancelled``).
    """
    import numpy as np

    history: dict[str, list[float]] = {}
    first = 0
    if plan.start is not None:
        restore(fitted, trained, plan.start)
        first, history = plan.start.epochs_done, {k: list(v) for k, v in plan.start.history.items()}

    def snapshot(done: int) -> TrainState:
        return TrainState(
            done,
            [np.array(v.numpy()) for v in trained.variables],
            [np.array(v.numpy()) for v in fitted.optimizer.variables],
            {k: list(v) for k, v in history.items()},
        )

    for epoch in range(first, config.epochs):
        got = fitted.fit(
            plan.epoch_data(epoch),
            initial_epoch=epoch,
            epochs=epoch + 1,
            steps_per_epoch=config.steps_per_epoch,
            callbacks=[hooks],
            shuffle=False,
            verbose=0,
        )
        for key, values in got.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        if hooks.cancelled:
            break
        if plan.on_epoch is not None:
            plan.on_epoch(epoch + 1, functools.partial(snapshot, epoch + 1))
    return history


def restore(fitted: Any, trained: Any, state: TrainState) -> None:
    """Put ``state`` back into the trained model and the optimizer (built here first).

    Raises:
        ValueError: the state was taken of another model or optimizer.
    """
    if len(trained.variables) != len(state.variables):
        raise ValueError(
            f"a training state must match the model: {len(state.variables)} variables "
            f"saved, {len(trained.variables)} in the model"
        )
    for var, value in zip(trained.variables, state.variables, strict=True):
        var.assign(value)
    if not fitted.optimizer.built:
        fitted.optimizer.build(fitted.trainable_variables)
    slots = fitted.optimizer.variables
    if len(slots) != len(state.optimizer):
        raise ValueError(
            f"a training state must match the optimizer: {len(state.optimizer)} variables "
            f"saved, {len(slots)} in the optimizer"
        )
    for var, value in zip(slots, state.optimizer, strict=True):
        var.assign(value)
