"""PruneSpec: what to prune, validated on construction."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from secateur.pruner.config import check_int
from secateur.pruner.errors import InvalidSpecError
from secateur.pruner.scoring import criteria
from secateur.pruner.targets import Targets

# The built-in criteria; validation reads the live registry (scoring.criteria()).
CRITERIA = criteria()
SCOPES = ("global", "layerwise")
#: ``iterative_schedule`` values (see PruneSpec).
SCHEDULES = ("linear", "geometric")
MAX_ITERATIVE_STEPS = 20
# Beyond any layer's width (the widest Keras models have a few thousand channels).
MAX_ROUND_TO = 4096
MAX_CHANNELS = 1_000_000
# Each batch is one forward and backward pass of the whole model per candidate.
MAX_TAYLOR_BATCHES = 10_000


class _DefaultRatio(float):
    """The default ``ratio``, told apart from an explicit ``ratio=0.3`` (targets exclude ratio)."""


DEFAULT_RATIO = 0.3


@dataclass(frozen=True)
class PruneSpec:
    """A pruning request.

    Args:
        ratio: fraction of the prunable channels to remove, in [0, 1).
        head_ratio: fraction of the attention heads to remove, in [0, 1)
            (``MultiHeadAttention``; 0 leaves heads alone). Heads are ranked
            and allocated apart from channels (``ratio`` never removes a
            head); every attention layer keeps at least one head.
        criterion: channel importance: ``bn_scale`` (|BatchNorm gamma|,
            Network Slimming), ``l1`` / ``l2`` (filter norms, Li et al.),
            ``lamp`` (layer-adaptive magnitude), ``taylor`` (activation x
            gradient over training batches; needs data) or ``random``.
        scope: ``global`` ranks all channels together; ``layerwise`` removes
            ``ratio`` of every group.
        round_to: kept channel counts are multiples of this (a group whose
            size is not reachable is left whole); 1 disables rounding;
            ``"auto"`` uses the attached device's layout multiple (TPU 128,
            GPU 8, CPU 16; see :mod:`secateur.pruner.hardware`).
        min_channels: no group keeps fewer channels than this.
        exclude: layer names whose channels must not change.
        reload_weights: copy the kept slices of the original weights (True)
            or keep the new architecture's fresh initialisation (False).
        seed: seed of the ``random`` criterion and of fresh initialisation.
        bias_compensation: fold the constant output of removed channels
            (zero filters, zero or small BatchNorm gammas) into the next
            layer's bias instead of dropping it (see
            :mod:`secateur.pruner.compensation`).
        taylor_batches: training batches the ``taylor`` criterion reads.
        iterative_steps: reach ``ratio`` in this many prune + fine-tune
            rounds, each re-scoring the current model (1: one shot).
        iterative_schedule: the cumulative share removed after round j of k:
            ``linear`` ratio*j/k, ``geometric`` 1-(1-ratio)^(j/k) (the same
            fraction of what remains every round).
        targets: prune to fit budgets (step time, latency, peak memory,
            params, FLOPs; :class:`~secateur.pruner.targets.Targets`) instead
            of by ``ratio``: widths are allocated per group under a cost
            model (:mod:`secateur.pruner.budget`). Excludes ``ratio``,
            ``scope="layerwise"``, ``head_ratio`` and ``iterative_steps > 1``.

    Raises:
        InvalidSpecError: any field out of range; the message names it.
    """

    ratio: float = _DefaultRatio(DEFAULT_RATIO)
    criterion: str = "bn_scale"
    scope: str = "global"
    round_to: int | str = 1
    min_channels: int = 1
    exclude: tuple[str, ...] = field(default_factory=tuple)
    reload_weights: bool = True
    seed: int = 0
    bias_compensation: bool = True
    taylor_batches: int = 8
    iterative_steps: int = 1
    iterative_schedule: str = "linear"
    head_ratio: float = 0.0
    targets: Targets | None = None

    def __post_init__(self) -> None:
        _check_targets(self)
        ratio = _checked_ratio(self.ratio)
        object.__setattr__(self, "head_ratio", _checked_ratio(self.head_ratio, "head_ratio"))
        if self.criterion not in criteria():
            raise InvalidSpecError(
                f"criterion must be one of {', '.join(criteria())}. "
                f"Received: criterion={self.criterion!r}",
                "criterion",
            )
        if self.scope not in SCOPES:
            raise InvalidSpecError(
                f"scope must be one of {', '.join(SCOPES)}. Received: scope={self.scope!r}",
                "scope",
            )
        if self.round_to != "auto":
            _check_int("round_to", self.round_to, MAX_ROUND_TO)
        _check_int("min_channels", self.min_channels, MAX_CHANNELS)
        if isinstance(self.exclude, str) or not all(isinstance(n, str) for n in self.exclude):
            raise InvalidSpecError(
                f"exclude must be a list of layer names. Received: exclude={self.exclude!r}",
                "exclude",
            )
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not isinstance(self.ratio, _DefaultRatio):
            object.__setattr__(self, "ratio", float(ratio))
        # np.random.default_rng and tf.data take non-negative 64-bit seeds.
        check_int("seed", self.seed, 0, 2**63 - 1)
        if not isinstance(self.bias_compensation, bool):
            raise InvalidSpecError(
                "bias_compensation must be true or false. "
                f"Received: bias_compensation={self.bias_compensation!r}",
                "bias_compensation",
            )
        _check_int("taylor_batches", self.taylor_batches, MAX_TAYLOR_BATCHES)
        _check_int("iterative_steps", self.iterative_steps, MAX_ITERATIVE_STEPS)
        if self.iterative_schedule not in SCHEDULES:
            raise InvalidSpecError(
                f"iterative_schedule must be one of {', '.join(SCHEDULES)}. "
                f"Received: iterative_schedule={self.iterative_schedule!r}",
                "iterative_schedule",
            )

    def round_ratios(self) -> tuple[float, ...]:
        """The ratio of each iterative round, relative to the channels left before it.

        The cumulative share removed follows ``iterative_schedule`` and ends
        at ``ratio``: removing ``r_j`` of what remains in round j leaves
        ``prod(1 - r_j)`` of the prunable channels.
        """
        return _schedule(self.ratio, self.iterative_steps, self.iterative_schedule)

    def round_spec(self, j: int) -> PruneSpec:
        """The spec of iterative round ``j`` (0-based): its channel and head ratios.

        Both follow ``iterative_schedule`` relative to what is left before
        the round, so heads are not removed ``head_ratio`` at a time k times.
        """
        if self.iterative_steps == 1:
            return self
        out = copy.copy(self)
        object.__setattr__(out, "ratio", self.round_ratios()[j])
        heads = _schedule(self.head_ratio, self.iterative_steps, self.iterative_schedule)
        object.__setattr__(out, "head_ratio", heads[j])
        return out

    def with_ratio(self, ratio: float) -> PruneSpec:
        """This spec at another ratio; only the ratio is checked (the rest was, once).

        Raises:
            InvalidSpecError: ``ratio`` is not a number in [0, 1).
        """
        out = copy.copy(self)
        object.__setattr__(out, "ratio", _checked_ratio(ratio))
        return out

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exclude"] = list(self.exclude)
        if self.targets is None:
            out.pop("targets")
        else:
            out["targets"] = self.targets.to_dict()
            out.pop("ratio")  # not part of a target request
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneSpec:
        """Build a spec from plain data (JSON/YAML), rejecting unknown keys."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidSpecError(
                f"unknown spec field(s); expected some of {sorted(known)}. Received: {unknown}",
                unknown[0],
            )
        kwargs = dict(data)
        if "exclude" in kwargs and isinstance(kwargs["exclude"], list):
            kwargs["exclude"] = tuple(kwargs["exclude"])
        if kwargs.get("targets") is not None and not isinstance(kwargs["targets"], Targets):
            kwargs["targets"] = Targets.from_dict(kwargs["targets"])
        return cls(**kwargs)


def _check_targets(spec: PruneSpec) -> None:
    """Targets replace the ratio: refuse the fields that only make sense with one."""
    if spec.targets is None:
        return
    if not isinstance(spec.targets, Targets):
        raise InvalidSpecError(
            f"targets must be a Targets. Received: {type(spec.targets).__name__}", "targets"
        )
    clashes = [
        ("ratio", not isinstance(spec.ratio, _DefaultRatio), spec.ratio),
        ("scope", spec.scope != "global", spec.scope),
        ("head_ratio", spec.head_ratio != 0, spec.head_ratio),
        ("iterative_steps", spec.iterative_steps != 1, spec.iterative_steps),
    ]
    for name, clash, value in clashes:
        if clash:
            raise InvalidSpecError(
                f"{name} cannot be combined with targets (targets choose every group's "
                f"width). Received: {name}={value!r} with targets",
                name,
            )


def _schedule(r: float, k: int, schedule: str) -> tuple[float, ...]:
    """Per-round ratios (of what is left) whose cumulative share follows ``schedule`` to ``r``."""
    if k == 1:
        return (r,)
    if schedule == "geometric":
        removed = [1 - (1 - r) ** (j / k) for j in range(k + 1)]
    else:
        removed = [r * j / k for j in range(k + 1)]
    return tuple(1 - (1 - removed[j]) / (1 - removed[j - 1]) for j in range(1, k + 1))


def _checked_ratio(ratio: Any, name: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise InvalidSpecError(
            f"{name} must be a number in [0, 1). Received: {name}={ratio!r}", name
        )
    if not (math.isfinite(ratio) and 0 <= ratio < 1):
        raise InvalidSpecError(f"{name} must be in [0, 1). Received: {name}={ratio}", name)
    return float(ratio)


def _check_int(name: str, value: Any, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        allowed = f"an integer in [1, {high}]" + (" or 'auto'" if name == "round_to" else "")
        raise InvalidSpecError(f"{name} must be {allowed}. Received: {name}={value!r}", name)
