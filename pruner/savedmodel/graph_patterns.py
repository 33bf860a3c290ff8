"""Rewrites of the flat op graph into the shapes of Keras layers, before conversion.

After constant folding, a Keras BatchNormalization is ``x * m + o`` with
``m = rsqrt(var + eps) * gamma`` and ``o = beta - mean * m``; a conv bias is
an ``Add``/``BiasAdd`` of a per-channel constant; swish is ``x *
sigmoid(x)``. These passes turn such chains into single importer-made nodes
(``_Affine``, ``_Swish``, a conv with a ``bias`` field) so each becomes one
layer. A rewrite only fires where the intermediate value has no other
consumer, so nothing the graph reads elsewhere disappears.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from secateur.pruner.savedmodel.graph_inline import FlatGraph, Node, Ref

BIAS_HOSTS = frozenset({"Conv2D", "DepthwiseConv2dNative", "MatMul", "BatchMatMulV2"})
ADDS = frozenset({"Add", "AddV2", "BiasAdd"})


class Rewriter:
    """Pattern rewrites over the live part of a :class:`FlatGraph`.

    Args:
        flat: the graph, edited in place (aliases added, nodes replaced).
        values: folded constants by resolved output.
        order: live nodes in topological order.
        outputs: the signature's outputs (consumers that are not nodes).
    """

    def __init__(
        self, flat: FlatGraph, values: dict[Ref, Any], order: list[Node], outputs: list[Ref]
    ) -> None:
        self.flat, self.values, self.order = flat, values, order
        self.users: dict[Ref, list[Node]] = defaultdict(list)
        for node in order:
            for ref in node.inputs:
                self.users[flat.resolve(ref)].append(node)
        self.outputs = {flat.resolve(r) for r in outputs}

    def run(self) -> None:
        for node in self.order:
            self._drop_unit_scale(node)
        for node in self.order:
            self._swish(node)
        for node in self.order:
            self._affine(node)
        for node in self.order:
            self._dilation(node)
        for node in self.order:
            self._bias(node)

    def const(self, ref: Ref) -> np.ndarray | None:
        value = self.values.get(self.flat.resolve(ref))
        return value if isinstance(value, np.ndarray) else None

    def only_user(self, node: Node) -> Node | None:
        """The one node reading ``node``'s first output, if it has exactly one."""
        ref = (node.name, 0)
        users = self.users.get(ref, [])
        if len(users) != 1 or ref in self.outputs:
            return None
        return users[0] if node.name in self.flat.nodes else None

    def _replace(self, old: Node, new: Node) -> None:
        """Let ``old``'s output stand for ``new``'s from now on."""
        self.flat.alias[(old.name, 0)] = (new.name, 0)
        self.flat.nodes.pop(old.name, None)
        for ref in old.inputs:
            ref = self.flat.resolve(ref)
            self.users[ref] = [u for u in self.users.get(ref, []) if u is not old]
        for user in self.users.pop((old.name, 0), []):
            self.users[(new.name, 0)].append(user)

    def _split(self, node: Node) -> tuple[Ref, np.ndarray, bool] | None:
        """(tensor operand, constant operand, constant first) of a binary op."""
        if len(node.inputs) != 2:
            return None
        a, b = (self.const(r) for r in node.inputs)
        if a is None and b is not None:
            return node.inputs[0], b, False
        if b is None and a is not None:
            return node.inputs[1], a, True
        return None

    def _drop_unit_scale(self, node: Node) -> None:
        """``1 * x`` (Keras' swish multiplies by its beta of 1) is x."""
        split = self._split(node) if node.op == "Mul" else None
        if split is None or split[1].ndim or split[1].dtype.kind != "f" or split[1] != 1:
            return
        self.flat.alias[(node.name, 0)] = split[0]
        self.flat.nodes.pop(node.name, None)
        for user in self.users.pop((node.name, 0), []):
            self.users[self.flat.resolve(split[0])].append(user)

    def _swish(self, node: Node) -> None:
        if node.op != "Mul" or len(node.inputs) != 2 or node.name not in self.flat.nodes:
            return
        a, b = (self.flat.resolve(r) for r in node.inputs)
        for x, s in ((a, b), (b, a)):
            sig = self.flat.nodes.get(s[0])
            if sig is None or sig.op != "Sigmoid" or self.flat.resolve(sig.inputs[0]) != x:
                continue
            if len(self.users.get(s, [])) == 1 and s not in self.outputs:
                node.op, node.inputs = "_Swish", [x]
                self.users[x] = [u for u in self.users[x] if u is not sig]
                return

    def _affine(self, node: Node) -> None:
        """``x * c [+ d]``, ``x / c [+ d]`` -> one ``_Affine`` node (BatchNorm when it is one)."""
        split = self._split(node) if node.op in ("Mul", "RealDiv") else None
        if split is None or node.name not in self.flat.nodes:
            return
        x, c, const_first = split
        if c.dtype.kind != "f" or (node.op == "RealDiv" and const_first):
            return
        scale = c if node.op == "Mul" else (1 / c).astype(c.dtype)
        offset: Any = np.zeros((), c.dtype)
        bn = None
        add = self.only_user(node)
        add_split = (
            self._split(add) if add is not None and add.op in ("AddV2", "Add", "Sub") else None
        )
        if add is not None and add_split is not None and not (add.op == "Sub" and add_split[2]):
            d_ref = add.inputs[0 if add_split[2] else 1]
            offset = -add_split[1] if add.op == "Sub" else add_split[1]
            if node.op == "Mul" and add.op != "Sub":
                bn = bn_params(self, node.inputs[0 if const_first else 1], d_ref)
            self._replace(add, node)
        node.op, node.inputs = "_Affine", [x]
        node.fields.update(scale=scale, offset=offset, bn=bn)

    def _dilation(self, node: Node) -> None:
        """SpaceToBatchND -> conv -> BatchToSpaceND is how TF runs a dilated conv."""
        if node.op not in ("Conv2D", "DepthwiseConv2dNative") or node.name not in self.flat.nodes:
            return
        s2b = self.flat.nodes.get(self.flat.resolve(node.inputs[0])[0])
        b2s = self.only_user(node)
        if s2b is None or s2b.op != "SpaceToBatchND" or b2s is None:
            return
        block, pads = self.const(s2b.inputs[1]), self.const(s2b.inputs[2])
        kernel = self.const(node.inputs[1])
        if b2s.op != "BatchToSpaceND" or block is None or pads is None or kernel is None:
            return
        b2s_block = self.const(b2s.inputs[1])
        if b2s_block is None or not np.array_equal(block, b2s_block) or block.shape != (2,):
            return
        if self.users.get(self.flat.resolve(node.inputs[0]), []) != [node]:
            return
        same = [((k - 1) * int(d)) // 2 for k, d in zip(kernel.shape[:2], block)]
        before = [int(p) for p in pads[:, 0]]
        if before not in (same, [0, 0]):
            return
        node.fields["dilation"] = (int(block[0]), int(block[1]))
        node.fields["padding"] = "SAME" if before == same and any(same) else "VALID"
        node.inputs = [s2b.inputs[0], *node.inputs[1:]]
        self.users[self.flat.resolve(s2b.inputs[0])].append(node)
        self._replace(b2s, node)

    def _bias(self, node: Node) -> None:
        """A per-channel constant added to a conv/matmul output becomes its bias."""
        if node.op not in BIAS_HOSTS or node.name not in self.flat.nodes:
            return
        while (add := self.only_user(node)) is not None and add.op in ADDS:
            split = self._split(add)
            if split is None or self.flat.resolve(split[0]) != (node.name, 0) or split[1].ndim > 1:
                return
            c = split[1]
            if not _is_bias(c, node, self):
                return
            node.fields["bias"] = c + node.fields.get("bias", 0)
            self._replace(add, node)


def _is_bias(c: np.ndarray, host: Node, rw: Rewriter) -> bool:
    kernel = rw.const(host.inputs[1])
    if kernel is None or c.dtype.kind != "f":
        return False
    if host.op == "DepthwiseConv2dNative":
        width = kernel.shape[2] * kernel.shape[3]
    elif host.op in ("MatMul", "BatchMatMulV2"):
        t_b = any(bool(host.attr[k].b) for k in ("transpose_b", "adj_y") if k in host.attr)
        width = kernel.shape[0 if t_b else -1]
    else:
        width = kernel.shape[-1]
    return c.shape == (width,)


def bn_params(rw: Rewriter, scale_ref: Ref, offset_ref: Ref) -> dict[str, Any] | None:
    """BatchNorm's own parameters behind a folded ``x * m + o``, or None.

    Keras computes ``m = rsqrt(var + eps) * gamma`` and ``o = beta - mean * m``
    from its four variables; the unfolded constant graph still shows them.
    The recovered parameters are checked against the folded ``m`` and ``o``.
    """
    flat = rw.flat
    m = flat.nodes.get(flat.resolve(scale_ref)[0])
    o = flat.nodes.get(flat.resolve(offset_ref)[0])
    if m is None or o is None or o.op != "Sub":
        return None
    rsqrt, gamma = _rsqrt_times(flat, m)
    if rsqrt is None:
        return None
    var_eps = flat.nodes.get(flat.resolve(rsqrt.inputs[0])[0])
    if var_eps is None or var_eps.op not in ("AddV2", "Add"):
        return None
    var, eps = _operands(rw, var_eps)
    mean_m = flat.nodes.get(flat.resolve(o.inputs[1])[0])
    if var is None or eps is None or eps.size != 1 or mean_m is None or mean_m.op != "Mul":
        return None
    refs = [flat.resolve(r) for r in mean_m.inputs]
    if flat.resolve(scale_ref) not in refs:
        return None
    mean = rw.const(mean_m.inputs[1 - refs.index(flat.resolve(scale_ref))])
    beta = rw.const(o.inputs[0])
    params = _checked(rw, scale_ref, offset_ref, [gamma, beta, mean, var], float(eps.ravel()[0]))
    return params


def _rsqrt_times(flat: FlatGraph, m: Node) -> tuple[Node | None, Ref | None]:
    if m.op == "Rsqrt":
        return m, None
    if m.op != "Mul":
        return None, None
    for i, ref in enumerate(m.inputs):
        node = flat.nodes.get(flat.resolve(ref)[0])
        if node is not None and node.op == "Rsqrt":
            return node, m.inputs[1 - i]
    return None, None


def _operands(rw: Rewriter, node: Node) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(vector, scalar) operands of an ``Add`` of a variance and epsilon."""
    a, b = (rw.const(r) for r in node.inputs)
    if a is not None and b is not None and a.size < b.size:
        a, b = b, a
    return a, b


def _checked(
    rw: Rewriter, scale_ref: Ref, offset_ref: Ref, parts: list[Any], eps: float
) -> dict[str, Any] | None:
    gamma_ref, beta, mean, var = parts
    if beta is None or mean is None or var is None:
        return None
    gamma = np.ones_like(var) if gamma_ref is None else rw.const(gamma_ref)
    scale, offset = rw.const(scale_ref), rw.const(offset_ref)
    if gamma is None or scale is None or offset is None:
        return None
    flat_parts = [np.ravel(p) for p in (gamma, beta, mean, var)]
    width = scale.size
    if any(p.size != width for p in flat_parts):
        return None
    g, b, mu, v = flat_parts
    m = g / np.sqrt(v + eps)
    if not (
        np.allclose(m, scale.ravel(), rtol=1e-5)
        and np.allclose(b - mu * m, offset.ravel(), rtol=1e-5, atol=1e-6)
    ):
        return None
    return {"gamma": g, "beta": b, "mean": mu, "variance": v, "epsilon": eps}
