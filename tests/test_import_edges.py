"""The packages' dependencies point one way (DESIGN.md, Layout).

client -> v1; server -> pruner, v1; pruner -> tensorflow/keras only; cli -> all
of them, loading the server and the pruner only inside the subcommands that
need them. Every import in every module counts, function-level and
TYPE_CHECKING ones included: read from the source, not from what one run
happens to load.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> its name in the secateur namespace (pyproject's package-dir).
PACKAGES = {"pruner": "pruner", "server": "server", "client": "client", "cli": "cli"}
# The secateur packages each one may import (besides itself).
ALLOWED = {
    "client": {"v1"},
    "server": {"pruner", "v1"},
    "pruner": set(),
    "cli": {"client", "server", "pruner", "v1"},
}
# Third-party top-level modules each one must not import.
FORBIDDEN_THIRD_PARTY = {
    "client": {"tensorflow", "keras", "tf_keras"},
    "pruner": {"grpc", "grpc_status", "grpc_health", "prometheus_client", "google.cloud"},
    "server": set(),
    "cli": set(),
}
# cli modules that may import the server or the pruner at module level: only
# modules that themselves are imported inside a subcommand's function.
CLI_HEAVY_AT_TOP = {"demo"}


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    path: Path
    line: int
    top_level: bool  # executed when the importing module is loaded


def _module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    rel = path.relative_to(ROOT / folder).with_suffix("").parts
    parts = ["secateur", PACKAGES[folder], *rel]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    # Statements under a module-level `if`/`try` run at import time too.
    for n in tree.body:
        if isinstance(n, ast.If | ast.Try):
            top |= {id(c) for c in ast.walk(n)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, path)
            # A name may be a submodule (`from secateur.cli import demo`): keep both.
            names = [base] if base != "secateur" else []
            names += [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found += [Import(n, path, node.lineno, id(node) in top) for n in names]
    return found


def _modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "node_modules" not in p.parts)


def _secateur_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "secateur" and len(parts) > 1 else None


def _where(imp: Import) -> str:
    return f"{imp.path.relative_to(ROOT)}:{imp.line} imports {imp.module}"


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_package_imports_only_its_allowed_secateur_packages(folder: str) -> None:
    own = PACKAGES[folder]
    bad = [
        _where(imp)
        for path in _modules(folder)
        for imp in _imports(path)
        if (pkg := _secateur_package(imp.module)) not in (None, own) and pkg not in ALLOWED[folder]
    ]
    assert not bad, f"{folder}/ may import only {sorted(ALLOWED[folder])}:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_package_avoids_forbidden_third_party_modules(folder: str) -> None:
    forbidden = FORBIDDEN_THIRD_PARTY[folder]
    bad = [
        _where(imp)
        for path in _modules(folder)
        for imp in _imports(path)
        if any(imp.module == f or imp.module.startswith(f + ".") for f in forbidden)
    ]
    assert not bad, f"{folder}/ must not import {sorted(forbidden)}:\n" + "\n".join(bad)


def test_cli_loads_server_and_pruner_only_inside_subcommands() -> None:
    bad = []
    for path in _modules("cli"):
        heavy_allowed = path.stem in CLI_HEAVY_AT_TOP
        for imp in _imports(path):
            pkg = _secateur_package(imp.module)
            if imp.top_level and not heavy_allowed and pkg in ("server", "pruner"):
                bad.append(_where(imp))
            lazy = imp.module.removeprefix("secateur.cli.") in CLI_HEAVY_AT_TOP
            if imp.top_level and imp.module.startswith("secateur.cli.") and lazy:
                bad.append(_where(imp) + " at module level")
    assert not bad, "import these inside the subcommand that needs them:\n" + "\n".join(bad)


def test_the_scan_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The checks above would pass vacuously if the scan missed these forms."""
    imports = {(i.module, i.top_level) for i in _imports(ROOT / "cli" / "local.py")}
    assert ("secateur.server.pipeline.prune_job", False) in imports  # inside cmd_prune
    assert ("secateur.cli.render", True) in imports
    client = {i.module for i in _imports(ROOT / "client" / "client.py")}
    assert "secateur.client.protospec" in client  # `from .protospec import ...`


def _module_graph(folder: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, from the AST.

    Every import counts, function-level and TYPE_CHECKING ones included: an
    import deferred into a function to dodge a cycle is still a cycle.
    ``from secateur.pruner import layout`` depends on ``layout``, not on the
    package's ``__init__`` (which Python loads first for any submodule).
    """
    modules = {_module_name(p): p for p in _modules(folder)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, path)
                subs = (f"{base}.{a.name}" for a in node.names)
                deps.update(sub if sub in modules else base for sub in subs)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_pruner_modules_import_each_other_without_cycles() -> None:
    graph = _module_graph("pruner")
    # The scan sees the real layering: tracing sits above graph and handlers.
    assert {"secateur.pruner.graph", "secateur.pruner.handlers"} <= graph["secateur.pruner.tracing"]
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail("pruner/ modules import each other in a cycle: " + " -> ".join(exc.args[1]))


def test_server_modules_import_each_other_without_cycles() -> None:
    graph = _module_graph("server")
    # The scan sees the real layering: the gRPC edge above the workers, the
    # workers above the job store, the store above the pipeline.
    assert "secateur.server.workers.loop" in graph["secateur.server.api.jobs"]
    assert "secateur.server.jobstore.records" in graph["secateur.server.workers.loop"]
    assert "secateur.server.pipeline.job_request" in graph["secateur.server.jobstore.records"]
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail("server/ modules import each other in a cycle: " + " -> ".join(exc.args[1]))


# Server sub-packages, lowest first: each may import only those before it
# (storage and the shared modules errors/metrics sit below them all).
SERVER_LAYERS = ("pipeline", "jobstore", "workers", "api")


def test_server_subpackages_import_only_the_layers_below() -> None:
    def layer(module: str) -> int:
        parts = module.split(".")
        sub = parts[2] if len(parts) > 2 else ""  # secateur.server.<sub>[.<module>]
        return SERVER_LAYERS.index(sub) if sub in SERVER_LAYERS else -1

    graph = _module_graph("server")
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        for dep in deps
        if mod != "secateur.server.main" and layer(dep) > layer(mod)
    ]
    assert not bad, f"server layers are {SERVER_LAYERS}, lowest first:\n" + "\n".join(bad)


def _loaded_after(code: str) -> list[str]:
    probe = (
        f"{code}\n"
        "import sys\n"
        "heavy = ('tensorflow', 'keras', 'tf_keras', 'secateur.server', 'secateur.pruner')\n"
        "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in heavy[:3]"
        " or m.startswith(heavy[3:])))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.split()


def test_importing_the_client_loads_no_tensorflow_server_or_pruner() -> None:
    loaded = _loaded_after("import secateur.client.client, secateur.client.protospec")
    assert loaded == [], loaded


def test_cli_parser_and_remote_commands_load_no_tensorflow_server_or_pruner() -> None:
    loaded = _loaded_after(
        "import secateur.cli.main, secateur.cli.remote\n"
        "from secateur.cli.parser import build_parser\n"
        "build_parser().format_help()"
    )
    assert loaded == [], loaded


# -- the secateur-client distribution (packaging/client/): no TensorFlow ------

CLIENT_PYPROJECT = ROOT / "packaging" / "client" / "pyproject.toml"
# Where the light command starts: the console script, the remote subcommands, the API.
CLIENT_DIST_ENTRIES = ("secateur.cli.main", "secateur.cli.remote", "secateur.client")
# cli modules of the subcommands that run in this process: the parser offers them
# only where the full distribution is installed, so the walk stops at them.
CLI_IN_PROCESS = {f"secateur.cli.{m}" for m in ("local", "demo", "data", "plan")}
# The client distribution's requirements -> the modules they provide.
CLIENT_REQUIREMENT_MODULES = {
    "grpcio": ("grpc",),
    "protobuf": ("google.protobuf",),
    "googleapis-common-protos": ("google.rpc",),
    "rich": ("rich",),
    "pyyaml": ("yaml",),  # the [yaml] extra: imported only to read a YAML --spec file
}


def _client_requirements() -> set[str]:
    import re
    import tomllib

    project = tomllib.loads(CLIENT_PYPROJECT.read_text())["project"]
    specs = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        specs += extra
    return {re.split(r"[<>=!~\[ ;]", s, maxsplit=1)[0].lower() for s in specs}


def _client_dist_walk() -> tuple[set[str], list[Import]]:
    """The modules the light command can load and every import they make.

    Every import counts, function-level ones included, from the entry points
    on, except into the in-process subcommands' modules.
    """
    files = {_module_name(p): p for folder in ("cli", "client") for p in _modules(folder)}
    seen: set[str] = set()
    found: list[Import] = []
    todo = list(CLIENT_DIST_ENTRIES)
    while todo:
        name = todo.pop()
        if name in seen or name in CLI_IN_PROCESS:
            continue
        seen.add(name)
        for imp in _imports(files[name]):
            found.append(imp)
            todo += [imp.module] if imp.module in files else []
    return seen, found


def test_client_distribution_modules_import_only_its_packages_and_requirements() -> None:
    assert _client_requirements() == set(CLIENT_REQUIREMENT_MODULES), (
        "packaging/client/pyproject.toml's requirements changed: say which modules they provide"
    )
    allowed = tuple(m for mods in CLIENT_REQUIREMENT_MODULES.values() for m in mods)
    seen, found = _client_dist_walk()
    # The walk reaches what the remote subcommands really use.
    assert {"secateur.cli.parser", "secateur.cli.render", "secateur.client.client"} <= seen
    bad = []
    for imp in found:
        pkg = _secateur_package(imp.module)
        if imp.module.split(".")[0] == "secateur":
            if pkg not in (None, "cli", "client", "v1"):
                bad.append(_where(imp))
        elif imp.module.split(".")[0] not in sys.stdlib_module_names and not any(
            imp.module == m or imp.module.startswith(m + ".") for m in allowed
        ):
            bad.append(_where(imp))
    assert not bad, "the client distribution ships none of these:\n" + "\n".join(bad)


def test_in_process_subcommand_modules_are_imported_only_by_the_parser() -> None:
    bad = [
        _where(imp)
        for path in _modules("cli")
        for imp in _imports(path)
        if imp.module in CLI_IN_PROCESS
        and _module_name(path) not in CLI_IN_PROCESS | {"secateur.cli.parser", "secateur.cli.main"}
    ]
    assert not bad, "only the parser and main may import in-process subcommands:\n" + "\n".join(bad)
