"""The channel graph: channel spaces, weight axes and the groups they form.

Every tensor's channel axis (the last one; channels_last) gets a layout over
channel *spaces* (see :mod:`layout`). :mod:`tracing` walks a model and asks
the layer handlers, registered by exact layer class in :mod:`handlers`, how
each layer's outputs relate to its inputs and which weight axes follow which
layout. Spaces that must lose the same
channels (the two inputs of an Add, a shared layer's calls) are merged with a
union-find; each resulting class is a *group*. Anything the tracer cannot
prove safe freezes the spaces it touches, with the reason recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from secateur.pruner import layout as lay
from secateur.pruner.layout import Layout, Seg
from secateur.pruner.refine import Refinable, Unrefinable

__all__ = ["ChannelGraph", "ConfigEdit", "Group", "Space", "Unrefinable", "WeightAxis"]

# Roles of weight axes. The first set carries a channel's own parameters:
# zeroing them makes the channel dead, which is what exactness tests rely on.
PRODUCER_ROLES = frozenset({"out", "bias", "depthwise", "bn_gamma", "bn_beta", "scale", "shift"})
ROLES = PRODUCER_ROLES | {"in", "bn_stat", "param"}


@dataclass
class Space:
    """A set of channels made by one producer."""

    id: int
    size: int
    origin: str
    frozen: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # "channels", or "heads" for attention heads (allocated by head_ratio), or
    # "inner" for a frozen axis inside one head (attention_ops.py).
    kind: str = "channels"
    # Original channels per channel of this space (b for a space of blocks).
    unit: int = 1


@dataclass(frozen=True)
class WeightAxis:
    """One axis of one weight that follows a channel layout."""

    layer: str
    weight: int
    weight_name: str
    axis: int
    layout: Layout
    role: str


# Space id -> sorted kept channel indices of that space.
KeptFn = Callable[[int], np.ndarray]


@dataclass(frozen=True)
class ConfigEdit:
    """A config entry that must change with the kept channel count.

    ``kind`` is ``"size"`` (the new count), ``"last_dim"`` (a shape tuple
    whose last entry becomes the new count) or ``"flat"`` (a shape of one
    entry, the new flattened size). When ``compute`` is given it overrides
    ``kind``: the new value is ``compute(old_value, kept)``, for values the
    generic kinds cannot express (split indices, head counts, ...). ``layer``
    may name a layer or a keras.ops node's operation; either is re-created
    from its edited ``get_config()``.
    """

    layer: str
    key: str
    layout: Layout
    kind: str = "size"
    compute: Callable[[Any, KeptFn], Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class FlopTerm:
    """``2 * positions * size(weight)`` multiply-add FLOPs per example."""

    layer: str
    weight: int
    positions: int


@dataclass
class Group:
    """Spaces that must keep the same channel indices."""

    id: int
    spaces: list[int]
    size: int
    frozen: list[str]
    notes: list[str]
    members: list[WeightAxis]

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size > 1

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(sorted(self.origins))

    origins: list[str] = field(default_factory=list)
    kind: str = "channels"
    # Original channels per channel of the group (blocks of b count b).
    unit: int = 1


class ChannelGraph(Refinable):
    """The result of tracing a model: spaces, groups and weight axes.

    Spaces can be refined into consecutive parts or blocks
    (:meth:`split`, :meth:`blocks`; see :mod:`secateur.pruner.refine`).

    Attributes:
        layers: layer path ("outer/inner") -> layer object, weighted layers only.
        axes: (layer path, weight index) -> {axis: WeightAxis}.
        edits: (layer path, config key) -> ConfigEdit.
        flops: every multiply-add term, once per call of a layer.
        unsupported: (layer path, class name, reason) for each frozen layer.
        tensor_layouts: ``id(tensor)`` -> channel layout of every traced tensor.
    """

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self._parent: list[int] = []
        self._memo: dict[tuple[str, str], Layout] = {}
        self.layers: dict[str, Any] = {}
        # path -> every traced layer or keras.ops operation (nested models excepted).
        self.operations: dict[str, Any] = {}
        self.axes: dict[tuple[str, int], dict[int, WeightAxis]] = {}
        self.edits: dict[tuple[str, str], ConfigEdit] = {}
        self.flops: list[FlopTerm] = []
        self.unsupported: list[tuple[str, str, str]] = []
        self.touched: dict[str, set[int]] = {}
        # id(KerasTensor) -> layout of its channel axis, for every traced tensor.
        self.tensor_layouts: dict[int, Layout] = {}
        self._groups: list[Group] | None = None
        # Union-find root -> definition of a refined class (see refine.py).
        self._defs: dict[int, Layout] = {}
        self._version = 0
        self._finalized = 0
        # Space id -> a layout frozen whenever it is (attention heads with the
        # axis inside one head of a per-head tensor; see attention_ops.py).
        self.frozen_with: dict[int, Layout] = {}

    # -- spaces and union-find -------------------------------------------
    def new_space(self, size: int | None, origin: str, frozen: str | None = None) -> Layout:
        sid = len(self.spaces)
        space = Space(sid, int(size) if size else 1, origin)
        if not size:
            space.frozen.append(f"channel axis of '{origin}' has unknown size")
        if frozen:
            space.frozen.append(frozen)
        self.spaces.append(space)
        self._parent.append(sid)
        return (Seg(sid, space.size),)

    def memo_space(self, path: str, key: str, size: int | None, origin: str) -> Layout:
        """The space a layer creates, the same one for every call of it."""
        if (path, key) not in self._memo:
            self._memo[(path, key)] = self.new_space(size, origin)
        return self._memo[(path, key)]

    def find(self, sid: int) -> int:
        parent = self._parent
        while parent[sid] != sid:
            parent[sid] = parent[parent[sid]]
            sid = parent[sid]
        return sid

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        root, other = min(ra, rb), max(ra, rb)
        self._parent[other] = root
        theirs = self._defs.pop(other, None)
        pairs = self.merge_definitions(root, theirs)
        if pairs is None:
            reason = (
                f"channels of '{self.spaces[root].origin}' are split into parts or "
                "blocks in two ways that do not fit together"
            )
            self.freeze(self._defs[root], reason)
            self.freeze(theirs or (), reason)
        for x, y in pairs or ():
            self._union(x, y)

    def freeze(self, layout: Layout, reason: str) -> None:
        for sid in set(lay.spaces(layout)):
            if reason not in self.spaces[sid].frozen:
                self.spaces[sid].frozen.append(reason)
                if sid in self.frozen_with:
                    self.freeze(self.frozen_with[sid], reason)

    def note(self, layout: Layout, text: str) -> None:
        for sid in set(lay.spaces(layout)):
            if text not in self.spaces[sid].notes:
                self.spaces[sid].notes.append(text)

    def unify(self, layouts: Sequence[Layout], where: str) -> Layout:
        """Make layouts share channels position by position.

        Layouts of different structure (a concat of two against one space)
        are refined to a common structure first (:meth:`align`); layouts
        that have none (different sizes, different repetitions) are frozen.
        """
        base = layouts[0]
        for other in layouts[1:]:
            pairs = self.align(base, other)
            if pairs is not None:
                for a, b in pairs:
                    self._union(a, b)
            else:
                reason = f"'{where}' couples channels of different layouts"
                self.freeze(base, reason)
                self.freeze(other, reason)
        return base

    # -- recording ---------------------------------------------------------
    def add_axis(self, ax: WeightAxis) -> None:
        self._reaches(ax.layout, ax.layer)
        per_weight = self.axes.setdefault((ax.layer, ax.weight), {})
        old = per_weight.get(ax.axis)
        if old is None:
            per_weight[ax.axis] = ax
        elif old.layout != ax.layout:
            # A shared layer: every call must agree on the same channels.
            self.unify([old.layout, ax.layout], ax.layer)
        self.touched.setdefault(ax.layer, set()).update(lay.spaces(ax.layout))

    def add_edit(self, edit: ConfigEdit) -> None:
        self._reaches(edit.layout, edit.layer)
        old = self.edits.get((edit.layer, edit.key))
        if old is None:
            self.edits[(edit.layer, edit.key)] = edit
        elif old.layout != edit.layout:
            self.unify([old.layout, edit.layout], edit.layer)

    def _reaches(self, layout: Layout, where: str) -> None:
        """A weight or config entry following a ``frozen_with`` space freezes what is linked."""
        for sid in set(lay.spaces(layout)) & self.frozen_with.keys():
            reason = f"an axis inside one attention head reaches '{where}'"
            self.freeze(self.frozen_with[sid], reason)

    # -- groups ------------------------------------------------------------
    def groups(self) -> list[Group]:
        """Groups in trace order, computed once after tracing."""
        if self._groups is not None:
            return self._groups
        self.finalize()
        by_root: dict[int, Group] = {}
        refined: list[Space] = []
        for space in self.spaces:
            root = self.find(space.id)
            if root in self._defs:
                refined.append(space)  # its parts or blocks are the groups
                continue
            grp = by_root.get(root)
            if grp is None:
                grp = Group(
                    len(by_root), [], space.size, [], [], [], kind=space.kind, unit=space.unit
                )
                by_root[root] = grp
            if space.kind != grp.kind:
                grp.frozen.append("attention heads were coupled with channels")
            grp.spaces.append(space.id)
            grp.origins.append(space.origin)
            if space.size != grp.size:  # unions only join equal sizes
                grp.frozen.append("spaces of different sizes were coupled")
            grp.unit = min(grp.unit, space.unit)
            grp.frozen.extend(r for r in space.frozen if r not in grp.frozen)
            grp.notes.extend(n for n in space.notes if n not in grp.notes)
        for space in refined:  # reasons given before refining reach every part
            for leaf in self.leaves([space.id]):
                grp = by_root[self.find(leaf)]
                grp.frozen.extend(r for r in space.frozen if r not in grp.frozen)
                grp.notes.extend(n for n in space.notes if n not in grp.notes)
        for per_weight in self.axes.values():
            for ax in per_weight.values():
                for root in {self.find(s) for s in lay.spaces(ax.layout)}:
                    by_root[root].members.append(ax)
        self._groups = list(by_root.values())
        return self._groups

    def space_to_group(self) -> np.ndarray:
        """Array mapping space id -> group id (-1 for refined spaces)."""
        out = np.full(len(self.spaces), -1, dtype=np.int64)
        for grp in self.groups():
            out[grp.spaces] = grp.id
        return out

    def finalize(self) -> None:
        """Rewrite every recorded layout over unrefined spaces (after tracing).

        Weight axes, config edits, tensor layouts and touched spaces then name
        the parts and blocks that groups are made of; idempotent.
        """
        if self._finalized == self._version:
            return
        self._finalized = self._version
        for per_weight in self.axes.values():
            for axis, ax in per_weight.items():
                per_weight[axis] = replace(ax, layout=self.expand(ax.layout))
        for key, edit in self.edits.items():
            self.edits[key] = replace(edit, layout=self.expand(edit.layout))
        for tid, layout in self.tensor_layouts.items():
            self.tensor_layouts[tid] = self.expand(layout)
        for path, sids in self.touched.items():
            self.touched[path] = self.leaves(sids)

    # -- counting ----------------------------------------------------------
    def weight_shapes(
        self, kept: Callable[[int], np.ndarray] | None = None
    ) -> dict[tuple[str, int], tuple[int, ...]]:
        """Shapes of every traced weight, after pruning when ``kept`` is given."""
        self.finalize()
        shapes: dict[tuple[str, int], tuple[int, ...]] = {}
        seen: set[int] = set()
        for path, layer in self.layers.items():
            for idx, var in enumerate(layer.weights):
                if id(var) in seen:
                    continue
                seen.add(id(var))
                shape = [int(d) for d in var.shape]
                if kept is not None:
                    for axis, ax in self.axes.get((path, idx), {}).items():
                        shape[axis] = len(lay.kept_positions(ax.layout, kept))
                shapes[(path, idx)] = tuple(shape)
        return shapes

    def count(self, kept: Callable[[int], np.ndarray] | None = None) -> tuple[int, int]:
        """(params, FLOPs per example), after pruning when ``kept`` is given."""
        shapes = self.weight_shapes(kept)
        params = sum(int(np.prod(s)) for s in shapes.values())
        flops = sum(
            2 * term.positions * int(np.prod(shapes[(term.layer, term.weight)]))
            for term in self.flops
            if (term.layer, term.weight) in shapes
        )
        return params, flops
