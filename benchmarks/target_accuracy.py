"""How well the measured cost model predicts step time: FLOPs ratio, predicted and measured.

For each model of benchmarks/prune_speed.py (keras.applications, weights=None),
in a fresh subprocess:

1. profile every prunable channel group's training step time at ``--levels``
   of its width on the attached device (:func:`secateur.pruner.costmodel.profile_costs`,
   a :class:`~secateur.pruner.meter.DeviceMeter` at ``--batch``, XLA where
   fine-tuning uses it; cached in ``--cache``, so a second run only measures
   the pruned model);
2. plan a global ratio (``--ratio``, bn_scale, as prune_speed.py) and predict
   the pruned model's step time with the cost model targets use
   (:mod:`secateur.pruner.costfit`: per-layer shares fitted to the profile,
   each scaled by its FLOPs at the plan's widths, plus a constant remainder);
   ``add`` is the old sum of single-group savings, for comparison;
3. measure the pruned model against the original, interleaved.

Prints per model: FLOPs ratio (counted), predicted and measured step-time
ratios, their difference, and how many variants the profile measured in how
long. On a CPU, profiling the large models takes hours (each variant is
rebuilt, compiled and timed): ``--size``/``--batch``/``--levels`` make it
smaller, and the printed header says what was run.

Usage: python benchmarks/target_accuracy.py [--models VGG16,...] [--size 224]
       [--batch 8] [--levels 0.5] [--ratio 0.3] [--cache DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

DEFAULT_MODELS = ["VGG16", "ResNet50", "MobileNetV2", "EfficientNetB0", "EfficientNetB7"]


def measure_one(name: str, a: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    import keras

    from secateur.pruner import PruneSpec
    from secateur.pruner.costfit import TermModel, cost_terms, fit_times
    from secateur.pruner.costmodel import profile_costs
    from secateur.pruner.meter import DeviceMeter
    from secateur.pruner.plan import make_plan, score_model
    from secateur.pruner.surgery import apply_plan

    size = a.size
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    spec = PruneSpec(ratio=a.ratio, criterion="bn_scale", scope="global")
    from secateur.pruner.config import MeasureConfig

    timing = MeasureConfig(warmup_steps=2, steps=a.steps, rounds=a.rounds, latency_runs=1)
    meter = DeviceMeter(batch_size=a.batch, measure=timing)
    scored = score_model(model, spec, device_kind=meter.device_kind)
    groups = [g for g in scored.prunable if g.kind == "channels"]
    levels = tuple(float(x) for x in a.levels.split(","))
    start = time.perf_counter()
    profile = profile_costs(
        model, scored.graph, groups, scored.spec, ["step_time"], meter, a.cache, levels
    )
    plan = make_plan(model, spec, graph=scored.graph, device_kind=meter.device_kind)
    kept = {g.id: g.size_after for g in plan.groups}
    base = profile.base["step_time"]
    saved = sum(profile.saving(g, kept[g.id], "step_time") for g in groups if g.id in kept)
    terms = cost_terms(scored.graph, groups)
    fitted, prior = fit_times(terms, base, profile.cuts(groups, "step_time"))
    predicted = TermModel(base, terms, fitted, prior).predict(kept)
    pruned = apply_plan(model, plan)
    figures = meter.measure({"original": model, "pruned": pruned}, ["step_time"])
    measured = figures["pruned"]["step_time"] / figures["original"]["step_time"]
    return {
        "model": name,
        "groups": len(groups),
        "flops_ratio": plan.flops_after / plan.flops_before,
        "params_ratio": plan.params_after / plan.params_before,
        "predicted_step_ratio": predicted,
        "additive_step_ratio": (base - saved) / base if base else None,
        "measured_step_ratio": measured,
        "original_step_s": figures["original"]["step_time"],
        "profile_variants": profile.measurements,
        "profile_seconds": round(profile.seconds, 1),
        "profile_cached": profile.cached,
        "total_seconds": round(time.perf_counter() - start, 1),
        "how": meter.describe(),
    }


def run_child(name: str, a: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--size", str(a.size),
           "--batch", str(a.batch), "--levels", a.levels, "--ratio", str(a.ratio),
           "--cache", a.cache, "--steps", str(a.steps), "--rounds", str(a.rounds)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
    return {"model": name, "error": tail}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--levels", default="0.5", help="fractions of each group's width profiled")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round (meter.QUICK: 4)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (meter.QUICK: 2)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "secateur-profiles"))
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure_one(a.child, a)), flush=True)
        return 0
    print(
        f"cost model vs measured step time: {a.size}x{a.size}x3, batch {a.batch}, "
        f"global ratio {a.ratio} (bn_scale), profile levels {a.levels}, "
        f"{a.rounds}x{a.steps} timed steps per variant, cache {a.cache}"
    )
    print(f"{'model':<15} {'groups':>6} {'FLOPs':>6} {'add':>6} {'pred':>6} {'meas':>6}"
          f" {'error':>6} {'variants':>8} {'profile s':>9}")  # fmt: skip
    rows = []
    for name in a.models.split(","):
        r = run_child(name, a)
        rows.append(r)
        if "error" in r:
            print(f"{name:<15} error: {r['error']}", flush=True)
            continue
        err = r["predicted_step_ratio"] - r["measured_step_ratio"]
        print(
            f"{name:<15} {r['groups']:>6} {r['flops_ratio']:6.3f} "
            f"{r['additive_step_ratio']:6.3f} {r['predicted_step_ratio']:6.3f} "
            f"{r['measured_step_ratio']:6.3f} {err:+6.3f} "
            f"{r['profile_variants']:>8} {r['profile_seconds']:>9}"
            + (" (cached)" if r["profile_cached"] else ""),
            flush=True,
        )
    if rows and "how" in next((r for r in rows if "how" in r), {}):
        how = next(r for r in rows if "how" in r)["how"]
        print(f"measured on {how['device']}, xla={how['xla']}, {how['timed_steps']} timed steps")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
