"""Space refinement: seeing one channel space as parts or as blocks.

Some nodes do not prune a space's channels one by one:

- ``keras.ops.split`` (CSP halves, a qkv ``Dense(3d)`` split) makes the
  channels *consecutive parts*, each pruned on its own;
- a grouped convolution, GroupNormalization and attention heads reshaped
  out of a Dense make them *blocks* of ``b`` consecutive channels, each
  pruned whole.

:meth:`Refinable.split` and :meth:`Refinable.blocks` refine the spaces a
layout covers: a refined space gets a *definition*, a layout over new
spaces (``(Seg(p1), Seg(p2))`` for parts, ``(Inner((Seg(u),), b),)`` for
blocks) that every layout referring to it is read as. Definitions belong to
a union-find class, so every space coupled with a refined one is refined
alike; coupling two differently refined classes refines both to their
common refinement (cuts at both's boundaries, blocks where one side has
them), and freezes them when there is none. Once tracing is done,
:meth:`Refinable.finalize` rewrites every recorded layout over unrefined
spaces, so scoring, allocation, ``kept_positions`` and surgery see plain
layouts whose Seg channels are the decision units (a block space's
channel is ``b`` original channels).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from secateur.pruner import layout as lay
from secateur.pruner.layout import Inner, Layout, Rep, Seg


class Unrefinable(Exception):
    """A layout cannot be seen as the parts or blocks asked for."""


class Refinable:
    """Space refinement for :class:`secateur.pruner.graph.ChannelGraph`."""

    spaces: list[Any]
    _defs: dict[int, Layout]
    _version: int

    def find(self, sid: int) -> int:
        raise NotImplementedError

    def new_space(self, size: int | None, origin: str, frozen: str | None = None) -> Layout:
        raise NotImplementedError

    def _union(self, a: int, b: int) -> None:
        raise NotImplementedError

    # -- reading refined spaces ------------------------------------------
    def definition(self, sid: int) -> Layout | None:
        """What a refined space's channels are made of; None when not refined."""
        return self._defs.get(self.find(sid)) if self._defs else None

    def expand(self, layout: Layout) -> Layout:
        """``layout`` with every refined space replaced by its definition, recursively."""
        if not self._defs:
            return layout
        out: list[lay.Item] = []
        for item in layout:
            if isinstance(item, Seg):
                d = self._defs.get(self.find(item.space))
                out.extend((item,) if d is None else self.expand(d))
            elif isinstance(item, Rep):
                out.append(Rep(item.n, self.expand(item.layout)))
            else:
                out.append(Inner(self.expand(item.layout), item.k))
        return tuple(out)

    def leaves(self, sids: Iterable[int]) -> set[int]:
        """The unrefined spaces that the given spaces are made of."""
        out: set[int] = set()
        for sid in sids:
            d = self.definition(sid)
            out.update(self.leaves(lay.spaces(d)) if d is not None else (sid,))
        return out

    # -- the two refinements ---------------------------------------------
    def split(self, layout: Layout, sizes: Sequence[int]) -> list[Layout]:
        """See ``layout``'s channels as consecutive parts, each pruned on its own.

        Args:
            layout: a tensor's channel layout.
            sizes: channels of each part, in order; they add up to the layout's size.

        Returns:
            One layout per part, over spaces refined where a cut fell inside one.

        Raises:
            Unrefinable: the sizes do not add up, or a cut falls inside one
                repetition of a flattened layout or one run of repeated channels.
        """
        total = lay.size(layout)
        if sum(sizes) != total or any(s < 0 for s in sizes):
            raise Unrefinable(
                f"split sections must add up to the {total} channels. Received: {list(sizes)}"
            )
        edges = np.cumsum([0, *sizes]).tolist()
        self._cut(layout, edges[1:-1])
        flat = self.expand(layout)
        return [lay.slice_layout(flat, a, b) for a, b in itertools.pairwise(edges)]

    def blocks(self, layout: Layout, b: int, kind: str | None = None) -> Layout:
        """See ``layout``'s channels as blocks of ``b`` consecutive channels pruned whole.

        Args:
            layout: a tensor's channel layout.
            b: channels per block.
            kind: the kind of the block spaces created (default: their space's).

        Returns:
            The layout of the blocks, one position per block; unify it with
            another block layout to prune the blocks together.

        Raises:
            Unrefinable: ``b`` does not divide the layout, or a block would
                straddle two spaces or repetitions.
        """
        if b < 1 or lay.size(layout) % b:
            raise Unrefinable(
                f"blocks of {b} channels must tile the {lay.size(layout)} channels exactly"
            )
        if b == 1:
            return self.expand(layout)
        while self._block_once(self.expand(layout), b, kind):
            pass
        return _units(self.expand(layout), b)

    # -- refining ----------------------------------------------------------
    def _part(self, size: int, origin: str, unit: int, kind: str) -> Seg:
        space = self.spaces[next(lay.spaces(self.new_space(size, origin)))]
        space.unit, space.kind = unit, kind
        return Seg(space.id, size)

    def _refine(self, sid: int, definition: Layout) -> None:
        self._defs[self.find(sid)] = definition
        self._version += 1

    def _refine_parts(self, sid: int, edges: Sequence[int]) -> None:
        root = self.spaces[self.find(sid)]
        parts = tuple(
            self._part(b - a, f"{root.origin}[{a}:{b}]", root.unit, root.kind)
            for a, b in itertools.pairwise(edges)
        )
        self._refine(sid, parts)

    def _refine_blocks(self, sid: int, size: int, b: int, kind: str | None) -> None:
        root = self.spaces[self.find(sid)]
        unit = self._part(size // b, f"{root.origin}/{b}", root.unit * b, kind or root.kind)
        self._refine(sid, (Inner((unit,), b),))

    def _cut(self, layout: Layout, cuts: Sequence[int]) -> None:
        while self._cut_once(self.expand(layout), cuts):
            pass

    def _cut_once(self, layout: Layout, cuts: Sequence[int]) -> bool:
        """Refine the first space a cut falls inside; False when there is none."""
        offset = 0
        for item in layout:
            n = lay.item_size(item)
            inside = [c - offset for c in cuts if offset < c < offset + n]
            offset += n
            if not inside:
                continue
            if isinstance(item, Seg):
                self._refine_parts(item.space, [0, *inside, n])
                return True
            if isinstance(item, Rep):
                step = lay.size(item.layout)
                if any(c % step for c in inside):
                    raise Unrefinable("a cut falls inside one position of a flattened layout")
            elif any(c % item.k for c in inside):
                raise Unrefinable(f"a cut falls inside a run of {item.k} repeated channels")
            elif self._cut_once(item.layout, [c // item.k for c in inside]):
                return True
        return False

    def _block_once(self, layout: Layout, b: int, kind: str | None) -> bool:
        """Refine the first space not yet in blocks of ``b``; False when there is none."""
        for item in layout:
            if lay.item_size(item) % b:
                raise Unrefinable(f"a block of {b} channels would straddle two spaces")
            if isinstance(item, Seg):
                self._refine_blocks(item.space, item.size, b, kind)
                return True
            if isinstance(item, Rep):
                if self._block_once(item.layout, b, kind):
                    return True
            elif item.k % b == 0:
                continue
            elif b % item.k:
                raise Unrefinable(f"blocks of {b} do not fit runs of {item.k} repeated channels")
            elif self._block_once(item.layout, b // item.k, kind):
                return True
        return False

    # -- coupling refined layouts ------------------------------------------
    def align(self, a: Layout, b: Layout) -> list[tuple[int, int]] | None:
        """Spaces to union so ``a`` and ``b`` share channels position by position.

        Both are refined to their common refinement first (a concat of two
        parts against one space cuts the space; blocks against a plain space
        make it blocks). None when there is none: sizes differ, or the
        layouts repeat channels differently.
        """
        if lay.size(a) != lay.size(b):
            return None
        try:
            for _ in range(64):
                ea, eb = self.expand(a), self.expand(b)
                if _same_structure(ea, eb):
                    return [(x.space, y.space) for x, y in zip(_segs(ea), _segs(eb))]
                if not self._align_once(ea, eb):
                    return None
        except Unrefinable:
            return None
        return None

    def _align_once(self, a: Layout, b: Layout) -> bool:
        """One refinement towards ``a`` and ``b`` having the same structure."""
        version = self._version
        cuts = sorted(set(lay.boundaries(a)[1:-1]) | set(lay.boundaries(b)[1:-1]))
        self._cut(a, cuts)
        self._cut(b, cuts)
        if self._version != version:
            return True
        for x, y in zip(a, b):
            if isinstance(x, Seg) and isinstance(y, Inner):
                self.blocks((x,), y.k)
                return True
            if isinstance(y, Seg) and isinstance(x, Inner):
                self.blocks((y,), x.k)
                return True
            if isinstance(x, Inner) and isinstance(y, Inner):
                same = x.k == y.k
            else:
                same = isinstance(x, Rep) and isinstance(y, Rep) and x.n == y.n
            if same and self._align_once(x.layout, y.layout):  # type: ignore[union-attr]
                return True
        return False

    def merge_definitions(self, root: int, other: Layout | None) -> list[tuple[int, int]] | None:
        """Give the merged class ``root`` one definition; pairs to union, None if none fits."""
        mine = self._defs.get(root)
        if other is None:
            return []
        if mine is None:
            self._refine(root, other)
            return []
        self._version += 1
        return self.align(mine, other)


def _units(layout: Layout, b: int) -> Layout:
    """The block layout of a layout already refined into blocks of ``b``."""
    out: list[lay.Item] = []
    for item in layout:
        if isinstance(item, Rep):
            out.append(Rep(item.n, _units(item.layout, b)))
        elif isinstance(item, Inner) and item.k % b == 0:
            out.extend(item.layout if item.k == b else (Inner(item.layout, item.k // b),))
        elif isinstance(item, Inner):
            out.extend(_units(item.layout, b // item.k))
        else:
            raise Unrefinable(f"space {item.space} is not in blocks of {b}")
    return tuple(out)


def _segs(layout: Layout) -> Iterable[Seg]:
    for item in layout:
        if isinstance(item, Seg):
            yield item
        else:
            yield from _segs(item.layout)


def _same_structure(a: Layout, b: Layout) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, Seg) and isinstance(y, Seg):
            if x.size != y.size:
                return False
        elif isinstance(x, Rep) and isinstance(y, Rep):
            if x.n != y.n or not _same_structure(x.layout, y.layout):
                return False
        elif isinstance(x, Inner) and isinstance(y, Inner):
            if x.k != y.k or not _same_structure(x.layout, y.layout):
                return False
        else:
            return False
    return True
