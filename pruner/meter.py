"""The device meter: step time, latency and peak memory of models, side by side.

A thin adapter from :func:`secateur.pruner.measure.measure_models` (variants
interleaved in one process, clones trained so the models keep their
weights) to the figures targets and the cost model read. The batch is
synthetic (random inputs of the model's shape, random labels): costs do not
depend on the values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from secateur.pruner.config import MeasureConfig, TrainConfig
from secateur.pruner.errors import TargetUnreachableError
from secateur.pruner.finetune import Device, select_device
from secateur.pruner.measure import Figures, measure_models

#: A few timed steps per variant: profiles measure many variants.
QUICK = MeasureConfig(warmup_steps=2, steps=4, rounds=2, latency_runs=10)


class DeviceMeter:
    """Measures on the attached device in the execution mode training uses.

    Args:
        batch_size: training batch of the step-time and memory figures.
        latency_batch: batch size of the latency figure.
        config: training settings (optimizer, XLA) the steps run under.
        measure: warm-up, steps and rounds per measurement.
        device: where to run (default: what is attached).
        seed: seed of the synthetic batch.
        isolate: measure a cost profile's variants in child processes
            (:mod:`secateur.pruner.probe`), so the memory TensorFlow keeps
            from each traced model is returned to the system. Default: on a
            single-host CPU; accelerators stay with the process that holds them.
    """

    def __init__(
        self,
        batch_size: int = 32,
        latency_batch: int = 1,
        config: TrainConfig | None = None,
        measure: MeasureConfig = QUICK,
        device: Device | None = None,
        seed: int = 0,
        isolate: bool | None = None,
    ) -> None:
        self.batch_size, self.latency_batch = batch_size, latency_batch
        self.config = config or TrainConfig(batch_size=batch_size)
        self.settings = measure
        self.device = device or select_device()
        self.device_kind = self.device.kind
        self.seed = seed
        single_cpu = self.device.kind == "CPU" and self.device.members == 1
        self.isolate = single_cpu if isolate is None else isolate

    def describe(self) -> dict[str, Any]:
        return {
            "device": f"{self.device.kind} ({self.device.name})",
            "batch_size": self.batch_size,
            "latency_batch": self.latency_batch,
            "xla": self.device.use_xla(self.config.jit_compile),
            "warmup_steps": self.settings.warmup_steps,
            "timed_steps": self.settings.steps * self.settings.rounds,
            "step_time": "median training step, variants interleaved",
            "latency": "median inference call",
            "peak_memory": "allocator peak of a training step plus weights and slots",
        }

    def measure(
        self, models: Mapping[str, Any], metrics: Sequence[str]
    ) -> dict[str, dict[str, float]]:
        """name -> metric -> figure (seconds or bytes)."""
        first = next(iter(models.values()))
        batch = self._batch(first, self.batch_size)
        figures = measure_models(dict(models), batch, self.config, self.device, None, self.settings)
        if "latency" in metrics and self.latency_batch not in (1, self.batch_size):
            small = self._batch(first, self.latency_batch)
            other = measure_models(
                dict(models), small, self.config, self.device, None, self.settings
            )
            lat = {n: f.latency_batch_seconds for n, f in other.items()}
        else:
            lat = {n: self._latency(f) for n, f in figures.items()}
        return {n: {m: self._figure(f, m, lat[n]) for m in metrics} for n, f in figures.items()}

    def _latency(self, f: Figures) -> float:
        return f.latency_batch1_seconds if self.latency_batch == 1 else f.latency_batch_seconds

    @staticmethod
    def _figure(f: Figures, metric: str, latency: float) -> float:
        if metric == "step_time":
            return f.train_step_seconds
        if metric == "latency":
            return latency
        if f.peak_memory_bytes is None:
            raise TargetUnreachableError(
                "a peak_memory target needs allocator statistics; on CPU set "
                "TF_CPU_ALLOCATOR_USE_BFC=true before TensorFlow starts. "
                "Received: no memory statistics on this device",
                "peak_memory",
            )
        return float(f.peak_memory_bytes)

    def _batch(self, model: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        shape = tuple(model.inputs[0].shape[1:])
        classes = int(model.outputs[0].shape[-1])
        x = rng.normal(size=(size, *shape)).astype(np.float32)
        y = rng.integers(0, max(classes, 1), size=size)
        return x, y
