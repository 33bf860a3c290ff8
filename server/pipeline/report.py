"""What a job decides and writes about its candidates.

:func:`choose` picks the candidate to publish and records the outcome in the
report (``published``, ``gate_failed`` with the closest candidate, or
``curves_only``); :func:`write_curves` writes a sweep's curves (CSV and PNG)
beside the published model; :func:`layout` records padded vs logical
parameters per layer on the device's tile.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from secateur.pruner.stats import Drop, accuracy_drop, resolves
from secateur.server.pipeline.job_request import JobRequest
from secateur.v1 import enums

#: The layout of report.json (bumped when a key changes meaning).
REPORT_VERSION = 1


def layout(variants: dict[str, Any], kind: str) -> dict[str, Any]:
    """Logical vs padded params per layer on the device's tile (see hardware.py)."""
    from secateur.pruner.hardware import TILES, layer_params

    return {
        "device": kind,
        "tile": list(TILES[kind]),
        "variants": {name: layer_params(model, kind) for name, model in variants.items()},
    }


#: What a job did with its candidates: the report's ``outcome``, the short
#: names of the contract's JobResult.Outcome (lower case).
OUTCOMES = tuple(n.lower() for n in enums.OUTCOMES)


def _decide(
    report: dict[str, Any], outcome: str, decision: str, best: dict[str, Any] | None
) -> None:
    assert outcome in OUTCOMES, outcome
    report["outcome"], report["decision"] = outcome, decision
    report["selected_ratio"] = best["ratio"] if best and outcome == "published" else None
    report["best_ratio"] = best["ratio"] if best else None
    report["best_accuracy_drop"] = best.get("accuracy_drop") if best else None


def fine_tuning_how(req: JobRequest, device: Any, train_ds: Any | None) -> dict[str, Any]:
    """How candidates were fine-tuned: the loop settings resolved for the device."""
    from secateur.pruner.finetune import epoch_steps, training_setup

    steps = epoch_steps(train_ds, req.train) if train_ds is not None else None
    budget = req.data.cache_mib
    return training_setup(req.train, device, steps).to_dict() | {
        "steps_per_epoch": steps,
        "data_cache": f"in memory when decoded it fits {budget} MiB" if budget else "off",
    }


def drop_interval(original: dict[str, Any], figures: dict[str, Any]) -> Drop | None:
    """The accuracy drop from ``original`` to ``figures`` with its 95% interval.

    Newcombe's hybrid score interval from the two Wilson intervals
    (:func:`secateur.pruner.stats.accuracy_drop`); None without both
    accuracies and their evaluation set sizes.
    """
    counts = []
    for f in (original, figures):
        accuracy, n = f.get("accuracy"), f.get("eval_examples")
        if accuracy is None or not n:
            return None
        counts.append((round(accuracy * n), int(n)))
    return accuracy_drop(counts[0], counts[1])


def _stated(report: dict[str, Any], candidate: dict[str, Any] | None) -> str:
    """``drop 0.8 pt, 95% CI [0.1, 1.5], n=10000`` for a candidate; "" unmeasured."""
    if candidate is None or "figures" not in candidate:
        return ""
    drop = drop_interval(report["original"], candidate["figures"])
    return f"{drop}, n={candidate['figures']['eval_examples']}" if drop else ""


def _warn_unresolved(report: dict[str, Any], budget: float | None) -> None:
    """Warn (in ``warnings`` and the decision) when the eval set cannot tell the budget.

    The drop's interval half-width is compared with the budget for every
    candidate: wider, and a candidate can pass or fail on the draw of the
    evaluation examples alone.
    """
    if budget is None:
        return
    widths = [
        (d.half_width, c["figures"]["eval_examples"])
        for c in report["candidates"]
        if "figures" in c
        and (d := drop_interval(report["original"], c["figures"])) is not None
        and not resolves(d, budget)
    ]
    if not widths:
        return
    width, n = max(widths)
    warning = (
        f"the evaluation set ({n} examples) is too small to resolve "
        f"max_accuracy_drop={budget:g}: the drop's 95% CI half-width is {100 * width:.1f} pt"
    )
    report.setdefault("warnings", []).append(warning)
    report["decision"] += f"; warning: {warning}"


def choose(report: dict[str, Any], req: JobRequest) -> dict[str, Any] | None:
    """The candidate to publish; the outcome and decision written into the report.

    The decision states the deciding candidate's drop with its 95% interval
    and the evaluation set size, and warns when that set is too small for
    the budget (see :func:`_warn_unresolved`).
    """
    chosen = _choose(report, req)
    _warn_unresolved(report, req.max_accuracy_drop)
    return chosen


def _choose(report: dict[str, Any], req: JobRequest) -> dict[str, Any] | None:
    cands = report["candidates"]
    budget = req.max_accuracy_drop
    if budget is None:
        if len(cands) == 1:
            decision = "single ratio, no accuracy gate: published"
            if _stated(report, cands[0]):
                decision += f" ({_stated(report, cands[0])})"
            _decide(report, "published", decision, cands[0])
            return cands[0]
        decision = "sweep without max_accuracy_drop: curves only, nothing published"
        _decide(report, "curves_only", decision, None)
        return None
    measured = [c for c in cands if c["accuracy_drop"] is not None]
    ok = [c for c in measured if c["accuracy_drop"] <= budget]
    if not ok:
        # The closest miss: the smallest drop (the largest ratio among equals).
        near = min(measured, key=lambda c: (c["accuracy_drop"], -c["ratio"]), default=None)
        decision = f"no candidate within max_accuracy_drop={budget}; nothing published"
        if near is not None and _stated(report, near):
            decision += f" (closest: ratio {near['ratio']}, {_stated(report, near)})"
        _decide(report, "gate_failed", decision, near)
        return None
    best = max(ok, key=lambda c: c["ratio"])
    decision = f"ratio {best['ratio']} is the largest within max_accuracy_drop={budget}"
    if _stated(report, best):
        decision += f" ({_stated(report, best)})"
    _decide(report, "published", decision, best)
    return best


CURVE_COLUMNS = (
    "ratio",
    "accuracy",
    "accuracy_drop",
    "params",
    "flops",
    "peak_memory_bytes",
    "train_step_seconds",
    "train_step_p90_seconds",
)


def curve_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per ratio, the unpruned model first at ratio 0."""
    o = report["original"]
    rows = [
        {"ratio": 0.0, "accuracy_drop": 0.0 if o["accuracy"] is not None else None}
        | {k: o[k] for k in CURVE_COLUMNS if k in o}
    ]
    for c in report["candidates"]:
        f = c["figures"]
        rows.append(
            {"ratio": c["ratio"], "accuracy_drop": c["accuracy_drop"]}
            | {k: f[k] for k in CURVE_COLUMNS if k in f}
        )
    return rows


def write_curves(report: dict[str, Any], stem: str) -> list[str]:
    """Write ``stem.csv`` and ``stem.png`` (accuracy, memory, step time, params vs ratio)."""
    rows = curve_rows(report)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CURVE_COLUMNS))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in CURVE_COLUMNS})
    with open(stem + ".csv", "w") as fh:
        fh.write(buf.getvalue())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ratios = [r["ratio"] for r in rows]
    panels = [
        ("accuracy", "top-1 accuracy", 1.0),
        ("peak_memory_bytes", "peak training memory (MiB)", 1 / 2**20),
        ("train_step_seconds", "train step (ms)", 1000.0),
        ("params", "parameters (M)", 1e-6),
    ]
    for ax, (key, label, scale) in zip(axes.ravel(), panels, strict=True):
        ys = [r.get(key) for r in rows]
        pts = [(x, y * scale) for x, y in zip(ratios, ys, strict=True) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_xlabel("pruned ratio of channels")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Secateur sweep: {os.path.basename(report['model_uri'])} ({report['device']['kind']})"
    )
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=100)
    plt.close(fig)
    return [stem + ".csv", stem + ".png"]


def member_report(
    candidates: list[dict[str, Any]], device: Any, timings: dict[str, float]
) -> dict[str, Any]:
    """What a multi-host member that is not the chief returns: it trained, and
    wrote nothing (the chief evaluates, measures, decides and publishes)."""
    return {
        "report_version": REPORT_VERSION,
        "role": "member",
        "output_uri": None,
        "device": {"kind": device.kind, "name": device.name, "count": device.count},
        "candidates": [
            {"ratio": c["ratio"], "plan": c["plan"], "history": c["history"]} for c in candidates
        ],
        "timings_seconds": dict(timings),
    }
