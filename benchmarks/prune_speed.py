"""How long planning and applying a prune take, against Keras's own floor.

For each model (keras.applications, weights=None, 224x224x3, 1000 classes)
this measures, each in a fresh subprocess so peak RSS is the model's own:

- plan:   make_plan (trace + score + allocate), ratio 0.3, bn_scale, global
- apply:  apply_plan replaying that plan (re-traces the model, rebuilds it
          from config, copies sliced weights)
- prune:  prune() end to end (one trace shared by plan and apply)
- floor:  Keras's own "new model with the same weights":
          Model.from_config(get_config()) + set_weights(get_weights())
- peak RSS of the process.

Every timing is the best of ``--repeat`` runs, each after a full garbage
collection (untimed), so no run pays for the garbage of the one before.

Usage: python benchmarks/prune_speed.py [--models VGG16,ResNet50,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_MODELS = ["VGG16", "ResNet50", "MobileNetV2", "EfficientNetB0", "EfficientNetB7"]
TARGET = ("ResNet50", 10.0)  # plan + apply under 10 s on the 2-core machine


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        # Each timing starts with no garbage left by the one before: a
        # discarded model is cyclic garbage, and without this whichever
        # measurement came next paid for collecting it (docs/surgery_speed.md).
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_one(name: str, repeat: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from secateur.pruner import PruneSpec, apply_plan, make_plan, prune

    model = getattr(keras.applications, name)(weights=None, input_shape=(224, 224, 3))
    spec = PruneSpec(ratio=0.3, criterion="bn_scale", scope="global")

    def floor() -> None:
        clone = keras.Model.from_config(model.get_config())
        clone.set_weights(model.get_weights())

    plan = make_plan(model, spec)
    t_plan = _best(lambda: make_plan(model, spec), repeat)
    t_apply = _best(lambda: apply_plan(model, plan), repeat)
    t_prune = _best(lambda: prune(model, spec), repeat)
    t_floor = _best(floor, repeat)
    return {
        "model": name,
        "params_before": plan.params_before,
        "params_after": plan.params_after,
        "plan_s": t_plan,
        "apply_s": t_apply,
        "prune_s": t_prune,
        "floor_s": t_floor,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--repeat", type=int, default=3, help="best of N timings")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.repeat)))
        return 0
    rows = []
    for name in args.models.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--one", name, "--repeat", str(args.repeat)],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {name}", file=sys.stderr, flush=True)
    print(
        f"{'model':<16}{'params':>13}{'pruned':>13}{'plan s':>9}{'apply s':>9}"
        f"{'plan+apply':>11}{'prune s':>9}{'keras floor':>12}{'prune/floor':>12}"
        f"{'(p+a)/floor':>12}{'peak RSS MiB':>14}"
    )
    for r in rows:
        both = r["plan_s"] + r["apply_s"]
        print(
            f"{r['model']:<16}{r['params_before']:>13,}{r['params_after']:>13,}"
            f"{r['plan_s']:>9.2f}{r['apply_s']:>9.2f}{both:>11.2f}{r['prune_s']:>9.2f}"
            f"{r['floor_s']:>12.2f}{r['prune_s'] / r['floor_s']:>11.2f}x"
            f"{both / r['floor_s']:>11.2f}x{r['peak_rss_mib']:>14.0f}"
        )
    target = next((r for r in rows if r["model"] == TARGET[0]), None)
    if target:
        both = target["plan_s"] + target["apply_s"]
        verdict = "meets" if both < TARGET[1] else "MISSES"
        print(f"\n{TARGET[0]} plan+apply {both:.2f} s {verdict} the {TARGET[1]:.0f} s target")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
