"""Re-create one layer or keras.ops operation, on its own, from its config.

Surgery rebuilds a model layer by layer (:mod:`rebuild`), never through the
whole model's config: a layer the plan changes is re-created from its own
edited config, an unchanged one is cloned from its config and given its
weights, or, when its class does not round-trip, deep-copied. Nothing here
serialises to JSON, so config values that are not serialisable (numpy
integers in a ``Reshape`` target, callables) pass through unchanged.

:func:`recreate_error` is the plan-time check: a layer the plan would change
but that cannot be re-created from its config freezes its channel groups
(see :mod:`tracing`), so a plan is never produced that surgery cannot apply.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from secateur.pruner._keras import keras

# A ConfigEdit key "call:<i>" / "call:<name>" edits a node's i-th positional /
# named call argument (a GetItem key) instead of the operation's config.
CALL_EDIT = "call:"


def custom_objects(model: Any) -> dict[str, Any]:
    """Non-Keras layer classes in ``model``, so configs that name them deserialize.

    Keras's own classes are left to Keras: their short names collide (the
    ``Add`` layer and the ``Add`` op) and Keras resolves them by module.
    """
    out: dict[str, Any] = {}
    stack = [model]
    seen: set[int] = set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        for layer in getattr(m, "layers", []):
            cls = type(layer)
            if not cls.__module__.startswith("keras."):
                out[cls.__name__] = cls
                out[keras.saving.get_registered_name(cls)] = cls
            if isinstance(layer, keras.Model):
                stack.append(layer)
    return out


def recreate(op: Any, config: dict[str, Any], custom: dict[str, Any] | None = None) -> Any:
    """A new, unbuilt instance of ``op``'s class made from ``config``."""
    with keras.saving.custom_object_scope(custom or {}):
        return type(op).from_config(config)


def call_seeded(layer: Any, values: Sequence[np.ndarray] | None, call: Callable[[], Any]) -> Any:
    """Run ``call`` (the call that builds ``layer``) with its weights starting at ``values``.

    A weight normally starts at its initializer's value and is then
    overwritten with the kept slice of the original; creating it with that
    slice instead skips drawing random numbers and the second write, which
    was most of what surgery spent on top of Keras's own clone. Only
    weights the layer creates itself through ``add_weight`` with keyword
    arguments are seeded; the layer's config (its initializers) is left as
    it is.

    Returns:
        ``(outputs, seeded)``: what ``call`` returned, and whether every
        weight of the built layer, in order, took its value from ``values``
        (when False the caller sets the weights itself).
    """
    if values is None or layer.built:
        return call(), False
    created: list[Any] = []
    pending = list(values)

    def add_weight(*args: Any, **kwargs: Any) -> Any:
        shape = kwargs.get("shape")
        value = pending[len(created)] if len(created) < len(pending) else None
        if args or value is None or shape is None or tuple(shape) != value.shape:
            created.append(None)  # not ours to seed: the caller sets the weights
            return original(*args, **kwargs)
        kwargs["initializer"] = _Constant(value)
        var = original(**kwargs)
        created.append(var)
        return var

    original = layer.add_weight
    object.__setattr__(layer, "add_weight", add_weight)
    try:
        outs = call()
    finally:
        object.__delattr__(layer, "add_weight")
    weights = layer.weights
    seeded = len(created) == len(pending) == len(weights) and all(
        a is b for a, b in zip(created, weights)
    )
    return outs, seeded


class _Constant:
    """An initializer that returns one given array (in the variable's dtype)."""

    def __init__(self, value: np.ndarray) -> None:
        self.value = value

    def __call__(self, shape: Any, dtype: Any = None) -> np.ndarray:
        if dtype is None:
            return self.value
        return np.asarray(self.value, dtype=keras.backend.standardize_dtype(dtype))


def recreate_error(op: Any, custom: dict[str, Any] | None = None) -> str | None:
    """Why ``op`` cannot be re-created from its own config, or None if it can.

    The check re-creates the object from its current config; the plan only
    changes integer widths in it, which a class that round-trips accepts.
    """
    try:
        recreate(op, op.get_config(), custom)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot"
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
    return None


def copy_layer(layer: Any) -> Any:
    """An independent deep copy of a built layer: same weights, new variables.

    For layers whose class does not round-trip through its config. Keras
    objects pickle (and so deep-copy) through their config, which is what
    fails here, so every Keras object the layer holds is copied attribute by
    attribute instead. The layer's graph nodes belong to the old model and
    are left behind, so the copy can be called on new tensors.
    """
    saveables, modules = _keras_objects(layer)
    memo: dict[int, Any] = {id(m): m for m in modules}
    shells = []
    for obj in saveables:
        shell = object.__new__(type(obj))
        memo[id(obj)] = shell
        shells.append((obj, shell))
        for node in [*getattr(obj, "_inbound_nodes", []), *getattr(obj, "_outbound_nodes", [])]:
            memo[id(node)] = node
    from keras.src.utils.tracking import DotNotTrackScope

    # The copied trackers already hold the copied state; re-tracking it
    # while their containers are rebuilt would trip their build lock.
    with DotNotTrackScope():
        for obj, shell in shells:
            shell.__dict__.update(copy.deepcopy(obj.__dict__, memo))
    for _, shell in shells:
        if hasattr(shell, "_inbound_nodes"):
            shell._inbound_nodes = []
            shell._outbound_nodes = []
    return memo[id(layer)]


def _keras_objects(root: Any) -> tuple[list[Any], list[Any]]:
    """Keras-saveable objects (layers, ops, ...) reachable from ``root``, and modules.

    Keras objects and the other objects of Keras's (and Keras libraries')
    own classes are searched; modules they hold (a seed generator's backend)
    cannot be copied and are shared.
    """
    from keras.src.saving.keras_saveable import KerasSaveable

    found: dict[int, Any] = {}
    modules: list[Any] = []
    stack: list[Any] = [root]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, ModuleType):
            modules.append(obj)
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, KerasSaveable) or (
            type(obj).__module__.startswith("keras") and hasattr(obj, "__dict__")
        ):
            if isinstance(obj, KerasSaveable):
                found[id(obj)] = obj
            stack.extend(v for k, v in vars(obj).items() if k not in _NODE_ATTRS)
    return list(found.values()), modules


_NODE_ATTRS = ("_inbound_nodes", "_outbound_nodes", "_keras_history")
