"""PruningPlan: which channels every group keeps, as plain serialisable data.

A plan is computed without touching the model (:func:`make_plan`, a dry run)
and can be applied later (:func:`secateur.pruner.surgery.apply_plan`), to the
same model or a copy loaded from disk. Groups are matched by the origins of
their spaces (the layer names that create them), so a plan survives a
save/load round trip of the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from secateur.pruner import plan_report
from secateur.pruner.allocate import allocate_ratio
from secateur.pruner.compensation import (
    cached_weights,
    fold,
    live_channels,
    new_bias_params,
    new_biases,
)
from secateur.pruner.constant_tracing import trace_constants
from secateur.pruner.constants import ConstantTrace, WeightGetter
from secateur.pruner.errors import EmptyGroupError, InvalidSpecError, PlanError
from secateur.pruner.graph import ChannelGraph, Group
from secateur.pruner.hardware import detect_device_kind, resolve_round_to
from secateur.pruner.layout import kept_positions
from secateur.pruner.layout import spaces as layout_spaces
from secateur.pruner.scoring import GroupScore, ScoringContext, require_data, score_group
from secateur.pruner.spec import PruneSpec
from secateur.pruner.tracing import analyze

PLAN_VERSION = 1


@dataclass(frozen=True)
class Member:
    """A weight axis of a group: ``layer.weights[weight]`` along ``axis``."""

    layer: str
    weight: str
    axis: int
    role: str


@dataclass
class GroupPlan:
    """One channel group (or group of attention heads) and what it keeps.

    Attributes:
        id: index of the group in trace order.
        origins: names of the layers/inputs whose channels form the group.
        members: the weight axes that lose the same channels.
        size_before / size_after: channel counts.
        kept: kept channel indices (sorted).
        criterion: the criterion actually used, None for frozen groups.
        fallback: why another criterion than the requested one was used.
        frozen: reasons the group cannot be pruned (empty when prunable).
        notes: caveats, e.g. a LayerNormalization over the channels.
        compensated: removed channels whose constant output was folded into
            the next layer's bias (see :mod:`secateur.pruner.compensation`).
        kind: ``"channels"``, or ``"heads"`` for the heads of an attention
            layer (sizes and indices count heads; ``PruneSpec.head_ratio``
            allocates them). Plans without it are channel plans.
        unit: channels per index when the group prunes whole blocks (the
            groups of a grouped Conv or GroupNormalization): sizes and
            indices count blocks of ``unit`` consecutive channels.
    """

    id: int
    origins: list[str]
    members: list[Member]
    size_before: int
    size_after: int
    kept: list[int]
    criterion: str | None = None
    fallback: str | None = None
    frozen: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compensated: list[int] = field(default_factory=list)
    kind: str = "channels"
    unit: int = 1

    @property
    def pruned(self) -> bool:
        return self.size_after < self.size_before


@dataclass
class PruningPlan:
    """Kept channels per group plus the predicted effect on the model.

    ``bias_added`` lists the layers that gain a bias from bias compensation
    (``params_after`` counts it).
    """

    spec: dict[str, Any]
    model_name: str
    groups: list[GroupPlan]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    unsupported_layers: list[dict[str, str]] = field(default_factory=list)
    round_to: int = 1
    device_kind: str | None = None
    version: int = PLAN_VERSION
    bias_added: list[str] = field(default_factory=list)
    #: Per target (PruneSpec.targets): wanted, predicted and measured figures.
    targets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def prunable_channels(self) -> int:
        return sum(g.size_before for g in self._of_kind("channels") if not g.frozen)

    @property
    def removed_channels(self) -> int:
        return sum(g.size_before - g.size_after for g in self._of_kind("channels"))

    @property
    def prunable_heads(self) -> int:
        return sum(g.size_before for g in self._of_kind("heads") if not g.frozen)

    @property
    def removed_heads(self) -> int:
        return sum(g.size_before - g.size_after for g in self._of_kind("heads"))

    def _of_kind(self, kind: str) -> list[GroupPlan]:
        return [g for g in self.groups if g.kind == kind]

    @property
    def layer_widths(self) -> dict[str, tuple[int, int]]:
        """Producer layer -> (channels before, after), for pruned groups."""
        out: dict[str, tuple[int, int]] = {}
        for g in self._of_kind("channels"):
            for m in g.members:
                if m.role == "out" and g.pruned:
                    out[m.layer] = (g.size_before, g.size_after)
        return out

    @property
    def prunable_share(self) -> float:
        """Share of the model's channels in groups the plan may prune."""
        return plan_report.prunable_share(self.groups)

    @property
    def frozen_reasons(self) -> list[dict[str, Any]]:
        """Why the rest is frozen: {reason, channels, groups, example}, most channels first."""
        return [asdict(r) for r in plan_report.frozen_reasons(self.groups)]

    def to_dict(self) -> dict[str, Any]:
        """The fields plus the derived prunable_share/frozen_reasons (from_dict skips them)."""
        return asdict(self) | {
            "prunable_share": self.prunable_share,
            "frozen_reasons": self.frozen_reasons,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        """Rebuild a plan from :meth:`to_dict` output, validating it.

        Raises:
            PlanError: missing fields or an unknown version.
            EmptyGroupError: a group keeps no channels.
        """
        try:
            if data.get("version") != PLAN_VERSION:
                raise PlanError(
                    f"plan version must be {PLAN_VERSION}. "
                    f"Received: version={data.get('version')!r}"
                )
            groups = [
                GroupPlan(**{**g, "members": [Member(**m) for m in g["members"]]})
                for g in data["groups"]
            ]
            fields = {k: data[k] for k in cls.__dataclass_fields__ if k != "groups" and k in data}
            plan = cls(groups=groups, **fields)
        except (KeyError, TypeError) as exc:
            raise PlanError(
                f"malformed pruning plan: {exc}. Received keys: {sorted(data)}"
            ) from exc
        plan.validate()
        return plan

    def validate(self) -> None:
        """Check internal consistency; raise typed errors otherwise.

        A plan that passes applies to the model it was made for: every group
        keeps distinct indices in range, at least one, and a frozen group
        (one surgery cannot change exactly) keeps all of them.

        Raises:
            PlanError: counts or indices that do not fit, or a frozen group pruned.
            EmptyGroupError: a group keeps nothing.
        """
        for g in self.groups:
            if g.frozen and g.size_after < g.size_before:
                raise PlanError(
                    f"a frozen group cannot prune ({'; '.join(g.frozen)}). Received: group "
                    f"{g.id} ({', '.join(g.origins)}) keeps {g.size_after} of {g.size_before}"
                )
            if len(g.kept) != g.size_after:
                raise PlanError(
                    f"group {g.id} lists {len(g.kept)} kept channels but size_after={g.size_after}"
                )
            if g.size_after < 1:
                raise EmptyGroupError(
                    f"every group must keep at least one channel. Received: group {g.id} "
                    f"({', '.join(g.origins)}) keeps {g.size_after} of {g.size_before}"
                )
            if any(not 0 <= k < g.size_before for k in g.kept) or len(set(g.kept)) != len(g.kept):
                raise PlanError(
                    f"kept indices of group {g.id} must be distinct and in "
                    f"[0, {g.size_before}). Received: {g.kept[:10]}..."
                )

    def summary(self) -> str:
        pruned = [g for g in self.groups if g.pruned]
        heads = ""
        if self._of_kind("heads"):
            left = self.prunable_heads - self.removed_heads
            heads = f", attention heads {self.prunable_heads} -> {left} (prunable)"
        return (
            f"{len(pruned)} of {len(self.groups)} groups pruned, channels "
            f"{self.prunable_channels} -> {self.prunable_channels - self.removed_channels} "
            f"(prunable){heads}, params {self.params_before:,} -> {self.params_after:,}, FLOPs "
            f"{self.flops_before:,} -> {self.flops_after:,}; "
            + plan_report.describe(
                self.prunable_share,
                plan_report.frozen_reasons(self.groups),
                blocker=plan_report.sole_blocker(self.groups),
            )
        )


# -- making a plan ---------------------------------------------------------


def make_plan(
    model: Any,
    spec: PruneSpec,
    graph: ChannelGraph | None = None,
    device_kind: str | None = None,
    data: Iterable[Any] | None = None,
) -> PruningPlan:
    """Score channels and choose the kept ones, without changing the model.

    Args:
        model: a functional or Sequential ``keras.Model``.
        spec: the pruning request.
        graph: the model's traced graph, if already computed.
        device_kind: ``TPU``/``GPU``/``CPU`` for ``round_to="auto"``
            (default: what is attached).
        data: ``(inputs, labels)`` training batches, for criteria that read
            data (``taylor`` reads ``spec.taylor_batches`` of them).

    Returns:
        The plan; ``apply_plan(model, plan)`` builds the pruned model.

    Raises:
        UnsupportedModelError: the model cannot be traced.
        InvalidSpecError: ``spec.exclude`` names a layer the model lacks, or
            ``spec.criterion`` needs data and ``data`` is None.
    """
    scored = score_model(model, spec, graph, device_kind, data)
    keep_counts = allocate_ratio(
        [g for g in scored.prunable if g.kind != "heads"], scored.scores, scored.spec
    )
    # Heads are ranked among heads only, at head_ratio; a layer keeps one at least.
    heads = replace(scored.spec, ratio=spec.head_ratio, round_to=1, min_channels=1)
    keep_counts |= allocate_ratio(
        [g for g in scored.prunable if g.kind == "heads"], scored.scores, heads
    )
    return plan_from_counts(scored, keep_counts)


@dataclass
class ScoredModel:
    """A model's traced graph and channel scores, ready to plan at any widths.

    Attributes:
        spec: the request with ``round_to`` resolved to an integer.
        requested: the request as given (what the plan records).
        prunable: the groups a plan may shrink.
        scores: group id -> channel scores (live channels ranked first).
    """

    model: Any
    graph: ChannelGraph
    spec: PruneSpec
    requested: PruneSpec
    device_kind: str | None
    prunable: list[Group]
    scores: dict[int, GroupScore]
    weights: WeightGetter
    trace: ConstantTrace | None
    live: Mapping[int, Mapping[int, str]]


def score_model(
    model: Any,
    spec: PruneSpec,
    graph: ChannelGraph | None = None,
    device_kind: str | None = None,
    data: Iterable[Any] | None = None,
) -> ScoredModel:
    """Trace and score ``model`` once (the part of :func:`make_plan` before allocation)."""
    require_data(spec.criterion, data is not None)
    graph = graph or analyze(model)
    groups = graph.groups()
    _freeze_excluded(graph, groups, spec.exclude)
    if spec.round_to == "auto":
        device_kind = device_kind or detect_device_kind()
    resolved = replace(spec, round_to=resolve_round_to(spec.round_to, device_kind))
    weights = cached_weights(graph)
    rng = np.random.default_rng(resolved.seed)
    prunable = [g for g in groups if g.prunable]
    context = ScoringContext(model, data, resolved.taylor_batches)
    scores = {
        g.id: score_group(graph, g, resolved.criterion, weights, rng, context) for g in prunable
    }
    trace, live = None, {}
    if resolved.bias_compensation and resolved.reload_weights:
        trace = trace_constants(model, graph, weights)
        live = live_channels(graph, trace)
        scores = _score_live(scores, live)
    return ScoredModel(
        model, graph, resolved, spec, device_kind, prunable, scores, weights, trace, live
    )


def plan_from_counts(scored: ScoredModel, keep_counts: Mapping[int, int]) -> PruningPlan:
    """The plan keeping each prunable group's ``keep_counts[id]`` best-scored channels."""
    kept: dict[int, np.ndarray] = {}
    for g in scored.prunable:
        order = np.argsort(-scored.scores[g.id].scores, kind="stable")
        kept[g.id] = np.sort(order[: keep_counts[g.id]]).astype(np.int64)
    plan = _build_plan(scored.model, scored.graph, scored.requested, scored.scores, kept)
    if scored.trace is not None:
        _record_compensation(plan, scored.graph, scored.trace, scored.weights, scored.live)
    plan.round_to = int(scored.spec.round_to)
    plan.device_kind = scored.device_kind
    return plan


def _freeze_excluded(graph: ChannelGraph, groups: list[Group], exclude: tuple[str, ...]) -> None:
    if not exclude:
        return
    paths = set(graph.touched) | {p for p, _ in graph.edits}
    by_group = graph.space_to_group()
    for name in exclude:
        hits = [p for p in paths if p == name or p.rsplit("/", 1)[-1] == name]
        if not hits:
            raise InvalidSpecError(
                "exclude must name layers of the model whose channels can change. "
                f"Received: {name!r}",
                "exclude",
            )
        for path in hits:
            spaces = set(graph.touched.get(path, ()))
            for (p, _), edit in graph.edits.items():
                if p == path:
                    spaces.update(layout_spaces(edit.layout))
            for sid in spaces:
                grp = groups[by_group[sid]]
                reason = f"layer '{path}' is excluded by the spec"
                if reason not in grp.frozen:
                    grp.frozen.append(reason)


def _score_live(
    scores: dict[int, GroupScore], live: Mapping[int, Mapping[int, str]]
) -> dict[int, GroupScore]:
    """Rank channels whose removal would drop a constant inexactly as most important."""
    out = dict(scores)
    for gid, channels in live.items():
        if gid in out and channels:
            values = np.array(out[gid].scores, dtype=np.float64)
            values[sorted(channels)] = np.inf
            out[gid] = replace(out[gid], scores=values)
    return out


def _record_compensation(
    plan: PruningPlan,
    graph: ChannelGraph,
    trace: ConstantTrace,
    weights: WeightGetter,
    live: Mapping[int, Mapping[int, str]],
) -> None:
    """Write which channels bias compensation folds, and its caveats, into the plan."""
    kept = keep_function(graph, {g.id: np.asarray(g.kept) for g in plan.groups})
    comp = fold(graph, trace, kept, weights)
    for gp in plan.groups:
        gp.compensated = sorted(comp.channels.get(gp.id, ()))
        gp.notes.extend(n for n in comp.notes.get(gp.id, []) if n not in gp.notes)
        held = sorted(set(live.get(gp.id, {})) & set(gp.kept))
        if held and not gp.frozen:
            gp.notes.append(
                f"channels {held} kept as live: each outputs a non-zero constant that "
                f"no bias can take in ({live[gp.id][held[0]]})"
            )
    plan.bias_added = new_biases(graph, comp)
    plan.params_after += new_bias_params(graph, comp, kept)


def _build_plan(
    model: Any,
    graph: ChannelGraph,
    spec: PruneSpec,
    scores: dict[int, GroupScore],
    kept: dict[int, np.ndarray],
) -> PruningPlan:
    groups = graph.groups()
    group_plans = []
    for g in groups:
        keep = kept.get(g.id, np.arange(g.size))
        sc = scores.get(g.id)
        members = sorted(
            {Member(m.layer, m.weight_name, m.axis, m.role) for m in g.members},
            key=lambda m: (m.layer, m.weight, m.axis),
        )
        group_plans.append(
            GroupPlan(
                id=g.id,
                origins=list(g.origins),
                members=members,
                size_before=g.size,
                size_after=len(keep),
                kept=[int(k) for k in keep],
                criterion=sc.criterion if sc else None,
                fallback=sc.fallback if sc else None,
                frozen=list(g.frozen) or ([] if g.size > 1 else [f"a single {_unit(g)}"]),
                notes=list(g.notes),
                kind=g.kind,
                unit=g.unit,
            )
        )
    params_before, flops_before = graph.count()
    kept_fn = keep_function(graph, {g.id: np.asarray(g.kept) for g in group_plans})
    params_after, flops_after = graph.count(kept_fn)
    plan = PruningPlan(
        spec=spec.to_dict(),
        model_name=str(model.name),
        groups=group_plans,
        params_before=params_before,
        params_after=params_after,
        flops_before=flops_before,
        flops_after=flops_after,
        unsupported_layers=[{"layer": p, "class": c, "reason": r} for p, c, r in graph.unsupported],
    )
    plan.validate()
    return plan


def _unit(group: Group) -> str:
    return "head" if group.kind == "heads" else "channel"


def keep_function(graph: ChannelGraph, kept_by_group: Mapping[int, np.ndarray]) -> Any:
    """A ``space id -> kept indices`` function from per-group kept indices."""
    space_group = graph.space_to_group()
    arrays = {gid: np.asarray(k, dtype=np.int64) for gid, k in kept_by_group.items()}

    def kept(sid: int) -> np.ndarray:
        gid = int(space_group[sid])
        if gid < 0:  # a refined space keeps what its parts or blocks keep
            return kept_positions(graph.definition(sid) or (), kept)
        return arrays[gid]

    return kept
