"""A pruning job's request, its stages and its progress events.

:class:`JobRequest` is what :class:`~secateur.server.pipeline.prune_job.PruneJob` runs
(``convert.job_request`` makes it from the contract's ``JobSpec``); the stage
names and :func:`overall_progress` are shared by the job, the service's
``Job.progress`` and the CLI's progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from secateur.pruner.config import MeasureConfig, TrainConfig, check_float, check_int
from secateur.pruner.data import DataSpec
from secateur.pruner.errors import InvalidSpecError
from secateur.pruner.exports import check_formats
from secateur.pruner.scoring import needs_data
from secateur.pruner.spec import PruneSpec
from secateur.v1 import enums

# The contract's Job.Stage names without their prefix, in order.
STAGES = enums.STAGES
#: The stages every candidate of a sweep goes through, in order. Their events
#: carry the fraction of the whole sweep done (candidate i of n starts at i/n),
#: so together they fill one block of the overall progress.
CANDIDATE_STAGES = ("SCORING", "REBUILDING", "FINE_TUNING", "EVALUATING")
# Where each candidate stage starts within its candidate's share of the sweep.
_CANDIDATE_START = {"SCORING": 0.0, "REBUILDING": 0.1, "FINE_TUNING": 0.2, "EVALUATING": 0.9}


def overall_progress(stage: str, within: float) -> float:
    """The fraction of the whole job done, from an event's stage and progress.

    Every stage gets an equal slot in order, except the candidate stages
    (:data:`CANDIDATE_STAGES`), which share one block that the sweep fills
    candidate after candidate (their ``within`` is the fraction of the sweep
    done): the value never goes back from one candidate to the next.
    """
    if stage not in STAGES:
        return 0.0
    within = min(max(within, 0.0), 1.0)
    if stage in CANDIDATE_STAGES:
        first = STAGES.index(CANDIDATE_STAGES[0])
        return (first + len(CANDIDATE_STAGES) * within) / len(STAGES)
    return (STAGES.index(stage) + within) / len(STAGES)


def sweep_progress(stage: str, i: int, n: int, frac: float = 0.0) -> float:
    """A candidate stage's progress: candidate ``i`` of ``n``, ``frac`` through the stage.

    An iterative candidate runs the stages once per round: count rounds
    instead (round ``j`` of ``k`` of candidate ``i`` is ``i * k + j`` of
    ``n * k``) and the value only grows from one round to the next.
    """
    start = _CANDIDATE_START[stage]
    order = list(_CANDIDATE_START)
    end = _CANDIDATE_START[order[order.index(stage) + 1]] if stage != order[-1] else 1.0
    at = start * (1.0 - frac) + end * frac  # exactly ``end`` at 1: the next stage's start
    return (i + at) / n


#: Candidates one sweep may ask for (each is pruned, trained and measured).
MAX_RATIOS = 64


@dataclass(frozen=True)
class JobRequest:
    """Everything one pruning job needs.

    Attributes:
        ratios: a sweep; empty means the single ``spec.ratio``.
        max_accuracy_drop: accuracy budget (absolute, 0.02 = 2 points) that
            gates publication; needs ``eval_data``.
        version: the TF Serving version to publish; None = next free one.
        exports: extra artifacts (``litert``, ``onnx``) published in the
            version; each format's runtime must be installed here.
    """

    model_uri: str
    output_uri: str
    spec: PruneSpec = PruneSpec()
    ratios: tuple[float, ...] = ()
    train: TrainConfig = TrainConfig()
    train_data: str | None = None
    eval_data: str | None = None
    data: DataSpec = DataSpec()
    max_accuracy_drop: float | None = None
    measure: MeasureConfig = MeasureConfig()
    version: int | None = None
    #: Service only: a run's wall-time limit in seconds (None: the server's maximum).
    max_run_seconds: float | None = None
    exports: tuple[str, ...] = ()
    #: One spec per candidate, in ``sweep`` order (made here, checked once).
    specs: tuple[PruneSpec, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        if len(self.ratios) > MAX_RATIOS:
            raise InvalidSpecError(
                f"a sweep may hold at most {MAX_RATIOS} ratios. Received: {len(self.ratios)}",
                "ratios",
            )
        if self.ratios and self.spec.targets is not None:
            raise InvalidSpecError(
                "ratios cannot be combined with targets (targets choose every group's width). "
                f"Received: {len(self.ratios)} ratios with targets",
                "ratios",
            )
        checked: dict[float, PruneSpec] = {}
        for i, r in enumerate(self.ratios):
            try:  # the ratio only: the rest of the spec was checked when it was built
                checked[r] = self.spec.with_ratio(r)
            except InvalidSpecError as exc:
                raise InvalidSpecError(f"ratios[{i}]: {exc}", "ratios") from None
        specs = tuple(checked[r] for r in self.sweep) if self.ratios else (self.spec,)
        object.__setattr__(self, "specs", specs)
        if self.max_run_seconds is not None and not self.max_run_seconds > 0:
            raise InvalidSpecError(
                f"max_run_seconds must be > 0. Received: {self.max_run_seconds}",
                "max_run_seconds",
            )
        if self.max_accuracy_drop is not None:
            check_float("max_accuracy_drop", self.max_accuracy_drop, 0.0, 1.0)
            if not self.eval_data:
                raise InvalidSpecError(
                    "max_accuracy_drop needs eval_data to measure accuracy. Received: no eval_data",
                    "eval_data",
                )
        if self.train.sparsity_epochs > 0 and not self.train_data:
            raise InvalidSpecError(
                "sparsity_epochs needs train_data to train on. "
                f"Received: sparsity_epochs={self.train.sparsity_epochs} and no train_data",
                "sparsity_epochs",
            )
        if needs_data(self.spec.criterion) and not self.train_data:
            raise InvalidSpecError(
                f"criterion {self.spec.criterion} needs train_data to compute gradients. "
                f"Received: criterion={self.spec.criterion!r} and no train_data",
                "criterion",
            )
        if self.version is not None:
            check_int("version", self.version, 1, 2**63 - 1)
        object.__setattr__(self, "exports", check_formats(self.exports))

    @property
    def sweep(self) -> tuple[float, ...]:
        return tuple(sorted(set(self.ratios))) if self.ratios else (self.spec.ratio,)


@dataclass(frozen=True)
class StageEvent:
    stage: str
    message: str = ""
    progress: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def overall(self) -> float:
        """The fraction of the whole job done (see :func:`overall_progress`)."""
        return overall_progress(self.stage, self.progress)
