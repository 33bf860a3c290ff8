"""The ``secateur`` entry point (``[project.scripts]`` of the secateur-client distribution)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from secateur.cli.outcome import EXIT_BAD_INPUT, EXIT_CANCELLED
from secateur.cli.parser import IN_PROCESS_COMMANDS, build_parser, full_distribution
from secateur.cli.verbosity import logging_restored


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in IN_PROCESS_COMMANDS and not full_distribution():
        print(
            f"secateur: error: `{argv[0]}` runs in this process and needs the full "
            "distribution (pip install secateur); secateur-client has submit, status, watch, "
            "cancel and list",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if argv[:1] == ["serve"]:
        # The server owns its flags; argparse's REMAINDER cannot pass "--help" through.
        from secateur.cli.local import run_serve

        return run_serve(argv[1:])
    if argv[:1] == ["worker"]:
        from secateur.cli.local import run_worker

        return run_worker(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        with logging_restored():
            return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
