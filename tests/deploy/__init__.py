"""Checks of the deployment files: Dockerfile, Kubernetes manifests, compose.

Shared helpers: a small Dockerfile reader (instructions per build stage, with
line continuations and comments handled as Docker does), a .dockerignore
matcher, and the flags of ``secateur serve`` and ``secateur worker`` taken from
their own parsers.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # everything after the keyword, continuations joined
    line: int  # where it starts (1-based)


@dataclass
class Stage:
    name: str
    base: str  # the image or stage it is built FROM
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def read_instructions(text: str) -> list[Instruction]:
    """Instructions in order; comment lines (also inside continuations) dropped."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(b for b in buf if b)
        buf = []
        keyword, _, value = joined.partition(" ")
        out.append(Instruction(keyword.upper(), value.strip(), start))
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def read_stages(path: Path = DOCKERFILE) -> list[Stage]:
    stages: list[Stage] = []
    for ins in read_instructions(path.read_text()):
        if ins.keyword == "FROM":
            words = [w for w in ins.value.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        elif ins.keyword == "ARG" and not stages:
            continue  # global ARGs before the first FROM
        else:
            assert stages, f"line {ins.line}: {ins.keyword} before FROM"
            stages[-1].instructions.append(ins)
    return stages


def stage_chain(stages: list[Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, base first."""
    by_name = {s.name: s for s in stages}
    chain = [by_name[name]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def effective(stages: list[Stage], name: str, keyword: str) -> Instruction | None:
    """The last ``keyword`` instruction in effect for a stage (inherited from its bases)."""
    found = None
    for stage in stage_chain(stages, name):
        for ins in stage.all(keyword):
            found = ins
    return found


def exec_form(value: str) -> list[str]:
    """A JSON (exec form) command; shell form is refused."""
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), value
    return parsed


def split_flags(value: str) -> tuple[dict[str, str], str]:
    """Leading ``--flag=value`` options of an instruction, and the rest."""
    flags: dict[str, str] = {}
    rest = value
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        key, _, val = word[2:].partition("=")
        flags[key] = val
        rest = rest.strip()
    return flags, rest


def copy_sources(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY/ADD instruction."""
    flags, rest = split_flags(ins.value)
    words = exec_form(rest) if rest.startswith("[") else shlex.split(rest)
    return flags, words[:-1], words[-1]


def dockerignore_patterns(path: Path = DOCKERIGNORE) -> list[tuple[bool, str]]:
    """(negated, pattern) pairs in file order."""
    out: list[tuple[bool, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        pat = pat.strip().lstrip("/").rstrip("/")
        pat = re.sub(r"^\./", "", pat)
        out.append((neg, pat))
    return out


def _match(pattern: str, rel: str) -> bool:
    """Docker's rule: a pattern matches a path or any folder above it."""
    pat, parts = pattern.split("/"), rel.split("/")
    return any(_glob(pat, parts[:i]) for i in range(1, len(parts) + 1))


def _glob(pat: list[str], parts: list[str]) -> bool:
    """Segment-wise match: ``*``/``?``/``[..]`` stay within a segment, ``**`` spans any."""
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(_glob(pat[1:], parts[j:]) for j in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and _glob(pat[1:], parts[1:])


def is_ignored(rel: str, patterns: list[tuple[bool, str]] | None = None) -> bool:
    """Whether .dockerignore keeps ``rel`` (relative to the repo root) out of the context."""
    ignored = False
    for neg, pat in patterns if patterns is not None else dockerignore_patterns():
        if _match(pat, rel):
            ignored = not neg
    return ignored


def serve_parser() -> argparse.ArgumentParser:
    """``secateur serve``'s own argument parser."""
    from secateur.server.main import add_serve_arguments

    parser = argparse.ArgumentParser(prog="secateur serve", exit_on_error=False)
    add_serve_arguments(parser)
    return parser


def serve_flags() -> set[str]:
    return {
        opt
        for action in serve_parser()._actions
        for opt in action.option_strings
        if opt.startswith("--")
    }


def flag_names(args: list[str]) -> list[str]:
    """The ``--flags`` in an argument list (``--a=b`` and ``--a b`` forms)."""
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def parse_serve_args(args: list[str]) -> argparse.Namespace:
    """Parse with ``secateur serve``'s parser; unknown flags fail the test."""
    unknown = sorted(set(flag_names(args)) - serve_flags())
    assert not unknown, f"not flags of `secateur serve`: {unknown}"
    return serve_parser().parse_args(args)


def worker_parser() -> argparse.ArgumentParser:
    """``secateur worker``'s own argument parser."""
    from secateur.server.main import add_worker_arguments

    parser = argparse.ArgumentParser(prog="secateur worker", exit_on_error=False)
    add_worker_arguments(parser)
    return parser


def parse_worker_args(args: list[str]) -> argparse.Namespace:
    """Parse with ``secateur worker``'s parser; unknown flags fail the test."""
    parser = worker_parser()
    known = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
    unknown = sorted(set(flag_names(args)) - known)
    assert not unknown, f"not flags of `secateur worker`: {unknown}"
    return parser.parse_args(args)
