"""``secateur plan MODEL_URI [spec flags]``: the dry-run plan, nothing pruned or written.

In this process by default (loads the pruner, inside the function only); with
``--server``, the service's PlanPruning RPC through ``PruningClient.plan``.
Both build the request's ``PruningSpec`` from the same flags as ``submit``
and print the same table (or, with ``--json``, the plan as data).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from secateur.cli.options import merged_options
from secateur.cli.outcome import EXIT_BAD_INPUT, EXIT_OK
from secateur.cli.render import human, make_table, render_text


def _origins(origins: list[str], width: int = 40) -> str:
    text = ", ".join(origins)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_plan(plan: dict[str, Any]) -> str:
    """``secateur plan``: the groups with kept/total channels, totals, why groups are frozen."""
    groups = plan["groups"]
    rows = [
        [
            str(g["id"]),
            _origins(g["origins"]),
            f"{g['size_after']}/{g['size_before']}",
            "frozen" if g.get("frozen") else g.get("criterion") or "-",
        ]
        for g in groups
    ]
    table = make_table(["group", "layers", "kept/total", "criterion"], rows, right=2)
    prunable = [g for g in groups if not g.get("frozen") and g.get("kind") != "heads"]
    kept = sum(g["size_after"] for g in prunable)
    total = sum(g["size_before"] for g in prunable)
    heads = [g for g in groups if not g.get("frozen") and g.get("kind") == "heads"]
    spec = plan.get("spec") or {}
    out = [
        f"plan for {plan.get('model_name')}: ratio {spec.get('ratio')}, "
        f"criterion {spec.get('criterion')}, scope {spec.get('scope')}, "
        f"round to {plan.get('round_to')}",
        render_text(table),
        f"channels kept: {kept:,} of {total:,} prunable in {len(prunable)} of {len(groups)} groups",
    ]
    if heads:  # attention heads (PruneSpec.head_ratio), counted apart from channels
        left, total_heads = (sum(g[k] for g in heads) for k in ("size_after", "size_before"))
        out.append(f"attention heads kept: {left:,} of {total_heads:,} in {len(heads)} layers")
    for name, key in (("params", "params"), ("FLOPs/example", "flops")):
        before, after = plan[f"{key}_before"], plan[f"{key}_after"]
        ratio = f" ({after / before:.2f}x)" if before else ""
        out.append(f"{name}: {human(before, 'count')} -> {human(after, 'count')}{ratio}")
    out.extend(_frozen_report(plan))
    for layer in plan.get("unsupported_layers") or []:
        out.append(
            f"unsupported: {layer.get('layer', layer)}: {layer.get('reason', '')}".rstrip(": ")
        )
    return "\n".join(out)


def _frozen_report(plan: dict[str, Any], top: int = 5) -> list[str]:
    """The plan's prunable share and its top frozen reasons (computed for older plans)."""
    share, reasons = plan.get("prunable_share"), plan.get("frozen_reasons")
    if share is None or reasons is None:
        from types import SimpleNamespace

        from secateur.pruner import plan_report

        rows = [SimpleNamespace(**g) for g in plan["groups"]]
        share = plan_report.prunable_share(rows)
        reasons = [vars(r) for r in plan_report.frozen_reasons(rows)]
    out = [f"prunable: {share:.0%} of channels"]
    for r in reasons[:top]:
        out.append(
            f"frozen: {r['reason']} ({_count(r['channels'], 'channel')}, "
            f"{_count(r['groups'], 'group')})"
        )
    if len(reasons) > top:
        out.append(f"frozen: {len(reasons) - top} more reasons (--json lists them)")
    return out


def _count(n: int, unit: str) -> str:
    return f"{n:,} {unit}{'' if n == 1 else 's'}"


def _pruning_spec(args: argparse.Namespace) -> Any:
    from secateur.client.protospec import job_spec_from_options

    return job_spec_from_options(args.model_uri, "", merged_options(args)).pruning


def local_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The plan computed here, as ``PruningPlan.to_dict()``.

    Raises:
        SecateurError, StorageError, ValueError, OSError: bad spec, URI or model.
    """
    import tempfile

    from secateur.cli.local import start_tensorflow, trust_packages

    start_tensorflow(args.verbose)
    trusted = trust_packages(args.trust_package)
    from secateur.pruner.api import make_plan  # by ratio, or to targets
    from secateur.pruner.modelio import load_model
    from secateur.server.pipeline.boundary import user_paths
    from secateur.server.pipeline.convert import prune_spec
    from secateur.server.pipeline.target_job import default_profile_dir
    from secateur.server.storage import Storage

    spec = prune_spec(_pruning_spec(args))
    storage = Storage(args.allowed_uri_prefix or None)
    names: dict[str, str] = {}
    with (
        tempfile.TemporaryDirectory(prefix="secateur-plan-") as work,
        user_paths(names, fallback=args.model_uri),  # errors name the URI, not the copy
    ):
        path = storage.download(args.model_uri, work)
        names[path] = args.model_uri
        model = load_model(path, trusted)
        return make_plan(model, spec, state_dir=default_profile_dir()).to_dict()


def _plain(value: Any) -> Any:
    """A Struct's numbers back to ints where integral (Struct holds only doubles)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _print(plan: dict[str, Any], as_json: bool) -> int:
    print(json.dumps(plan, indent=2) if as_json else format_plan(plan))
    return EXIT_OK


def _remote_plan(client: Any, args: argparse.Namespace) -> int:
    """The plan from the server's PlanPruning."""
    from google.protobuf import json_format

    response = client.plan(args.model_uri, _pruning_spec(args))
    return _print(_plain(json_format.MessageToDict(response.plan)), args.json)


def cmd_plan(args: argparse.Namespace) -> int:
    if args.server:
        from secateur.cli.remote import _remote

        if args.trust_package:
            print(
                "secateur: error: --trust-package applies to planning here; a server trusts "
                "the packages its operator started it with (secateur serve --trust-package)",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT

        return int(_remote(_remote_plan)(args))
    from secateur.pruner.errors import SecateurError
    from secateur.server.errors import ServiceError
    from secateur.server.storage import StorageError

    try:
        plan = local_plan(args)
    except (SecateurError, StorageError, ValueError, OSError) as exc:
        print(f"secateur: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ServiceError as exc:  # the contract's conversion refused a value
        print(f"secateur: error: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _print(plan, args.json)
