"""Handlers for keras.ops nodes in a functional graph.

split, mean, sum, concatenate, GetItem, pad, resize, ...

Registers on import; :mod:`secateur.pruner.tracing` imports this module.
"""

from __future__ import annotations
