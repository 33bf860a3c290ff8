"""Regenerate the Python code of proto/secateur/v1/*.proto with grpcio-tools.

Usage: python tools/gen_proto.py [--out DIR]   (default: in place, beside the .proto)

The generated files are committed so a clean clone installs and imports
without running protoc; tests/test_proto.py regenerates into a temporary
directory and fails if the committed files differ.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_ROOT = os.path.join(ROOT, "proto")
PROTOS = ["secateur/v1/pruning.proto"]


def include_dirs() -> list[str]:
    import google.rpc.status_pb2 as status  # googleapis-common-protos ships the .proto
    import grpc_tools

    return [
        PROTO_ROOT,
        os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"),
        os.path.dirname(os.path.dirname(os.path.dirname(status.__file__))),
    ]


def generate(out: str) -> None:
    from grpc_tools import protoc

    args = ["protoc", *[f"-I{d}" for d in include_dirs()]]
    args += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=PROTO_ROOT)
    generate(parser.parse_args().out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
