"""How long reading a SavedModel as data takes, against TensorFlow's own loader.

For each model (keras.applications, weights=None, 224x224x3, 1000 classes),
in a fresh subprocess, this writes the benchmark's own SavedModels and times
one run of each reader on the same directory:

- export:  Keras 3 ``model.export()`` (no Keras metadata): Secateur's reader
           and graph importer (``load_model``) against ``tf.saved_model.load``;
- tf.keras: the tf_keras model saved with ``save_format="tf"``: Secateur's data
           path (config from keras_metadata.pb, weights from the checkpoint,
           carried into Keras 3) against ``tf.saved_model.load``.

``tf.saved_model.load`` restores every object and runs the saved functions'
initializers, which is why Secateur never calls it on a user's file; it is
timed here only as the floor a reader could hope to reach.

Usage: python benchmarks/import_speed.py [--models VGG16,ResNet50,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

DEFAULT_MODELS = ["VGG16", "ResNet50", "MobileNetV2", "DenseNet121", "EfficientNetB0"]


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_one(name: str) -> list[dict[str, Any]]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf
    import tf_keras

    from secateur.pruner.errors import SecateurError
    from secateur.pruner.modelio import load_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="secateur-bench-") as tmp:
        exported = os.path.join(tmp, "export")
        getattr(keras.applications, name)(weights=None).export(exported, verbose=False)
        legacy = os.path.join(tmp, "tf_keras")
        getattr(tf_keras.applications, name)(weights=None).save(legacy, save_format="tf")
        for kind, path in (("export", exported), ("tf.keras", legacy)):
            model: Any = None

            def ours(path: str = path) -> None:
                nonlocal model
                model = load_model(path)

            try:
                t_ours = _timed(ours)
            except SecateurError as exc:  # a model the reader refuses: reported, not timed
                rows.append({"model": name, "kind": kind, "error": f"{type(exc).__name__}: {exc}"})
                continue
            t_tf = _timed(lambda path=path: tf.saved_model.load(path))
            rows.append({
                "model": name, "kind": kind, "params": int(model.count_params()),
                "ours_s": t_ours, "tf_load_s": t_tf,
            })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one)))
        return 0
    rows = []
    for name in args.models.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--one", name], check=True, capture_output=True, text=True
        )
        rows += json.loads(out.stdout.strip().splitlines()[-1])
        print(f"measured {name}", file=sys.stderr, flush=True)
    print(
        f"{'model':<16}{'SavedModel':<11}{'params':>13}{'ours s':>9}{'tf load s':>11}{'ratio':>8}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<16}{r['kind']:<11}  not read: {r['error'][:200]}")
            continue
        print(
            f"{r['model']:<16}{r['kind']:<11}{r['params']:>13,}{r['ours_s']:>9.2f}"
            f"{r['tf_load_s']:>11.2f}{r['ours_s'] / r['tf_load_s']:>7.2f}x"
        )
    print("\nratio: Secateur's data-only read over tf.saved_model.load (one run each)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
