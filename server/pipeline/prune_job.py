"""The whole job, as one local run: fetch, prune, fine-tune, measure, publish.

``PruneJob(request, storage).run()`` is what ``secateur prune`` runs in
process and what a service worker runs inside a job. Stages, in order:
FETCHING, ANALYZING, SCORING, REBUILDING, FINE_TUNING, EVALUATING, MEASURING,
EXPORTING; each reports through ``on_event``. A sweep (several ratios) makes
one candidate per ratio and publishes at most one.

Nothing is written to OUTPUT_URI until every candidate is built, trained and
measured; the version is assembled in a private work directory and published
by :func:`publish.publish_version` (fenced, marked with the job, then
:meth:`Storage.publish_dir`: temporary prefix, then the final name), so a
failure or a cancellation leaves no partial output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from secateur.pruner.errors import CancelledError
from secateur.pruner.exports import check_exportable, write_exports
from secateur.server.pipeline.boundary import JobPlaces, preflight, user_paths
from secateur.server.pipeline.checkpoint import Checkpoints
from secateur.server.pipeline.job_data import JobData, pass_seed

# The request, its stages and the report's decisions live beside this module;
# they are re-exported so ``secateur.server.pipeline.prune_job`` stays the job's one name.
from secateur.server.pipeline.job_request import (
    CANDIDATE_STAGES,
    MAX_RATIOS,
    STAGES,
    JobRequest,
    StageEvent,
    overall_progress,
    sweep_progress,
)
from secateur.server.pipeline.publish import LeaseLost, publish_version
from secateur.server.pipeline.report import (
    CURVE_COLUMNS,
    OUTCOMES,
    REPORT_VERSION,
    choose,
    curve_rows,
    drop_interval,
    fine_tuning_how,
    layout,
    member_report,
    write_curves,
)
from secateur.server.pipeline.target_job import add_targets, candidate_ratio, plan_round
from secateur.server.storage import DiskBudgetError, Location, Storage

__all__ = [
    "CANDIDATE_STAGES", "CURVE_COLUMNS", "MAX_RATIOS", "OUTCOMES", "REPORT_VERSION", "STAGES",
    "GateFailed", "JobRequest", "LeaseLost", "PruneJob", "StageEvent", "curve_rows",
    "overall_progress", "sweep_progress", "write_curves",
]  # fmt: skip


#: A worker's local disk budget for every job it runs (bytes), when a PruneJob
#: is not given one: ``secateur prune``, ``serve`` and ``worker`` alike.
DISK_BUDGET_ENV = "SECATEUR_LOCAL_DISK_BUDGET_BYTES"


def disk_budget(given: int | None) -> int | None:
    """``given``, else :data:`DISK_BUDGET_ENV` (unset or empty: no limit)."""
    if given is not None:
        return given
    text = os.environ.get(DISK_BUDGET_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"{DISK_BUDGET_ENV} must be a whole number of bytes. Received: {text!r}")
    return int(text)


class GateFailed(Exception):
    """No candidate met the accuracy budget; the report explains."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__(report.get("decision", "accuracy gate failed"))
        self.report = report


class PruneJob:
    """One end-to-end pruning job (see module docstring)."""

    def __init__(
        self,
        request: JobRequest,
        storage: Storage,
        on_event: Callable[[StageEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        device: Any | None = None,
        fence: Callable[[str], bool] | None = None,
        disk_budget_bytes: int | None = None,
        trusted: Sequence[str] = (),
        profile_dir: str | None = None,
        job_id: str = "",
        checkpoints: Checkpoints | None = None,
    ) -> None:
        self.req = request
        self.profile_dir = profile_dir  # cost profiles of target jobs (see target_job)
        #: A service job's checkpoints (checkpoint.py): finished candidates and
        #: fine-tuning state, resumed from; removed when the run ends.
        self.checkpoints = checkpoints
        self.trusted = tuple(trusted)  # --trust-package: see secateur.pruner.safety
        #: Bytes the job may write to local disk (its work directory: the model
        #: copy and the export); data is streamed, never copied. None: no limit.
        self.disk_budget_bytes = disk_budget(disk_budget_bytes)
        #: Asked with the version's URI right before publishing: False means this process
        #: no longer holds the job's lease, so it must publish nothing (publish.py).
        self.fence, self.job_id = fence, job_id
        self.storage = storage
        self.on_event = on_event or (lambda _e: None)
        self.should_cancel = should_cancel or (lambda: False)
        self.device = device
        self.timings: dict[str, float] = {}
        #: local copy -> the URI it came from (see :func:`boundary.user_paths`).
        self.names: dict[str, str] = {}
        #: the job's URIs, parsed and checked once by preflight when the run starts.
        self.places: JobPlaces
        self._stage_start = 0.0
        self._stage = ""
        #: seed, op determinism and how, for the report (set when the run starts).
        self.reproducibility: dict[str, Any] = {}
        #: the original under the device's strategy when distilling (train.distill_alpha).
        self._teacher: Any = None

    # -- plumbing ----------------------------------------------------------
    def _enter(self, stage: str, message: str = "", progress: float = 0.0, **detail: Any) -> None:
        if self.should_cancel():
            raise CancelledError(f"job cancelled before {stage}")
        now = time.perf_counter()
        if self._stage and self._stage != stage:
            self.timings[self._stage] = self.timings.get(self._stage, 0.0) + now - self._stage_start
        if self._stage != stage:
            self._stage, self._stage_start = stage, now
        self.on_event(StageEvent(stage, message, progress, detail))

    def _close_stage(self) -> None:
        if self._stage:
            self.timings[self._stage] = (
                self.timings.get(self._stage, 0.0) + time.perf_counter() - self._stage_start
            )
            self._stage = ""

    # -- the job -----------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run every stage; return the report (also published with the model).

        Raises:
            GateFailed: no candidate within ``max_accuracy_drop``.
            CancelledError: ``should_cancel`` became true.
            SecateurError / StorageError subclasses: bad input.
        """
        from secateur.pruner.determinism import reproducible

        # Every generator is seeded from the job's seed before the model is
        # loaded (loading draws Dropout's seeds), in the CLI as in a worker.
        # Errors name the user's URIs, never the local copies in ``work``.
        kept = self.checkpoints
        try:
            with (
                reproducible(self.req.spec.seed, self.req.train.deterministic) as how,
                tempfile.TemporaryDirectory(prefix="secateur-job-") as work,
                user_paths(self.names),
            ):
                self.reproducibility = how.to_dict()
                return self._run(work)
        except LeaseLost:
            kept = None  # the job, and its checkpoints, are another worker's now
            raise
        finally:
            if kept is not None:  # the job ended, whatever its outcome
                kept.remove()

    def _run(self, work: str) -> dict[str, Any]:
        req = self.req
        self._enter("FETCHING", f"checking {req.output_uri}")
        places = self.places = preflight(self.storage, req)
        if self.checkpoints is not None:
            self.checkpoints.begin()
        model_path = self.storage.download(places.model, os.path.join(work, "model"))
        self.names[model_path] = places.model.text
        self._check_disk(work, "the model copy")
        train_files = self._stream_data(places.train_data)
        eval_files = self._stream_data(places.eval_data)

        self._enter("ANALYZING", "loading the model")
        from secateur.pruner.finetune import select_device
        from secateur.pruner.modelio import load_model
        from secateur.pruner.tracing import analyze

        with user_paths(self.names, fallback=req.model_uri):  # conversions' temporary files
            original = load_model(model_path, self.trusted)
            graph = analyze(original)
            check_exportable(original, req.exports)  # a format lacking an op fails the job now
        device = self.device or select_device()
        data = JobData(
            original, train_files, eval_files, req, device, self.names, self.should_cancel,
            self.storage.read_records,
        )  # fmt: skip

        base, graph = self._before_pruning(original, graph, data, device)
        candidates = [
            self._candidate(base, graph, r, data, device, i) for i, r in enumerate(req.sweep)
        ]
        if not device.is_chief:  # a multi-host member: it trained; the chief does the rest
            self._close_stage()
            return member_report(candidates, device, self.timings)

        variants = {"original": original} | {
            f"ratio={c['ratio']}": c.pop("_model") for c in candidates
        }
        report = self._measure(variants, candidates, data, device)
        chosen = choose(report, req)
        # The headline pair: the published candidate, or the only one (so a
        # failed gate still shows what was measured).
        shown = chosen or (candidates[0] if len(candidates) == 1 else None)
        report["pruned"] = shown["figures"] if shown else None
        report["plan"] = shown["plan"] if shown else None
        add_targets(report, req.spec.targets.latency_batch if req.spec.targets else 1,
                    req.train.batch_size)  # fmt: skip
        self._enter("EXPORTING", "writing the SavedModel")
        if chosen is None:
            self._close_stage()
            report["timings_seconds"] = dict(self.timings)
            if req.max_accuracy_drop is not None:
                raise GateFailed(report)
            return report
        model = variants[f"ratio={chosen['ratio']}"]
        report["output_uri"] = self._publish(work, model, report, data.train_ds or data.eval_ds)
        self._close_stage()
        report["timings_seconds"] = dict(self.timings)
        return report

    def _measure(
        self, variants: dict[str, Any], candidates: list[dict[str, Any]], data: JobData, device: Any
    ) -> dict[str, Any]:
        """MEASURING: the original and every candidate, interleaved; the report."""
        self._enter("MEASURING", "original vs pruned, interleaved")
        from secateur.pruner.measure import measure_models

        figures = measure_models(
            variants,
            data.batch(),
            self.req.train,
            device,
            data.eval_ds,
            self.req.measure,
            self.should_cancel,
            lambda frac, what: self.on_event(StageEvent("MEASURING", what, frac)),
        )
        report = self._report(figures, candidates, device)
        report["fine_tuning"] = fine_tuning_how(self.req, device, data.train_ds)
        report["layout"] = layout(variants, device.kind)
        return report

    def _stream_data(self, matches: tuple[Location, ...]) -> list[str]:
        """The data files, read where they lie (never copied): local ones by
        TensorFlow, ``gs://`` ones streamed through the job's storage (see JobData)."""
        for loc in matches:
            self.names[loc.tf_path] = loc.text
        return [loc.tf_path for loc in matches]

    def _check_disk(self, work: str, what: str) -> None:
        """Fail when the work directory outgrows the job's local disk budget."""
        if self.disk_budget_bytes is None:
            return
        used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(work) for f in fs)
        if used > self.disk_budget_bytes:
            raise DiskBudgetError(
                f"a job's local files must fit the local disk budget of "
                f"{self.disk_budget_bytes} bytes (data is streamed, never copied); "
                f"{what} takes the work directory to {used} bytes.",
                self.req.model_uri,
            )

    def _before_pruning(self, original: Any, graph: Any, data: JobData, device: Any) -> Any:
        """Sparsity training and the distillation teacher: (model to prune, its graph).

        The measured baseline stays the user's model either way.
        """
        train = self.req.train
        if train.distill_alpha > 0 and data.train_ds is not None and train.epochs > 0:
            from secateur.pruner.distill import make_teacher

            self._teacher = make_teacher(original, device)  # one for every candidate
        if not train.sparsity_epochs or data.train_ds is None:
            return original, graph
        from secateur.pruner.sparsity import sparsify  # Network Slimming

        self._enter("ANALYZING", f"sparsity training, {train.sparsity_epochs} epoch(s)")
        return sparsify(original, graph, data.train_ds, train, device, self.should_cancel)

    def _candidate(
        self, original: Any, graph: Any, ratio: float, data: JobData, device: Any, i: int
    ) -> dict[str, Any]:
        """One candidate: ``spec.iterative_steps`` prune + fine-tune rounds, evaluated."""
        from secateur.pruner.finetune import evaluate
        from secateur.pruner.tracing import analyze

        if self.checkpoints is not None and (saved := self.checkpoints.candidate(i)) is not None:
            return saved  # finished by an earlier attempt
        from secateur.pruner.determinism import seed_everything

        # Each candidate starts from its own seed: the same whether or not the
        # candidates before it ran in this process (a resumed attempt).
        seed_everything(pass_seed(self.req.spec.seed, i))
        spec = self.req.specs[i]  # checked once, when the request was made
        steps = spec.round_ratios()
        n = len(self.req.sweep) * len(steps)  # progress counts rounds, candidate after candidate
        model, rounds = original, []
        for j, step_ratio in enumerate(steps):
            at = (i * len(steps) + j, n)  # this round's place in the sweep
            where = f"ratio {ratio}" + (f", round {j + 1}/{len(steps)}" if len(steps) > 1 else "")
            if j:  # each round re-scores the current model
                graph = analyze(model)
            step_spec = spec.round_spec(j)  # this round's channel and head ratios
            plan, model, history = self._round(
                model, graph, step_spec, ratio, where, data, device, at, (i, j)
            )
            accuracy = None
            if data.eval_ds is not None and device.is_chief:
                self._enter("EVALUATING", where, sweep_progress("EVALUATING", *at), ratio=ratio)
                accuracy = evaluate(model, data.eval_ds, device.use_xla(self.req.train.jit_compile))
            rounds.append({"round": j + 1, "ratio": step_ratio, "accuracy": accuracy})
            rounds[-1] |= {"params": plan.params_after, "flops": plan.flops_after}
        out = {
            "ratio": candidate_ratio(plan, ratio),  # a target plan: the share it removed
            "plan": plan.to_dict(),
            "history": history,
            "accuracy": accuracy,
            "_model": model,
        }
        if len(steps) > 1:  # the last round's plan is relative to the model before it
            out["rounds"] = rounds
        if self.checkpoints is not None:
            self.checkpoints.save_candidate(i, out)
        return out

    def _round(
        self,
        model: Any,
        graph: Any,
        spec: Any,
        ratio: float,
        where: str,
        data: JobData,
        device: Any,
        at: tuple[int, int],
        ij: tuple[int, int],
    ) -> tuple[Any, Any, dict[str, list[float]]]:
        """Score, rebuild and fine-tune once: (plan, pruned model, history).

        ``ij``: (candidate, round), which fixes the data passes' order.
        """
        from secateur.pruner.cluster import agree_on_plan, member_dataset, out_of_strategy
        from secateur.pruner.finetune import finetune, recalibrate_batchnorm
        from secateur.pruner.surgery import apply_plan

        i, n = at  # the round's place in the sweep, in rounds
        self._enter("SCORING", where, sweep_progress("SCORING", i, n), ratio=ratio)
        scoring = data.epoch(*ij, -1) if data.epochs is not None else None
        plan = plan_round(model, spec, graph, device, scoring, self.req.train, self.profile_dir)
        agree_on_plan(plan.to_dict(), device)  # multi-host: every member made this plan
        self._enter("REBUILDING", where, sweep_progress("REBUILDING", i, n), ratio=ratio)
        pruned = apply_plan(model, plan, reload_weights=spec.reload_weights, graph=graph)
        history: dict[str, list[float]] = {}
        if data.train_ds is not None and self.req.train.epochs > 0:
            self._enter("FINE_TUNING", where, sweep_progress("FINE_TUNING", i, n), ratio=ratio)

            def progress(p: Any) -> None:
                frac = (p.epoch - 1 + (p.step / p.steps if p.steps else 0)) / p.epochs
                self.on_event(
                    StageEvent(
                        "FINE_TUNING",
                        where,
                        sweep_progress("FINE_TUNING", i, n, frac),
                        asdict(p) | {"ratio": ratio},
                    )
                )

            train_ds = member_dataset(data.train_ds, device)  # multi-host: a share each
            pruned, history = finetune(
                pruned, train_ds, self.req.train, device, progress, self.should_cancel,
                self._teacher, self._by_epoch(data, device, ratio, *ij),
            )  # fmt: skip
            if device.members > 1:  # every member, in step: the chief goes on alone
                pruned = out_of_strategy(pruned)
            if device.is_chief and self.req.train.bn_recalibration_batches:
                # From the whole training set, in an order fixed by the seed.
                data_ds = data.epoch(*ij, -2) if data.epochs is not None else data.train_ds
                recalibrate_batchnorm(pruned, data_ds, self.req.train.bn_recalibration_batches)
        return plan, pruned, history

    def _by_epoch(self, data: JobData, device: Any, ratio: float, i: int, j: int) -> Any:
        """Fine-tuning epoch by epoch, each epoch's order from its seed; from and into
        the job's checkpoints when it has them."""
        from secateur.pruner.epoch_data import ByEpoch

        if data.epochs is None or device.members > 1:
            return None  # a multi-host member trains on its share of the one dataset
        ckpt = self.checkpoints
        return ByEpoch(
            lambda e: data.epoch(i, j, e),
            ckpt.tuning(i, j) if ckpt is not None else None,
            ckpt.on_epoch(ratio, i, j) if ckpt is not None else None,
        )

    def _report(
        self, figures: dict[str, Any], candidates: list[dict[str, Any]], device: Any
    ) -> dict[str, Any]:
        req = self.req
        original = figures["original"].to_dict()
        for c in candidates:
            c["figures"] = figures[f"ratio={c['ratio']}"].to_dict()
            # Accuracy right after fine-tuning equals the measured one; keep both honest.
            c["accuracy_drop"] = (
                None
                if original["accuracy"] is None or c["figures"]["accuracy"] is None
                else original["accuracy"] - c["figures"]["accuracy"]
            )
            drop = drop_interval(original, c["figures"])
            c["accuracy_drop_ci"] = [drop.low, drop.high] if drop else None
        return {
            "report_version": REPORT_VERSION,
            "model_uri": req.model_uri,
            "output_uri": None,
            "spec": req.spec.to_dict(),
            "ratios": list(req.sweep),
            "max_accuracy_drop": req.max_accuracy_drop,
            "train": asdict(req.train),
            "train_data": req.train_data,
            "eval_data": req.eval_data,
            "device": {"kind": device.kind, "name": device.name, "count": device.count},
            "reproducibility": self.reproducibility,
            "original": original,
            "candidates": candidates,
        } | ({"resumed": self.checkpoints.report()} if self.checkpoints is not None else {})

    def _publish(self, work: str, model: Any, report: dict[str, Any], data: Any = None) -> str:
        from secateur.pruner.modelio import ARCHIVE_NAME, SECATEUR_ASSETS, export_serving

        version_dir = os.path.join(work, "version")
        sig = export_serving(model, version_dir)
        assets = os.path.join(version_dir, SECATEUR_ASSETS)
        os.makedirs(assets, exist_ok=True)
        model.save(os.path.join(assets, ARCHIVE_NAME))
        report["exports"] = write_exports(model, self.req.exports, assets, data)  # may refuse
        self._check_disk(work, "the exported version")
        report["signature"] = asdict(sig)
        if len(report["candidates"]) > 1:
            write_curves(report, os.path.join(assets, "curves"))
        with open(os.path.join(assets, "report.json"), "w") as fh:
            json.dump(report, fh, indent=2, default=str)
        uri = publish_version(
            self.storage, version_dir, self.places.output, self.req.version, self.job_id,
            self.fence, self.should_cancel,
            self.checkpoints.remove if self.checkpoints is not None else lambda: None,
        )  # fmt: skip
        shutil.rmtree(version_dir, ignore_errors=True)
        return uri
