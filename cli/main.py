"""The ``secateur`` entry point (``[project.scripts]``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from secateur.cli.outcome import EXIT_CANCELLED


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        # The server owns its flags; argparse's REMAINDER cannot pass "--help" through.
        from secateur.cli.local import run_serve

        return run_serve(argv[1:])
    if argv[:1] == ["worker"]:
        from secateur.cli.local import run_worker

        return run_worker(argv[1:])
    from secateur.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
