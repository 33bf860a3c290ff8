"""Channel layouts: how a tensor's last axis maps onto channel spaces.

A *space* is a set of channels created by one producer (a Conv's filters, a
Dense's units, a model input, the output of an unsupported layer). A tensor's
channel axis is described by a *layout*: a tuple of items, each either

- ``Seg(space, size)``: all channels of one space, in order;
- ``Rep(n, layout)``: the inner layout repeated ``n`` times, as Flatten lays
  out (H, W, C) into H*W*C features (index = position * C + channel);
- ``Inner(layout, k)``: every channel of the inner layout repeated ``k``
  times consecutively, as a depthwise conv with depth_multiplier k does.

Concatenation along the channel axis is tuple concatenation. Given the kept
channel indices of every space, :func:`kept_positions` returns the positions
of a layout that survive, which is exactly the slice to take from a weight
axis described by that layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Seg:
    space: int
    size: int


@dataclass(frozen=True)
class Rep:
    n: int
    layout: Layout


@dataclass(frozen=True)
class Inner:
    layout: Layout
    k: int


Item = Seg | Rep | Inner
Layout = tuple[Item, ...]


def size(layout: Layout) -> int:
    """Number of positions of the layout."""
    total = 0
    for item in layout:
        if isinstance(item, Seg):
            total += item.size
        elif isinstance(item, Rep):
            total += item.n * size(item.layout)
        else:
            total += item.k * size(item.layout)
    return total


def spaces(layout: Layout) -> Iterator[int]:
    """Every space id the layout refers to (with repeats)."""
    for item in layout:
        if isinstance(item, Seg):
            yield item.space
        else:
            yield from spaces(item.layout)


def kept_positions(layout: Layout, kept: Callable[[int], np.ndarray]) -> np.ndarray:
    """Positions of ``layout`` that survive when space ``s`` keeps ``kept(s)``.

    Args:
        layout: the layout of a weight axis or tensor channel axis.
        kept: maps a space id to its sorted kept channel indices.

    Returns:
        Sorted int64 positions into the original axis.
    """
    parts: list[np.ndarray] = []
    offset = 0
    for item in layout:
        if isinstance(item, Seg):
            parts.append(kept(item.space) + offset)
            offset += item.size
        elif isinstance(item, Rep):
            inner = kept_positions(item.layout, kept)
            step = size(item.layout)
            blocks = np.arange(item.n, dtype=np.int64)[:, None] * step
            parts.append((blocks + inner[None, :]).reshape(-1) + offset)
            offset += item.n * step
        else:
            inner = kept_positions(item.layout, kept)
            sub = np.arange(item.k, dtype=np.int64)[None, :]
            parts.append((inner[:, None] * item.k + sub).reshape(-1) + offset)
            offset += item.k * size(item.layout)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(parts).astype(np.int64)


def position_owner(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """For each position: the space it belongs to and the channel within it.

    Returns:
        ``(space_ids, channels)``, two int64 arrays of length ``size(layout)``.
    """
    owners: list[np.ndarray] = []
    channels: list[np.ndarray] = []
    for item in layout:
        if isinstance(item, Seg):
            owners.append(np.full(item.size, item.space, dtype=np.int64))
            channels.append(np.arange(item.size, dtype=np.int64))
        elif isinstance(item, Rep):
            o, c = position_owner(item.layout)
            owners.append(np.tile(o, item.n))
            channels.append(np.tile(c, item.n))
        else:
            o, c = position_owner(item.layout)
            owners.append(np.repeat(o, item.k))
            channels.append(np.repeat(c, item.k))
    if not owners:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    return np.concatenate(owners), np.concatenate(channels)


def remap(layout: Layout, find: Mapping[int, int] | Callable[[int], int]) -> Layout:
    """The same layout with every space id replaced by ``find(space)``."""
    fn = find if callable(find) else find.__getitem__
    out: list[Item] = []
    for item in layout:
        if isinstance(item, Seg):
            out.append(Seg(fn(item.space), item.size))
        elif isinstance(item, Rep):
            out.append(Rep(item.n, remap(item.layout, fn)))
        else:
            out.append(Inner(remap(item.layout, fn), item.k))
    return tuple(out)


def item_size(item: Item) -> int:
    """Number of positions of one layout item."""
    return size((item,))


def boundaries(layout: Layout) -> list[int]:
    """Offsets where the layout's top-level items start and end."""
    out = [0]
    for item in layout:
        out.append(out[-1] + item_size(item))
    return out


def slice_layout(layout: Layout, start: int, stop: int) -> Layout:
    """The positions ``[start, stop)`` of ``layout`` as a layout of their own.

    A cut may fall between items, between repetitions of a ``Rep`` and
    between runs of an ``Inner``; a cut inside a ``Seg`` needs the space
    refined first (:meth:`secateur.pruner.graph.ChannelGraph.split`).

    Raises:
        ValueError: a cut falls inside a ``Seg`` or inside one repetition.
    """
    out: list[Item] = []
    offset = 0
    for item in layout:
        n = item_size(item)
        lo, hi = max(start, offset) - offset, min(stop, offset + n) - offset
        offset += n
        if lo >= hi:
            continue
        if lo == 0 and hi == n:
            out.append(item)
        elif isinstance(item, Rep):
            step = size(item.layout)
            if lo % step or hi % step:
                raise ValueError(f"cut inside a repetition of {step} positions")
            out.append(Rep((hi - lo) // step, item.layout))
        elif isinstance(item, Inner):
            if lo % item.k or hi % item.k:
                raise ValueError(f"cut inside a run of {item.k} repeated positions")
            out.append(Inner(slice_layout(item.layout, lo // item.k, hi // item.k), item.k))
        else:
            raise ValueError(f"cut inside space {item.space}")
    return tuple(out)
