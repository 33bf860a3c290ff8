"""Measuring single-group variants for the cost profile, here or in child processes.

A cost profile (:mod:`costmodel`) compiles and trains a few hundred model
variants. TensorFlow keeps part of every traced training function alive
after its model is gone (the allocator's current bytes and the traced
graphs grow with each variant; ``gc``, ``clear_session`` and the kernel
cache do not release them), about 250 MB per profiled group for
MobileNetV2 at 32x32 on CPU, so one process profiling ResNet50 grew to
20 GB. :func:`measure_isolated` side-steps that: child processes
(``python -m secateur.pruner.probe``) each measure groups until their
resident memory passes a limit, then exit and hand the rest to a fresh
one. Each child rebuilds the model from its architecture (costs do not
depend on weight values, so none are sent), checks that the rebuilt
model has the same architecture digest, and writes one JSON line per
group as it finishes it. Nothing but the model's own config crosses, and
only classes the parent already imported are named in it; deserialising
runs with ``safe_mode``.

Where a child cannot rebuild the model, the rest is measured in this
process (:func:`measure_here`) and the profile says so (``how``).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from secateur.pruner._keras import keras
from secateur.pruner.config import MeasureConfig, TrainConfig
from secateur.pruner.finetune import Device
from secateur.pruner.graph import ChannelGraph, Group
from secateur.pruner.meter import DeviceMeter
from secateur.pruner.plan import keep_function
from secateur.pruner.rebuild import rebuild
from secateur.pruner.tracing import analyze

_log = logging.getLogger(__name__)

#: (group key, widths to probe); the key is :func:`group_key`.
Job = tuple[str, list[int]]
#: What one measured group gives: (group key, widths, variant -> metric -> figure).
Result = tuple[str, list[int], dict[str, dict[str, float]]]


def model_digest(model: Any) -> str:
    """A digest of the architecture (not the weights: they do not change costs)."""
    text = json.dumps(model.get_config(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def group_key(group: Group) -> str:
    """A group's name that survives re-tracing: its origin layers, sorted."""
    return "|".join(sorted(group.origins))


def narrowed(model: Any, graph: ChannelGraph, group: Group, width: int) -> Any:
    """``model`` with only ``group`` narrowed to ``width`` (fresh weights: costs only)."""
    kept = {g.id: np.arange(g.size) for g in graph.groups()}
    kept[group.id] = np.arange(width)
    new, _, _ = rebuild(model, graph, keep_function(graph, kept))
    return new


def measure_here(
    model: Any, graph: ChannelGraph, jobs: Sequence[Job], metrics: Sequence[str], meter: Any
) -> Iterator[Result]:
    """Measure each job's group, full model beside its narrowed variants, in this process."""
    by_key = {group_key(g): g for g in graph.groups()}
    for key, widths in jobs:
        g = by_key[key]
        variants = {"full": model} | {str(w): narrowed(model, graph, g, w) for w in widths}
        yield key, widths, meter.measure(variants, metrics)


def memory_limit() -> int:
    """Resident bytes after which a child hands the rest to a fresh one:
    a quarter of the machine's memory, at most 4 GiB (a fresh child costs
    seconds; a child may pass the limit by one group's variants)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 << 30
    return int(min(4 << 30, total // 4))


def measure_isolated(
    model: Any,
    jobs: Sequence[Job],
    metrics: Sequence[str],
    meter: DeviceMeter,
    digest: str,
    limit: int | None = None,
    stats: dict[str, Any] | None = None,
) -> Iterator[Result]:
    """Measure the jobs in child processes, each running until its memory passes ``limit``.

    Args:
        model: the original model (only its architecture is sent).
        jobs: (group key, widths) to measure, in order.
        metrics: what the meter measures.
        meter: the settings the children's meters copy (batch, training config, timing).
        digest: the model's architecture digest; a child whose rebuilt model
            differs refuses to measure.
        limit: resident bytes after which a child exits (default :func:`memory_limit`).
        stats: filled with ``processes`` (children started) and, where the
            children could not be used, ``fallback`` (why).

    Yields:
        One result per job, as the children finish them.

    Raises:
        RuntimeError: a child failed after measuring part of the jobs (its
            error output attached).
    """
    stats = stats if stats is not None else {}
    stats.setdefault("processes", 0)
    pending = list(jobs)
    with tempfile.TemporaryDirectory(prefix="secateur-probe-") as tmp:
        request = _request(model, metrics, meter, digest, limit or memory_limit())
        while pending:
            done, error = _run_child(Path(tmp), request, pending, stats["processes"])
            stats["processes"] += 1
            yield from done
            pending = pending[len(done) :]
            if pending and not done:
                if stats["processes"] > 1:
                    raise RuntimeError(f"a profiling child process failed: {error}")
                stats["fallback"] = error
                _log.warning("profiling in this process instead of a child: %s", error)
                return
    stats.setdefault("fallback", None)


def _request(
    model: Any, metrics: Sequence[str], meter: DeviceMeter, digest: str, limit: int
) -> dict[str, Any]:
    config = keras.saving.serialize_keras_object(model)
    return {
        "model": config,
        "modules": sorted(_modules(config)),
        "digest": digest,
        "metrics": list(metrics),
        "meter": {
            "batch_size": meter.batch_size,
            "latency_batch": meter.latency_batch,
            "seed": meter.seed,
            "config": asdict(meter.config),
            "measure": asdict(meter.settings),
        },
        "limit": limit,
    }


def _modules(config: Any) -> set[str]:
    """Modules of the non-Keras classes ``config`` names that this process has imported."""
    out: set[str] = set()
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            module = item.get("module")
            if isinstance(module, str) and module in sys.modules and not _is_keras(module):
                out.add(module)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


def _is_keras(module: str) -> bool:
    return module == "keras" or module.startswith("keras.")


def _run_child(
    tmp: Path, request: dict[str, Any], jobs: Sequence[Job], index: int
) -> tuple[list[Result], str]:
    """Start one child on ``jobs``; what it finished, and its error output if it stopped early."""
    req, out, err = (tmp / f"{index}.{n}" for n in ("request.json", "out.jsonl", "stderr"))
    req.write_text(json.dumps(request | {"jobs": [list(j) for j in jobs]}))
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["CUDA_VISIBLE_DEVICES"] = ""  # children measure the CPU; the parent may hold a GPU
    with open(err, "wb") as stderr:
        proc = subprocess.run(
            [sys.executable, "-m", "secateur.pruner.probe", str(req), str(out)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            check=False,
        )
    done = _read_results(out)
    if proc.returncode == 0 and done:
        return done, ""
    tail = err.read_text(errors="replace")[-2000:].strip()
    return done, f"exit status {proc.returncode}: {tail or 'no error output'}"


def _read_results(path: Path) -> list[Result]:
    done: list[Result] = []
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by the child's death
            break
        done.append((row["group"], [int(w) for w in row["widths"]], row["figures"]))
    return done


# ---------------------------------------------------------------- the child


def _child(request_path: str, out_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    model = _rebuild_model(request)
    if model_digest(model) != request["digest"]:
        raise SystemExit("the model rebuilt from its config has another architecture")
    graph = analyze(model)
    meter = _meter(request["meter"])
    jobs = [(key, list(widths)) for key, widths in request["jobs"]]
    with open(out_path, "a") as out:
        for i, (key, widths, figures) in enumerate(
            measure_here(model, graph, jobs, request["metrics"], meter)
        ):
            out.write(json.dumps({"group": key, "widths": widths, "figures": figures}) + "\n")
            out.flush()
            if i + 1 < len(jobs) and _resident() > request["limit"]:
                return


def _rebuild_model(request: Mapping[str, Any]) -> Any:
    custom: dict[str, Any] = {}
    for name in request["modules"]:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, type) and getattr(value, "__module__", None) == name:
                custom[keras.saving.get_registered_name(value)] = value
                custom[value.__name__] = value
    return keras.saving.deserialize_keras_object(
        request["model"], custom_objects=custom, safe_mode=True
    )


def _meter(spec: Mapping[str, Any]) -> DeviceMeter:
    import tensorflow as tf

    return DeviceMeter(
        batch_size=spec["batch_size"],
        latency_batch=spec["latency_batch"],
        config=TrainConfig(**spec["config"]),
        measure=MeasureConfig(**spec["measure"]),
        device=Device("CPU", "CPU:0", 1, tf.distribute.get_strategy()),
        seed=spec["seed"],
        isolate=False,
    )


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _exit_with_parent() -> None:
    """Linux: the kernel kills this child when the profiling process dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


if __name__ == "__main__":
    _exit_with_parent()
    _child(sys.argv[1], sys.argv[2])
