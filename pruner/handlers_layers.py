"""Handlers for more layer classes.

Grouped convolutions, per-channel scales, GroupNormalization, EinsumDense,
keras-hub blocks.

Registers on import; :mod:`secateur.pruner.tracing` imports this module.
"""

from __future__ import annotations
