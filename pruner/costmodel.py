"""A cost model measured on the device: each group's cost as a function of its width.

HALP (Shen et al., 2022) allocates channels with a latency table per layer.
Here the table is per channel group and measured on the whole model, in
the execution mode training uses (XLA where :mod:`finetune` uses it), so it
sees what a layer-by-layer table misses (fusion, the allocator, layout
padding): for every prunable group, the model with only that group narrowed
to a few widths is measured against the full model in one interleaved run,
and the difference is the group's cost at that width. Widths are legal
kept counts (``round_to``, ``min_channels``) nearest to ``levels`` of the
group's size. These single-group deltas are not added up: :mod:`costfit`
fits per-layer shares of the figure to them and predicts a plan by scaling
each layer with the widths of both its sides (``f_in * f_out``);
:mod:`budget` measures the rebuilt model to correct what the model misses.

A profile takes ``1 + len(levels)`` measured variants per prunable group
(``profile.measurements``); each variant is cloned, compiled, warmed up and
timed for ``MeasureConfig.rounds * steps`` steps. Measured once on the
shared, heavily loaded 2-core CPU of this project: a 3-group CNN
(96 channels, 24x24 inputs, batch 16, 1 warm-up and 6 timed steps)
profiled 12 variants and, with the check of the rebuilt model, took 41 s
of CPU time (4.7 min of wall time under the load of other jobs); cost
grows with groups x levels x compile time, so large models take long.
On a single-host CPU the variants are measured in child processes
(:mod:`probe`): TensorFlow does not return the memory of a traced model,
and a fresh process every few groups bounds what a profile holds.
Profiles are cached as JSON in a directory the caller
gives (the job's state dir), keyed by the model's architecture digest, the
device kind, the batch size, the TensorFlow version and the metrics, so a
repeated job on one model measures nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from secateur.pruner.allocate import legal_widths
from secateur.pruner.graph import ChannelGraph, Group
from secateur.pruner.meter import DeviceMeter
from secateur.pruner.probe import group_key, measure_here, measure_isolated, model_digest
from secateur.pruner.spec import PruneSpec

PROFILE_VERSION = 1
LEVELS = (0.25, 0.5, 0.75)


class Meter(Protocol):
    """Measures models side by side: name -> metric -> figure (seconds, bytes)."""

    device_kind: str
    batch_size: int

    def measure(
        self, models: Mapping[str, Any], metrics: Sequence[str]
    ) -> dict[str, dict[str, float]]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class CostProfile:
    """Measured cost of each group at a few widths.

    Attributes:
        key: what the profile is valid for (digest, device, batch, TF, metrics).
        base: metric -> the full model's figure.
        groups: group key (``"|"``-joined origins) -> {"widths": [...],
            metric: [cost at each width minus the full model's]}.
        measurements: model variants measured to make it.
        seconds: wall time it took.
        cached: read from the cache instead of measured.
    """

    key: dict[str, Any]
    base: dict[str, float]
    groups: dict[str, dict[str, list[float]]]
    measurements: int
    seconds: float
    how: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def saving(self, group: Group, width: int, metric: str) -> float:
        """Predicted cost saved by keeping ``width`` of ``group`` (0 at full width)."""
        entry = self.groups.get(group_key(group))
        if entry is None or width >= group.size:
            return 0.0
        xs = [*entry["widths"], group.size]
        ys = [*entry[metric], 0.0]
        return max(0.0, -float(np.interp(width, xs, ys)))

    def cuts(self, groups: Sequence[Group], metric: str) -> list[tuple[int, int, float]]:
        """Every probe of ``groups``: (group id, width, figure minus the full model's)."""
        out = []
        for g in groups:
            entry = self.groups.get(group_key(g))
            if entry is not None:
                out += [(g.id, int(w), float(d)) for w, d in zip(entry["widths"], entry[metric])]
        return out


def profile_key(
    model: Any, meter: Meter, metrics: Sequence[str], spec: PruneSpec
) -> dict[str, Any]:
    import tensorflow as tf

    return {
        "version": PROFILE_VERSION,
        "model_digest": model_digest(model),
        "device_kind": meter.device_kind,
        "batch_size": meter.batch_size,
        "tf_version": tf.__version__,
        "metrics": sorted(metrics),
        "round_to": int(spec.round_to),
        "min_channels": spec.min_channels,
        "meter": meter.describe(),
    }


def probe_widths(group: Group, spec: PruneSpec, levels: Sequence[float] = LEVELS) -> list[int]:
    """The legal widths nearest to ``levels`` of the group's size (below the size)."""
    legal = [w for w in legal_widths(group.size, spec, group.unit, most=4096) if w < group.size]
    if not legal:
        return []
    return sorted({min(legal, key=lambda w: (abs(w - f * group.size), w)) for f in levels})


def profile_costs(
    model: Any,
    graph: ChannelGraph,
    groups: Sequence[Group],
    spec: PruneSpec,
    metrics: Sequence[str],
    meter: Meter,
    cache_dir: str | Path | None = None,
    levels: Sequence[float] = LEVELS,
) -> CostProfile:
    """Measure (or read from ``cache_dir``) every group's cost at ``levels`` of its width.

    Args:
        model: the original model.
        graph: its traced graph.
        groups: the prunable groups to profile.
        spec: the request, ``round_to`` resolved (widths are legal counts).
        metrics: ``step_time``, ``latency``, ``peak_memory``.
        meter: measures models on the device.
        cache_dir: where profiles are kept; None measures every time.
        levels: fractions of each group's size to probe.
    """
    key = profile_key(model, meter, metrics, spec) | {"levels": list(levels)}
    path = None
    if cache_dir is not None:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        path = Path(cache_dir) / f"costs-{name}.json"
        cached = _read(path, key)
        if cached is not None:
            return cached
    start = time.perf_counter()
    base_runs: dict[str, list[float]] = {m: [] for m in metrics}
    table: dict[str, dict[str, list[float]]] = {}
    count = 0
    jobs = [(group_key(g), probe_widths(g, spec, levels)) for g in groups]
    jobs = [j for j in jobs if j[1]]
    how = dict(meter.describe())
    measured = _measured(model, graph, jobs, metrics, meter, key["model_digest"], how)
    for group, widths, figures in measured:
        count += len(figures)
        entry: dict[str, list[float]] = {"widths": [float(w) for w in widths]}
        for m in metrics:
            base_runs[m].append(figures["full"][m])
            entry[m] = [figures[str(w)][m] - figures["full"][m] for w in widths]
        table[group] = entry
    profile = CostProfile(
        key=key,
        base={m: float(np.median(v)) if v else 0.0 for m, v in base_runs.items()},
        groups=table,
        measurements=count,
        seconds=time.perf_counter() - start,
        how=how,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(profile)))
        tmp.replace(path)
    return profile


def _read(path: Path, key: dict[str, Any]) -> CostProfile | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("key") != key:
        return None
    data["cached"] = True
    return CostProfile(**data)


def _measured(
    model: Any,
    graph: ChannelGraph,
    jobs: list[tuple[str, list[int]]],
    metrics: Sequence[str],
    meter: Meter,
    digest: str,
    how: dict[str, Any],
) -> Iterator[tuple[str, list[int], dict[str, dict[str, float]]]]:
    """Each job's figures: from child processes where the meter isolates, else here.

    ``how["profile_processes"]`` records where they were measured (0: this process).
    """
    how["profile_processes"] = 0
    if not (isinstance(meter, DeviceMeter) and meter.isolate):
        yield from measure_here(model, graph, jobs, metrics, meter)
        return
    stats: dict[str, Any] = {}
    finished = 0
    for result in measure_isolated(model, jobs, metrics, meter, digest, stats=stats):
        finished += 1
        yield result
    how["profile_processes"] = stats["processes"]
    if stats.get("fallback"):
        how["profile_isolation_failed"] = stats["fallback"]
        yield from measure_here(model, graph, jobs[finished:], metrics, meter)
