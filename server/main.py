"""``secateur serve``: flags -> ServerOptions -> serve()."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from secateur.server.service import ServerOptions, serve


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    p.add_argument(
        "--metrics-port", type=int, default=9464, help="Prometheus /metrics port; -1 disables"
    )
    p.add_argument(
        "--state-dir", default=os.path.expanduser("~/.secateur"), help="jobs database and work dirs"
    )
    p.add_argument(
        "--allowed-uri-prefix",
        action="append",
        help="only read/write URIs under these prefixes (repeatable; default: the state dir's "
        "'models' folder, so nothing else is reachable until you allow it)",
    )
    p.add_argument("--max-concurrent-jobs", type=int, default=1)
    p.add_argument("--max-queued-jobs", type=int, default=100)
    p.add_argument("--tls-cert", help="PEM server certificate (enables TLS)")
    p.add_argument("--tls-key", help="PEM server private key")
    p.add_argument("--tls-client-ca", help="PEM CA for client certificates (enables mTLS)")
    p.add_argument("--auth-token-file", help="file with accepted bearer tokens, one per line")
    p.add_argument("--log-level", default="INFO")


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("secateur serve: --tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise SystemExit("secateur serve: --tls-client-ca needs --tls-cert/--tls-key")
    tokens: frozenset[str] = frozenset()
    if args.auth_token_file:
        with open(args.auth_token_file) as fh:
            tokens = frozenset(
                line.strip() for line in fh if line.strip() and not line.startswith("#")
            )
        if not tokens:
            raise SystemExit(f"secateur serve: no tokens in {args.auth_token_file}")
    state_dir = os.path.abspath(args.state_dir)
    allowed = tuple(args.allowed_uri_prefix or [os.path.join(state_dir, "models")])
    return ServerOptions(
        state_dir=state_dir,
        port=args.port,
        host=args.host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        allowed_prefixes=allowed,
        max_concurrent_jobs=args.max_concurrent_jobs,
        max_queued_jobs=args.max_queued_jobs,
        tokens=tokens,
        tls_cert=_read(args.tls_cert),
        tls_key=_read(args.tls_key),
        tls_client_ca=_read(args.tls_client_ca),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="secateur serve", description="Run the pruning service.")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return serve(options_from_args(args))


if __name__ == "__main__":
    raise SystemExit(main())
