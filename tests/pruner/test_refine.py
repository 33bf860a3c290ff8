"""Space refinement: a space seen as consecutive parts or as blocks of channels."""

from __future__ import annotations

import numpy as np
import pytest

from secateur.pruner import layout as lay
from secateur.pruner.graph import ChannelGraph, Unrefinable
from secateur.pruner.layout import Inner, Rep, Seg
from secateur.pruner.plan import keep_function


def _kept_by_group(graph: ChannelGraph, choose: dict[str, list[int]]) -> dict[int, np.ndarray]:
    """Kept indices per group, by the first origin of the group (default: all)."""
    out = {}
    for g in graph.groups():
        out[g.id] = np.asarray(choose.get(g.origins[0], range(g.size)), dtype=np.int64)
    return out


def test_split_cutsTheSpace_partsArePrunedIndependently() -> None:
    graph = ChannelGraph()
    x = graph.new_space(8, "conv")
    a, b = graph.split(x, [3, 5])
    assert lay.size(a) == 3 and lay.size(b) == 5
    groups = graph.groups()
    assert [g.origins for g in groups] == [["conv[0:3]"], ["conv[3:8]"]]
    kept = keep_function(graph, _kept_by_group(graph, {"conv[0:3]": [1], "conv[3:8]": [0, 4]}))
    # The unsplit space keeps part 1's channel 1 and part 2's channels 0 and 4.
    np.testing.assert_array_equal(lay.kept_positions(x, kept), [1, 3, 7])
    np.testing.assert_array_equal(lay.kept_positions(graph.expand(x), kept), [1, 3, 7])


def test_split_ofAConcat_cutsOnlyTheSpaceACutFallsIn() -> None:
    graph = ChannelGraph()
    cat = graph.new_space(4, "a") + graph.new_space(6, "b")
    first, second = graph.split(cat, [6, 4])
    assert first == (Seg(0, 4), *graph.expand((Seg(1, 6),))[:1])
    assert lay.size(second) == 4
    assert graph.definition(0) is None and graph.definition(1) is not None
    assert sorted(o for g in graph.groups() for o in g.origins) == ["a", "b[0:2]", "b[2:6]"]


def test_blocks_refineIntoUnits_keptPositionsAreWholeBlocks() -> None:
    graph = ChannelGraph()
    x = graph.new_space(12, "conv")
    units = graph.blocks(x, 4)
    assert lay.size(units) == 3
    (grp,) = graph.groups()
    assert grp.size == 3 and grp.unit == 4
    kept = keep_function(graph, {grp.id: np.array([0, 2])})
    np.testing.assert_array_equal(lay.kept_positions(x, kept), [0, 1, 2, 3, 8, 9, 10, 11])
    assert graph.expand(x) == (Inner(units, 4),)


def test_blocks_onFlattenedAndRepeatedLayouts() -> None:
    graph = ChannelGraph()
    s = graph.new_space(4, "conv")
    # Depthwise multiplier 4 repeats each channel 4 times: blocks of 4 are its channels.
    assert graph.blocks((Inner(s, 4),), 4) == s
    # Blocks of 2 inside runs of 4: each channel is two blocks.
    assert graph.blocks((Inner(s, 4),), 2) == (Inner(s, 2),)
    flat = graph.blocks((Rep(3, s),), 2)
    assert lay.size(flat) == 6
    assert isinstance(flat[0], Rep) and lay.size(flat[0].layout) == 2


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda g: g.split(g.new_space(8, "c"), [3, 3]), "add up"),
        (lambda g: g.blocks(g.new_space(8, "c"), 3), "tile"),
        (lambda g: g.blocks(g.new_space(3, "a") + g.new_space(5, "b"), 4), "straddle"),
        (lambda g: g.split((Rep(2, g.new_space(3, "c")),), [2, 4]), "flattened"),
        (lambda g: g.split((Inner(g.new_space(3, "c"), 2),), [3, 3]), "run of 2"),
    ],
)
def test_impossibleRefinement_raisesUnrefinable(make, why: str) -> None:
    with pytest.raises(Unrefinable, match=why):
        make(ChannelGraph())


def test_unify_concatAgainstOneSpace_refinesItInsteadOfFreezing() -> None:
    graph = ChannelGraph()
    cat = graph.new_space(4, "a") + graph.new_space(6, "b")
    whole = graph.new_space(10, "c")
    graph.unify([cat, whole], "add")
    groups = graph.groups()
    assert all(not g.frozen for g in groups)
    assert sorted(sorted(g.origins) for g in groups) == [["a", "c[0:4]"], ["b", "c[4:10]"]]


def test_unify_blocksAgainstPlainSpace_makesItBlocks() -> None:
    graph = ChannelGraph()
    grouped = graph.new_space(8, "g")
    graph.blocks(grouped, 2)
    plain = graph.new_space(8, "p")
    graph.unify([plain, grouped], "add")
    (grp,) = graph.groups()
    assert grp.size == 4 and grp.unit == 2 and not grp.frozen


def test_unionOfRefinedSpaces_sameRefinementIsShared() -> None:
    graph = ChannelGraph()
    x, y = graph.new_space(8, "x"), graph.new_space(8, "y")
    x_parts = graph.split(x, [4, 4])
    y_parts = graph.split(y, [4, 4])
    graph.unify([x, y], "add")
    by_space = {s: g.id for g in graph.groups() for s in g.spaces}
    for xp, yp in zip(x_parts, y_parts, strict=True):
        (xs,), (ys,) = lay.spaces(xp), lay.spaces(yp)
        assert by_space[xs] == by_space[ys]
    assert len(graph.groups()) == 2


def test_commonRefinement_ofTwoSplits_cutsBoth() -> None:
    graph = ChannelGraph()
    x, y = graph.new_space(8, "x"), graph.new_space(8, "y")
    graph.split(x, [2, 6])
    graph.split(y, [4, 4])
    graph.unify([x, y], "add")
    groups = graph.groups()
    assert sorted(g.size for g in groups) == [2, 2, 4]
    assert all(not g.frozen for g in groups)


def test_inconsistentRefinement_freezesWithReason() -> None:
    graph = ChannelGraph()
    x, y = graph.new_space(6, "x"), graph.new_space(6, "y")
    graph.blocks(x, 2)
    graph.blocks(y, 3)
    graph.unify([x, y], "add")
    groups = graph.groups()
    assert groups and all(g.frozen for g in groups)
    assert any("in two ways" in r or "different layouts" in r for g in groups for r in g.frozen)


def test_freezeBeforeRefinement_reachesEveryPart() -> None:
    graph = ChannelGraph()
    x = graph.new_space(8, "x", frozen="touches model input")
    graph.split(x, [4, 4])
    groups = graph.groups()
    assert len(groups) == 2
    assert all(g.frozen == ["touches model input"] for g in groups)


def test_finalize_rewritesRecordedLayouts() -> None:
    from secateur.pruner.graph import WeightAxis

    graph = ChannelGraph()
    x = graph.new_space(6, "conv")
    graph.add_axis(WeightAxis("conv", 0, "kernel", 3, x, "out"))
    graph.tensor_layouts[1] = x
    graph.split(x, [2, 4])
    graph.groups()
    layout = graph.axes[("conv", 0)][3].layout
    assert [lay.size((item,)) for item in layout] == [2, 4]
    assert graph.tensor_layouts[1] == layout
    assert graph.touched["conv"] == set(lay.spaces(layout))
    members = [len(g.members) for g in graph.groups()]
    assert members == [1, 1]
