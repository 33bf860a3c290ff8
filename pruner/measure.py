"""Measure original and pruned models side by side, interleaved in one process.

Figures per variant: params, weight bytes, FLOPs per example, peak memory of
a training step, median, p10 and p90 training step time after warm-up, inference
latency at batch 1 and at the training batch, top-1 accuracy. Variants run
in alternation (A, B, A, B, ...) so drift in the machine's speed hits both.
Measurement trains *clones* of the models: the models passed in keep their
weights.

Peak memory comes from TensorFlow's allocator statistics
(``tf.config.experimental.get_memory_info``). On CPU these exist only when
``TF_CPU_ALLOCATOR_USE_BFC=true`` was set before TensorFlow started; the
figure then says so instead of guessing. The training-step footprint
reported is the variant's persistent state (weights and optimizer slots)
plus the transient peak of its steps above what was allocated before them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from secateur.pruner.config import MeasureConfig, TrainConfig
from secateur.pruner.errors import CancelledError
from secateur.pruner.finetune import Device, compile_for_training, evaluate_counts
from secateur.pruner.stats import wilson
from secateur.pruner.tracing import analyze


@dataclass
class Figures:
    """Everything measured for one variant, with how it was obtained."""

    params: int
    weight_bytes: int
    flops: int
    peak_memory_bytes: int | None
    train_step_seconds: float
    train_step_p90_seconds: float
    latency_batch1_seconds: float
    latency_batch_seconds: float
    accuracy: float | None
    how: dict[str, Any] = field(default_factory=dict)
    train_step_p10_seconds: float = 0.0
    #: The 95% Wilson interval of ``accuracy`` and the examples it was measured on.
    accuracy_ci_low: float | None = None
    accuracy_ci_high: float | None = None
    eval_examples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clone(model: Any) -> Any:
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    return clone


def memory_stats_available(device: str = "CPU:0") -> bool:
    import tensorflow as tf

    try:
        tf.config.experimental.get_memory_info(device)
        return True
    except (ValueError, tf.errors.InvalidArgumentError):
        return False


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class _Variant:
    def __init__(self, name: str, model: Any, config: TrainConfig, device: Device) -> None:
        import tensorflow as tf

        self.name = name
        self.model = _clone(model)
        compile_for_training(self.model, config, device)
        self.times: list[float] = []
        self.peaks: list[int] = []
        jit = device.use_xla(config.jit_compile)
        self.infer = tf.function(
            lambda x: self.model(x, training=False), jit_compile=jit, reduce_retracing=True
        )

    def state_bytes(self) -> int:
        slots = sum(
            int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
            for v in self.model.optimizer.variables
        )
        return _weight_bytes(self.model) + slots


def _weight_bytes(model: Any) -> int:
    return int(sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in model.weights))


def _step_block(variant: _Variant, x: Any, y: Any, steps: int, mem_device: str | None) -> None:
    import tensorflow as tf

    base = 0
    if mem_device:
        tf.config.experimental.reset_memory_stats(mem_device)
        base = tf.config.experimental.get_memory_info(mem_device)["current"]
    for _ in range(steps):
        start = time.perf_counter()
        variant.model.train_on_batch(x, y)
        variant.times.append(time.perf_counter() - start)
    if mem_device:
        peak = tf.config.experimental.get_memory_info(mem_device)["peak"]
        variant.peaks.append(int(peak - base))


def _latency(variant: _Variant, x: Any, runs: int) -> float:
    variant.infer(x)  # trace/compile outside the timing
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        np.asarray(variant.infer(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_models(
    models: dict[str, Any],
    batch: tuple[np.ndarray, np.ndarray],
    config: TrainConfig,
    device: Device,
    eval_ds: Any | None = None,
    measure: MeasureConfig = MeasureConfig(),
    should_cancel: Callable[[], bool] | None = None,
    on_progress: Callable[[float, str], None] | None = None,
) -> dict[str, Figures]:
    """Measure every model in ``models`` (e.g. original and pruned).

    Args:
        models: variant name -> model.
        batch: one training batch (images, labels) of ``config.batch_size``.
        config: the fine-tuning settings (optimizer, XLA) steps run under.
        device: where the steps run.
        eval_ds: data for top-1 accuracy; None skips it.
        measure: warm-up, steps per round and rounds.
        should_cancel: polled between blocks.
        on_progress: called with the fraction of the measurement done and
            what runs next (after warm-up, each timed block, each variant's
            latency and accuracy).

    Returns:
        Variant name -> :class:`Figures`.
    """
    mem_device = f"{'CPU' if device.kind == 'CPU' else device.kind}:0"
    if not memory_stats_available(mem_device):
        mem_device = ""
    x, y = batch
    report = on_progress or (lambda _f, _m: None)
    # Units of work: warm-up per variant, timed blocks, then latency/accuracy per variant.
    total, done = len(models) * (2 + measure.rounds), 0
    variants = [_Variant(name, m, config, device) for name, m in models.items()]
    for v in variants:  # compile and warm up before any timing
        report(done / total, f"warm-up {v.name}")
        for _ in range(measure.warmup_steps):
            v.model.train_on_batch(x, y)
        done += 1
    for r in range(measure.rounds):
        for v in variants:
            if should_cancel and should_cancel():
                raise CancelledError("measurement was cancelled")
            report(done / total, f"round {r + 1}/{measure.rounds} {v.name}")
            _step_block(v, x, y, measure.steps, mem_device)
            done += 1
    out = {}
    for v, (name, original) in zip(variants, models.items(), strict=True):
        report(done / total, f"latency and accuracy {name}")
        done += 1
        out[name] = _figures(v, original, x, config, device, eval_ds, measure, mem_device)
    return out


def _figures(
    v: _Variant,
    original: Any,
    x: Any,
    config: TrainConfig,
    device: Device,
    eval_ds: Any | None,
    measure: MeasureConfig,
    mem_device: str,
) -> Figures:
    """One variant's figures from its timed steps, plus latency and accuracy measured now."""
    params, flops = analyze(original).count()
    how = {
        "device": f"{device.kind} ({device.name})",
        "batch_size": int(x.shape[0]),
        "steps": len(v.times),
        "warmup_steps": measure.warmup_steps,
        "rounds_interleaved": measure.rounds,
        "xla": device.use_xla(config.jit_compile),
        "op_determinism": config.deterministic,
        "memory": (
            "allocator peak above the pre-step level plus weights and optimizer slots"
            if mem_device
            else "unavailable: set TF_CPU_ALLOCATOR_USE_BFC=true before TensorFlow starts"
        ),
        "flops": "2 x multiply-adds of conv/dense kernels per example",
    }
    accuracy: dict[str, Any] = {}
    if eval_ds is not None:
        correct, total = evaluate_counts(original, eval_ds, device.use_xla(config.jit_compile))
        low, high = wilson(correct, total)
        accuracy = {
            "accuracy": correct / total,
            "accuracy_ci_low": low,
            "accuracy_ci_high": high,
            "eval_examples": total,
        }
        how["accuracy"] = f"top-1 on {total} examples; 95% Wilson interval"
    return Figures(
        params=params,
        weight_bytes=_weight_bytes(original),
        flops=flops,
        peak_memory_bytes=(max(v.peaks) + v.state_bytes()) if v.peaks else None,
        train_step_seconds=statistics.median(v.times),
        train_step_p90_seconds=_percentile(v.times, 90),
        train_step_p10_seconds=_percentile(v.times, 10),
        latency_batch1_seconds=_latency(v, x[:1], measure.latency_runs),
        latency_batch_seconds=_latency(v, x, max(3, measure.latency_runs // 4)),
        how=how,
        **({"accuracy": None} | accuracy),
    )
