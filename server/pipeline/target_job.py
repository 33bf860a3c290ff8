"""A job with targets (``pruning.targets``): plan to the budget, report how it went.

A target job has one candidate. Its plan comes from
:func:`secateur.pruner.api.make_plan` with a :class:`~secateur.pruner.meter.DeviceMeter`
on the job's device (training step time under the job's training settings,
XLA where fine-tuning uses it) and the cost profiles cached in
``profile_dir`` (the service's ``<state_dir>/profiles``, ``secateur prune``'s
``$SECATEUR_PROFILE_DIR`` or ``~/.cache/secateur/profiles``): profile,
allocate, measure, correct, or :class:`TargetUnreachableError` (the job ends
FAILED with FAILED_PRECONDITION and the best reached in its message). The
accuracy budget then applies as to any job: fine-tune, evaluate, gate.

The report's ``targets`` lists, per target, what was wanted, what the cost
model predicted, what the planner measured on the rebuilt model
(``measured``, ``how``) and the same figure from the job's own MEASURING
stage after fine-tuning (``remeasured``, measured with
``training.measure_steps`` on the job's data).
"""

from __future__ import annotations

import os
from typing import Any

from secateur.pruner.config import TrainConfig

#: Where ``secateur prune`` caches cost profiles (else ``~/.cache/secateur/profiles``).
PROFILE_DIR_ENV = "SECATEUR_PROFILE_DIR"

# Target metric -> the report figure the MEASURING stage gives for it.
_FIGURES = {
    "step_time": "train_step_seconds",
    "peak_memory": "peak_memory_bytes",
    "params": "params",
    "flops": "flops",
}


def default_profile_dir() -> str:
    """``$SECATEUR_PROFILE_DIR``, else ``$XDG_CACHE_HOME/secateur/profiles``."""
    given = os.environ.get(PROFILE_DIR_ENV, "").strip()
    if given:
        return given
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "secateur", "profiles")


def plan_round(
    model: Any,
    spec: Any,
    graph: Any,
    device: Any,
    data: Any,
    train: TrainConfig,
    profile_dir: str | None,
) -> Any:
    """The round's plan: by ratio, or to ``spec.targets`` measured on ``device``."""
    if spec.targets is None:
        from secateur.pruner.plan import make_plan

        return make_plan(model, spec, graph=graph, device_kind=device.kind, data=data)
    from secateur.pruner.api import make_plan as plan_to

    meter = None
    if spec.targets.measured:
        from secateur.pruner.meter import DeviceMeter

        meter = DeviceMeter(
            batch_size=train.batch_size,
            latency_batch=spec.targets.latency_batch,
            config=train,
            device=device,
            seed=spec.seed,
        )
    return plan_to(model, spec, graph, device.kind, data, meter, profile_dir)


def candidate_ratio(plan: Any, ratio: float) -> float:
    """A target plan's share of prunable channels removed (its candidate's ratio)."""
    if not plan.targets:
        return ratio
    total = plan.prunable_channels
    return round(plan.removed_channels / total, 6) if total else 0.0


def add_targets(report: dict[str, Any], latency_batch: int = 1, batch_size: int = 1) -> None:
    """``report["targets"]``: the shown plan's targets with the MEASURING stage's figure.

    ``remeasured`` is None where that stage has no such figure (latency at a
    batch other than 1 and the training batch).
    """
    plan, pruned, original = report.get("plan") or {}, report.get("pruned"), report.get("original")
    targets = [dict(t) for t in plan.get("targets") or []]
    if not targets:
        return
    for t in targets:
        key = _FIGURES.get(t["metric"])
        if t["metric"] == "latency":
            key = {1: "latency_batch1_seconds", batch_size: "latency_batch_seconds"}.get(
                latency_batch
            )
        before = (original or {}).get(key or "")
        after = (pruned or {}).get(key or "")
        t["remeasured"] = after / before if before and after is not None else None
    report["targets"] = targets
