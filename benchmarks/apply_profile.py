"""Where apply_plan spends its time, next to Keras's own floor.

Profiles (cProfile) one ``apply_plan`` and one floor (``Model.from_config``
+ ``set_weights``) on a keras.applications model (weights=None, ratio 0.3,
bn_scale, global, as ``prune_speed.py``) and prints the time in each part:
secateur's own work (re-tracing, bias compensation, slicing weights, reading
configs) and Keras's per-layer work (constructing layers, building them,
creating and initialising variables, the symbolic calls). The cyclic garbage
collector's time is measured apart (gc callbacks, in an unprofiled run that
starts after a full collection, as prune_speed's timings do): cProfile
charges it to whatever function allocated last.

Profiled times are inflated by the profiler (about 1.5x), so compare shares
and the two columns, not absolute seconds with ``prune_speed.py``.

With ``--ratio 0`` the plan changes nothing, so apply_plan clones every
layer: its time against the floor is that of unchanged layers against
Keras's own clone.

Usage: python benchmarks/apply_profile.py [--model EfficientNetB7] [--ratio 0.3] [--out PREFIX]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import time
from collections.abc import Callable
from typing import Any

# (label, file suffix, function name): cumulative time of that function.
RANDOM = ("keras/src/initializers/random_initializers.py", "__call__")
APPLY_PARTS = [
    ("apply_plan total", "pruner/surgery.py", "apply_plan"),
    ("  layers, all (rebuild._call_layer)", "pruner/rebuild.py", "_call_layer"),
    ("    of which unchanged (rebuild._clone)", "pruner/rebuild.py", "_clone"),
    ("  trace the model (analyze)", "pruner/tracing.py", "analyze"),
    ("  bias compensation (trace constants, fold)", "pruner/surgery.py", "_compensation"),
    ("  slice kept weights", "pruner/surgery.py", "values"),
    ("  read layer configs", "pruner/rebuild.py", "_configs"),
    ("  construct layers (from_config)", "pruner/recreate.py", "recreate"),
    ("  call layers (Keras Layer.__call__)", "keras/src/layers/layer.py", "__call__"),
    ("    of which build", "keras/src/layers/layer.py", "_maybe_build"),
    ("    of which create variables", "keras/src/backend/common/variables.py", "__init__"),
    ("    of which random initializers", *RANDOM),
    ("  set unseeded weights", "pruner/surgery.py", "_set_weights"),
    ("  Functional model init", "keras/src/models/functional.py", "__init__"),
]
FLOOR_PARTS = [
    ("floor total", "benchmarks/apply_profile.py", "floor"),
    ("  layers, all (from_config, build, call)", "keras/src/models/functional.py", "process_layer"),
    ("  model.get_config", "keras/src/models/functional.py", "get_config"),
    ("  construct layers (from_config)", "keras/src/ops/operation.py", "from_config"),
    ("  build from config", "keras/src/layers/layer.py", "build_from_config"),
    ("    of which create variables", "keras/src/backend/common/variables.py", "__init__"),
    ("    of which random initializers", *RANDOM),
    ("  call layers (Keras Layer.__call__)", "keras/src/layers/layer.py", "__call__"),
    ("  get_weights + set_weights", "keras/src/layers/layer.py", "set_weights"),
]


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> tuple[float, int]:
    """(cumulative seconds, primitive calls) of the functions so named."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = [v for (path, _, fn), v in raw.items() if path.endswith(suffix) and fn == name]
    return sum(v[3] for v in rows), sum(v[0] for v in rows)


def _gc_seconds(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, seconds in the cyclic collector) of one unprofiled run."""
    spent, start = [0.0], [0.0]

    def track(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - start[0]

    gc.collect()
    gc.callbacks.append(track)
    try:
        begin = time.perf_counter()
        fn()
        wall = time.perf_counter() - begin
    finally:
        gc.callbacks.remove(track)
    return wall, spent[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="EfficientNetB7")
    parser.add_argument(
        "--ratio", type=float, default=0.3, help="0: every layer unchanged (cloned)"
    )
    parser.add_argument("--out", help="also save the raw profiles as PREFIX.apply/.floor")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from secateur.pruner import PruneSpec, apply_plan, make_plan

    model = getattr(keras.applications, args.model)(weights=None, input_shape=(224, 224, 3))
    plan = make_plan(model, PruneSpec(ratio=args.ratio, criterion="bn_scale", scope="global"))

    def floor() -> None:
        clone = keras.Model.from_config(model.get_config())
        clone.set_weights(model.get_weights())

    def apply() -> None:
        apply_plan(model, plan)

    apply(), floor()  # warm up: first calls import and compile lazily
    for label, fn, parts in (("apply", apply, APPLY_PARTS), ("floor", floor, FLOOR_PARTS)):
        wall, in_gc = _gc_seconds(fn)
        profile = cProfile.Profile()
        profile.runcall(fn)
        if args.out:
            profile.dump_stats(f"{args.out}.{label}")
        stats = pstats.Stats(profile)
        print(f"\n{args.model} {label}: {wall:.2f} s unprofiled, {in_gc:.2f} s of it in gc")
        total, _ = _cumulative(stats, parts[0][1], parts[0][2])
        for name, suffix, fn_name in parts:
            t, calls = _cumulative(stats, suffix, fn_name)
            each = f"{calls:>6} calls {1000 * t / calls:>6.2f} ms each" if calls > 1 else ""
            print(f"  {name:<48}{t:>7.2f} s {100 * t / total:>5.0f} %  {each}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
