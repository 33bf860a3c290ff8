"""Handlers for attention.

MultiHeadAttention head pruning and the ops that split channels into heads.

Registers on import; :mod:`secateur.pruner.tracing` imports this module.
"""

from __future__ import annotations
