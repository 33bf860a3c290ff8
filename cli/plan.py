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
from secateur.cli.render import format_plan


def _pruning_spec(args: argparse.Namespace) -> Any:
    from secateur.client.protospec import job_spec_from_options

    return job_spec_from_options(args.model_uri, "", merged_options(args)).pruning


def local_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The plan computed here, as ``PruningPlan.to_dict()``.

    Raises:
        SecateurError, StorageError, ValueError, OSError: bad spec, URI or model.
    """
    import tempfile

    from secateur.cli.local import _quiet_tensorflow, trust_packages

    _quiet_tensorflow()
    trusted = trust_packages(args.trust_package)
    from secateur.pruner.modelio import load_model
    from secateur.pruner.plan import make_plan
    from secateur.server.pipeline.boundary import user_paths
    from secateur.server.pipeline.convert import prune_spec
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
        return make_plan(load_model(path, trusted), spec).to_dict()


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
