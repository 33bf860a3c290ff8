"""How much of a model a plan can prune, and what froze the rest.

A group is frozen for one or more reasons (``GroupPlan.frozen``), written per
layer ("layer 'block_3/conv' (Foo): layer class is not in the registry"). The
report counts channels per *normalised* reason (layer names dropped, the class
kept, shapes such as ``(16, 2, 8)`` dropped), so the same cause across a
hundred blocks adds up to one line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_LAYER_REASON = re.compile(r"^layer '[^']*' \(([^)]*)\): (.*)$", re.DOTALL)
_QUOTED = re.compile(r"'[^']*'")
_DIM = r"(?:-?\d+|None)"
_SHAPE = re.compile(rf"\(\s*{_DIM}(?:\s*,\s*{_DIM})*\s*,?\s*\)")


@dataclass(frozen=True)
class FrozenReason:
    """Channels frozen for one normalised reason.

    Attributes:
        reason: the reason with layer names replaced by ``<layer>``, shapes
            by ``<shape>``.
        channels: channels of the groups frozen for it (a group frozen for
            several reasons counts under each).
        groups: how many groups it freezes.
        example: one reason as written, with its layer name.
    """

    reason: str
    channels: int
    groups: int
    example: str


def normalise_reason(reason: str) -> str:
    """``"layer 'a/b' (Foo): why 'x' (8, 4)"`` -> ``"Foo: why <layer> <shape>"``."""
    match = _LAYER_REASON.match(reason)
    if match:
        reason = f"{match.group(1)}: {match.group(2)}"
    reason = _SHAPE.sub("<shape>", _QUOTED.sub("<layer>", reason))
    return " ".join(reason.split())


def _channel_groups(groups: Iterable[Any]) -> list[Any]:
    # Attention-head groups (kind "heads") count heads, not channels.
    return [g for g in groups if getattr(g, "kind", "channels") == "channels"]


def _channels(group: Any) -> int:
    # A group pruned in whole blocks counts blocks of ``unit`` channels.
    return int(group.size_before) * int(getattr(group, "unit", 1) or 1)


def prunable_share(groups: Iterable[Any]) -> float:
    """Share of all channels that lie in groups the plan may prune."""
    channel_groups = _channel_groups(groups)
    total = sum(_channels(g) for g in channel_groups)
    free = sum(_channels(g) for g in channel_groups if not g.frozen)
    return free / total if total else 0.0


def frozen_reasons(groups: Iterable[Any]) -> list[FrozenReason]:
    """Normalised reasons of the frozen channel groups, most channels first."""
    channels: dict[str, int] = {}
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    for g in _channel_groups(groups):
        for key, raw in {normalise_reason(r): r for r in reversed(g.frozen)}.items():
            channels[key] = channels.get(key, 0) + _channels(g)
            counts[key] = counts.get(key, 0) + 1
            examples.setdefault(key, raw)
    return sorted(
        (FrozenReason(k, channels[k], counts[k], examples[k]) for k in channels),
        key=lambda r: (-r.channels, r.reason),
    )


_BOUNDARY = ("touches model input", "touches model output")


def sole_blocker(groups: Iterable[Any]) -> str | None:
    """The one layer class that freezes a model with nothing to prune, if there is one.

    Returns:
        ``"every channel group is frozen by layer class Foo (why)"`` when no
        channel group of more than one channel is prunable and one class is
        named in the reasons of every group frozen for anything but touching
        the model's inputs or outputs; None otherwise.
    """
    channel_groups = [g for g in _channel_groups(groups) if int(g.size_before) > 1]
    if not channel_groups or any(not g.frozen for g in channel_groups):
        return None
    common: dict[str, str] | None = None
    for g in channel_groups:
        named = {m.group(1): m.group(2) for r in g.frozen if (m := _LAYER_REASON.match(r))}
        if not named and all(r in _BOUNDARY for r in g.frozen):
            continue
        common = named if common is None else {k: v for k, v in common.items() if k in named}
    if not common or len(common) != 1:
        return None
    cls, why = next(iter(common.items()))
    return f"every channel group is frozen by layer class {cls} ({normalise_reason(why)})"


def describe(
    share: float, reasons: Sequence[FrozenReason], top: int = 3, blocker: str | None = None
) -> str:
    """One line: the prunable share and the ``top`` reasons for the rest.

    A ``blocker`` (:func:`sole_blocker`) comes first, in place of the list.
    """
    if blocker:
        return f"{share:.0%} of channels prunable: {blocker}"
    text = f"{share:.0%} of channels prunable"
    if reasons:
        listed = "; ".join(f"{r.reason} ({r.channels:,} ch)" for r in reasons[:top])
        more = f"; +{len(reasons) - top} more" if len(reasons) > top else ""
        text += f"; frozen: {listed}{more}"
    return text
