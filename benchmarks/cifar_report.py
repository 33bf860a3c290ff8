"""The CIFAR-10 study's outputs from whatever runs are cached: figures, tables, docs section.

Called by ``benchmarks/cifar_study.py`` after the runs, or alone with
``--report-only``. Numbers come only from the cached run files; the section
says how many runs of the planned grid it holds.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
import sys
import tempfile
from typing import Any

from cifar_section import render
from cifar_train import unpack
from reproduce_study import _save, plot_cost, summary

BEGIN, END = "<!-- cifar10:begin -->", "<!-- cifar10:end -->"
GOAL = 0.005  # the largest drop "the answer" accepts: 0.5 points
WHY_CONTROL = (
    ": the base ends its cosine schedule at a learning rate of 0, and fine-tuning at the "
    "study's constant rate moves it off that point."
)
FIG2_ARMS = ("bn_scale + reload", "bn_scale, no reload", "l1 + reload")


def load(args: Any, grid: list[tuple[str, Any, tuple[float, ...]]], key: Any) -> dict[str, Any]:
    """Base, measurement, sparsity records and the runs of the grid that exist.

    ``grid``: (arm name, arm, ratios); ``key(name, arm, ratio, seed, args)``: a run's file name.
    """
    work = args.work
    out: dict[str, Any] = {"base": None, "measure": None, "sparsity": [], "runs": {}}
    for what, name in (("base", "base.json"), ("measure", "measure.json")):
        if os.path.exists(os.path.join(work, name)):
            with open(os.path.join(work, name)) as fh:
                out[what] = json.load(fh)
    for path in sorted(glob.glob(os.path.join(work, "sparse-*.json"))):
        with open(path) as fh:
            out["sparsity"].append(json.load(fh))
    planned = 0
    for name, arm, ratios in grid:
        for ratio in ratios:
            for seed in args.seeds:
                planned += 1
                path = os.path.join(work, "runs", key(name, arm, ratio, seed, args))
                if os.path.exists(path):
                    with open(path) as fh:
                        out["runs"].setdefault(name, []).append(json.load(fh))
    out["planned"] = planned
    return out


def aggregate(study: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per arm, per ratio: accuracy over seeds (t-interval) and the paired drop."""
    from secateur.pruner.stats import paired_drop

    base = study["base"]
    n = base["test_images"]
    base_correct = unpack(base["correct"], n)
    agg: dict[str, list[dict[str, Any]]] = {}
    for arm, rows in study["runs"].items():
        by_ratio: dict[float, list[dict[str, Any]]] = {}
        for row in rows:
            by_ratio.setdefault(row["ratio"], []).append(row)
        agg[arm] = []
        for ratio, rs in sorted(by_ratio.items()):
            drop = paired_drop(base_correct, [unpack(r["correct"], n) for r in rs])
            agg[arm].append(
                {
                    "ratio": ratio,
                    "n": len(rs),
                    "seeds": sorted(r["seed"] for r in rs),
                    "accuracy": summary([r["accuracy"] for r in rs]),
                    "drop": {"mean": drop.drop, "low": drop.low, "high": drop.high},
                    "params": rs[0]["params"],
                    "minutes": sum(r["seconds"] for r in rs) / len(rs) / 60,
                }
            )
    return agg


def control_pairs(grid: list[tuple[str, Any, tuple[float, ...]]]) -> dict[str, str]:
    """Each answer arm with the control that fine-tunes exactly as it does: {answer: control}."""
    controls = {arm.stages: name for name, arm, _ in grid if arm.control}
    return {
        name: controls[arm.stages]
        for name, arm, _ in grid
        if name.startswith("answer") and arm.stages in controls
    }


def net_drops(study: dict[str, Any], pairs: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Per answer arm and ratio: the drop against its own control, paired by image and seed.

    ``paired_drop`` with the control's per-image mean as the base and, per seed,
    ``answer_s - control_s + control mean`` as the run: the mean is the control's
    accuracy minus the arm's, the image part the paired one, and the seed part the
    spread of the per-seed differences (control and arm share the seed's shuffle
    and augmentation). Only seeds that both have count.
    """
    from secateur.pruner.stats import paired_drop

    n = study["base"]["test_images"]
    out: dict[str, list[dict[str, Any]]] = {}
    for arm, control in pairs.items():
        ctrl = {
            r["seed"]: unpack(r["correct"], n).astype(float) for r in study["runs"].get(control, [])
        }
        by_ratio: dict[float, dict[int, Any]] = {}
        for r in study["runs"].get(arm, []):
            if r["seed"] in ctrl:
                by_ratio.setdefault(r["ratio"], {})[r["seed"]] = unpack(r["correct"], n)
        for ratio, runs in sorted(by_ratio.items()):
            seeds = sorted(runs)
            mean = sum(ctrl[s] for s in seeds) / len(seeds)
            drop = paired_drop(mean, [runs[s] - ctrl[s] + mean for s in seeds])
            out.setdefault(arm, []).append(
                {"ratio": ratio, "n": len(seeds), "control": control,
                 "drop": {"mean": drop.drop, "low": drop.low, "high": drop.high}}
            )  # fmt: skip
    return out


def answer(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The largest ratio whose drop's upper end is within the goal (None: none is)."""
    ok = [r for r in rows if r["ratio"] > 0 and r["drop"]["high"] <= GOAL]
    return max(ok, key=lambda r: r["ratio"]) if ok else None


def plot(agg: dict[str, list[dict]], base_acc: float, out: str) -> list[str]:
    """Fig. 2 (accuracy, t-interval over seeds) and the drop figure (paired interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    shown = {a: [r for r in rows if r["ratio"] > 0] for a, rows in agg.items()}
    shown = {a: rows for a, rows in shown.items() if rows}  # the control is a band
    for what in ("accuracy", "drop"):
        fig, ax = plt.subplots(figsize=(10, 5))
        for k, (arm, rows) in enumerate(shown.items()):
            dx = (k - (len(shown) - 1) / 2) * 0.004
            xs = [r["ratio"] + dx for r in rows]
            if what == "accuracy":
                ys = [100 * r["accuracy"]["mean"] for r in rows]
                err = [100 * (r["accuracy"]["half"] if r["n"] > 1 else 0) for r in rows]
                yerr: Any = err
            else:
                ys = [100 * r["drop"]["mean"] for r in rows]
                yerr = [
                    [100 * (r["drop"]["mean"] - r["drop"]["low"]) for r in rows],
                    [100 * (r["drop"]["high"] - r["drop"]["mean"]) for r in rows],
                ]
            style = "o-" if arm in FIG2_ARMS else "s--"
            ax.errorbar(xs, ys, yerr=yerr, fmt=style, capsize=3, label=arm, color=f"C{k}")
        control = next((rows[0] for a, rows in agg.items() if a.startswith("control")), None)
        if what == "accuracy" and control is not None:
            c = control["accuracy"]
            half = c["half"] if control["n"] > 1 else 0.0
            ax.axhspan(100 * (c["mean"] - half), 100 * (c["mean"] + half), color="gray", alpha=0.2)
            ax.axhline(
                100 * c["mean"], color="gray", ls=":", label="control (unpruned, fine-tuned)"
            )
        if what == "accuracy":
            ax.axhline(100 * base_acc, color="black", ls="--", label="base model (unpruned)")
            ax.set(ylabel="top-1 accuracy, % (CIFAR-10 test images)", ylim=(0, 100))
            ax.set_title("Fig. 2 on CIFAR-10: accuracy vs pruned ratio (mean, 95% t over seeds)")
        else:
            ax.axhline(100 * GOAL, color="gray", ls=":", label="goal: 0.5-point drop")
            ax.set(ylabel="accuracy drop, points (symlog)", yscale="symlog")
            ax.set_title("Drop vs the base model (mean, paired 95% interval on the test images)")
        ax.set_xlabel("pruned ratio of channels")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        name = "cifar10_fig2_accuracy.png" if what == "accuracy" else "cifar10_fig5_drop.png"
        paths.append(_save(fig, out, name))
    return paths


def plot_measure(measure: dict[str, Any] | None, out: str) -> list[str]:
    """Figs. 3 and 4 with the digits study's plotting, under CIFAR-10 names."""
    if not measure:
        return []
    rows = sorted(measure["rows"], key=lambda r: r["ratio"])
    paths = []
    with tempfile.TemporaryDirectory() as tmp:
        for made in plot_cost(rows, tmp):
            name = os.path.basename(made).replace("study_", "cifar10_")
            paths.append(shutil.copyfile(made, os.path.join(out, name)))
    return paths


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def table(agg: dict[str, list[dict]]) -> str:
    """One row per arm and ratio: accuracy (t over seeds), paired drop interval, n."""
    lines = [
        "| arm | ratio | accuracy % (mean ± 95% t, [min, max]) | drop, points "
        "(mean [paired 95% interval]) | n | params | min/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, rows in agg.items():
        for r in rows:
            a, d = r["accuracy"], r["drop"]
            acc = f"{_pct(a['mean'])}" + (f" ± {_pct(a['half'])}" if r["n"] > 1 else "")
            acc += f" [{_pct(a['min'])}, {_pct(a['max'])}]"
            drop = f"{_pct(d['mean'])} [{_pct(d['low'])}, {_pct(d['high'])}]"
            lines.append(
                f"| {arm} | {r['ratio']:.0%} | {acc} | {drop} | {r['n']} | "
                f"{r['params']:,} | {r['minutes']:.1f} |"
            )
    return "\n".join(lines)


def _drop_cell(row: dict[str, Any] | None) -> str:
    """A run cell's paired drop as "mean [low, high], n = k" (empty when not run)."""
    if row is None:
        return ""
    d = row["drop"]
    return f"{_pct(d['mean'])} [{_pct(d['low'])}, {_pct(d['high'])}], n = {row['n']}"


def answers(agg: dict[str, list[dict]], net: dict[str, list[dict]] | None = None) -> str:
    lines = [
        "| arm | largest ratio with upper end <= 0.5 points | its drop [interval] "
        "| drop at 50% [interval], n |",
        "|---|---|---|---|",
    ]
    rows_of = [(arm, rows) for arm, rows in agg.items() if any(r["ratio"] > 0 for r in rows)]
    rows_of += [(f"{arm}, **against its own control**", rows) for arm, rows in (net or {}).items()]
    for arm, rows in rows_of:
        half = _drop_cell(next((r for r in rows if abs(r["ratio"] - 0.5) < 1e-9), None))
        best = answer(rows)
        if best is None:
            tried = ", ".join(f"{r['ratio']:.0%}" for r in rows)
            lines.append(f"| {arm} | none of {tried} | | {half} |")
            continue
        lines.append(f"| {arm} | **{best['ratio']:.0%}** | {_drop_cell(best)} | {half} |")
    for arm, rows in agg.items():
        if not arm.startswith("control"):
            continue
        d = rows[0]["drop"]
        lines += [
            "",
            f'For scale: "{arm}" drops {_pct(d["mean"])} [{_pct(d["low"])}, '
            f"{_pct(d['high'])}] points from the base by itself (n = {rows[0]['n']})"
            + (WHY_CONTROL if "same fine-tune" in arm else "."),
        ]
    for arm, rows in (net or {}).items():
        lines += ["", f'"{arm}" against "{rows[0]["control"]}" (paired by image and seed):']
        lines += [
            f"- at {r['ratio']:.0%}: {_pct(r['drop']['mean'])} [{_pct(r['drop']['low'])}, "
            f"{_pct(r['drop']['high'])}] points (n = {r['n']})"
            for r in rows
        ]
    return "\n".join(lines)


def _at(agg: dict[str, list[dict]], arm: str, ratio: float) -> dict[str, Any] | None:
    return next((r for r in agg.get(arm, []) if abs(r["ratio"] - ratio) < 1e-9), None)


def compare(agg: dict[str, list[dict]], better: str, worse: str) -> list[str]:
    """Per shared ratio: held / not held / not shown beyond the noise, from the drop intervals."""
    out = []
    for r in agg.get(better, []):
        other = _at(agg, worse, r["ratio"])
        if other is None or r["ratio"] == 0:
            continue
        a, b = r["drop"], other["drop"]
        if a["high"] < b["low"]:
            verdict = "held"
        elif b["high"] < a["low"]:
            verdict = "not held (the other way round)"
        else:
            verdict = "not shown beyond the noise (intervals overlap)"
        if min(r["n"], other["n"]) < 2:
            verdict += "; one seed so far: the interval holds the test images' noise, not yet "
            verdict += "the run-to-run spread"
        out.append(
            f"at {r['ratio']:.0%}: drop {_pct(a['mean'])} [{_pct(a['low'])}, {_pct(a['high'])}] "
            f"vs {_pct(b['mean'])} [{_pct(b['low'])}, {_pct(b['high'])}] "
            f"(n = {r['n']}, {other['n']}): **{verdict}**"
        )
    return out


def findings(agg: dict[str, list[dict]], measure: dict[str, Any] | None) -> str:
    """The paper's findings one by one, judged from the intervals."""
    parts = ["**Reloading weights beats re-initialising** (bn_scale + reload vs no reload):"]
    parts += [f"- {x}" for x in compare(agg, "bn_scale + reload", "bn_scale, no reload")]
    parts += ["", "**BN-scale beats L1** (both with reload):"]
    parts += [f"- {x}" for x in compare(agg, "bn_scale + reload", "l1 + reload")]
    at30 = _at(agg, "bn_scale + reload", 0.3)
    parts += ["", "**VGG-16 keeps its accuracy at 30% pruned on CIFAR-10** (bn_scale + reload):"]
    if at30:
        d = at30["drop"]
        verdict = (
            "held (upper end <= 0.5 points)"
            if d["high"] <= GOAL
            else "not held (the whole interval is above 0.5 points)"
            if d["low"] > GOAL
            else "not shown beyond the noise"
        )
        parts.append(
            f"- drop {_pct(d['mean'])} [{_pct(d['low'])}, {_pct(d['high'])}], "
            f"n = {at30['n']}: **{verdict}**" + (" (one seed so far)" if at30["n"] < 2 else "")
        )
    rows = [r for r in agg.get("bn_scale + reload", []) if r["ratio"] > 0]
    if len(rows) >= 3:
        slopes = [
            (b["drop"]["mean"] - a["drop"]["mean"]) / (b["ratio"] - a["ratio"])
            for a, b in itertools.pairwise(rows)
        ]
        rising = all(s2 >= s1 for s1, s2 in itertools.pairwise(slopes))
        parts += [
            "",
            "**Accuracy falls faster and faster as the ratio grows** (bn_scale + reload, "
            "points lost per 10% more pruned, in the mean): "
            + ", ".join(f"{10 * s:.2f}" for s in slopes)
            + (": **held** (in the means)" if rising else ": **not held** (not monotone)")
            + ". Near chance (10%) every curve must flatten, so a slope that falls there "
            "says little.",
        ]
    if measure:
        parts += ["", measure_finding(measure)]
    return "\n".join(parts)


def measure_finding(measure: dict[str, Any]) -> str:
    """Whether memory and step time fall at every ratio step, and how far from linear."""
    m = sorted(measure["rows"], key=lambda r: r["ratio"])
    verdicts = []
    for key, what in (("peak_memory_bytes", "peak memory"), ("train_step_seconds", "step time")):
        values = [r.get(key) for r in m]
        if not all(values):
            verdicts.append(f"{what}: not measured")
            continue
        falls = all(b < a for a, b in itertools.pairwise(values))
        ratios = ", ".join(f"{r['ratio']:.0%}: {v / values[0]:.0%}" for r, v in zip(m, values))
        verdicts.append(
            f"{what} ({ratios} of unpruned): "
            + ("falls at every step" if falls else "does **not** fall at every step")
        )
    params = ", ".join(f"{r['ratio']:.0%}: {r['params'] / m[0]['params']:.0%}" for r in m)
    return (
        "**Memory and step time fall with the ratio, not linearly** (batch "
        f"{measure['batch_size']}, this CPU, shared with other processes): params ({params}); "
        + "; ".join(verdicts)
        + ". Held for what falls at every step; what does not is **not shown** by this "
        "measurement, taken while other processes used the same 2 cores (`--measure-only` "
        "measures again, on a quiet machine)."
    )


def measure_table(measure: dict[str, Any] | None) -> str:
    if not measure:
        return "Not measured yet."
    lines = [
        "| ratio | params | FLOPs/image | peak memory MiB | step ms |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(measure["rows"], key=lambda r: r["ratio"]):
        mem = r.get("peak_memory_bytes")
        lines.append(
            f"| {r['ratio']:.0%} | {r['params']:,} | {r['flops']:,} | "
            f"{mem / 2**20 if mem else float('nan'):.1f} | {1000 * r['train_step_seconds']:.1f} |"
        )
    return "\n".join(lines)


def section(
    args: Any, study: dict[str, Any], agg: dict[str, list[dict]], net: dict[str, list[dict]]
) -> str:
    if study["base"] is None:
        return render(args, study, agg, "", "", "", "")
    return render(args, study, agg, findings(agg, study["measure"]), table(agg),
                  answers(agg, net), measure_table(study["measure"]), net)  # fmt: skip


def write_outputs(args: Any, grid: list[tuple[str, Any, tuple[float, ...]]], key: Any) -> list[str]:
    """Figures, json, md and the docs section from the cached runs; the paths written."""
    study = load(args, grid, key)
    arm_names = [g[0] for g in grid]
    if study["base"] is None:
        print("no base model cached yet: the section says so", file=sys.stderr)
        return [splice(os.path.join(args.out, "study.md"), section(args, study, {}, {}))]
    agg = aggregate(study)
    agg = {a: agg[a] for a in arm_names if a in agg}
    net = net_drops(study, control_pairs(grid))
    paths = plot(agg, study["base"]["accuracy"], args.out)
    paths += plot_measure(study["measure"], args.out)
    text = section(args, study, agg, net)
    md = os.path.join(args.out, "cifar10_study_results.md")
    with open(md, "w") as fh:
        fh.write(text)
    out = os.path.join(args.out, "cifar10_study_results.json")
    with open(out, "w") as fh:
        json.dump(
            {"args": dict(vars(args)), "summary": agg, "net_of_control": net} | study,
            fh,
            indent=1,
            default=str,
        )
    paths += [md, out, splice(os.path.join(args.out, "study.md"), text)]
    return paths


def splice(path: str, text: str) -> str:
    """Put ``text`` between the CIFAR-10 markers of ``path`` (appended when absent)."""
    old = ""
    if os.path.exists(path):
        with open(path) as fh:
            old = fh.read()
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + block + rest.split(END, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as fh:
        fh.write(new)
    return path
