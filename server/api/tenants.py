"""Tenants: who a bearer token belongs to, and what that tenant may reach.

``--auth-token-file`` takes one of two formats:

- **one token per line** (lines starting with ``#`` ignored): every token
  belongs to the one unnamed tenant ``""``, which sees every job; this is
  the single-token setup of earlier versions, unchanged;
- **tenants**, YAML (or JSON, which is YAML), a mapping under ``tenants``::

      tenants:
        team-a:
          tokens: [token-a1, token-a2]
          allowed_uri_prefixes: [gs://team-a-models/, gs://team-a-out/]
        team-b:
          tokens: [token-b]          # no prefixes: the server's --allowed-uri-prefix

  A job belongs to the tenant whose token created it; any other tenant's
  GetJob, ListJobs, WatchJob and CancelJob see no such job (NOT_FOUND). A
  tenant's ``allowed_uri_prefixes`` narrow the server's ``--allowed-uri-prefix``
  list for its jobs and plans (a URI must be under both).

The file is read again on SIGHUP (``Tenants.reload``); a file that no longer
parses is logged and the tokens in force stay. Tokens are kept as SHA-256
digests, looked up in a dict: no token is compared byte by byte. Tenant names
never reach metrics (labels carry only methods and codes).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from secateur.server.errors import StartupError

log = logging.getLogger("secateur.server")
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Tenant:
    """A tenant: its name ("" for the single-tenant token file) and URI prefixes."""

    name: str
    allowed_prefixes: tuple[str, ...] = ()


#: The caller on a server without tokens (loopback or mTLS only): one tenant, every job.
NO_TENANT = Tenant("")


def _digest(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def parse(text: str, source: str) -> dict[bytes, Tenant]:
    """Token digest -> tenant, from a token file's text.

    Raises:
        StartupError: no tokens, a malformed tenants mapping, a token of two tenants.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, Mapping) and "tenants" in data:
        return _tenants(data["tenants"], source)
    tokens = {line.strip() for line in text.splitlines()}
    tokens = {t for t in tokens if t and not t.startswith("#")}
    if not tokens:
        raise StartupError(
            f"no tokens in {source}: put one bearer token per line (lines starting with # "
            "are ignored), or a `tenants:` mapping (docs/tenants.md)"
        )
    return {_digest(t): NO_TENANT for t in tokens}


def _tenants(entries: Any, source: str) -> dict[bytes, Tenant]:
    if not isinstance(entries, Mapping) or not entries:
        raise StartupError(f"{source}: `tenants` must map tenant names to their tokens")
    found: dict[bytes, Tenant] = {}
    for name, entry in entries.items():
        where = f"{source}: tenant {name!r}"
        if not isinstance(name, str) or not TENANT_NAME.match(name):
            raise StartupError(f"{where}: a name is 1-63 letters, digits, '_', '.', '-'")
        if not isinstance(entry, Mapping) or set(entry) - {"tokens", "allowed_uri_prefixes"}:
            raise StartupError(f"{where}: give `tokens` and optionally `allowed_uri_prefixes`")
        tokens = _strings(entry.get("tokens"), f"{where}: tokens")
        prefixes = _strings(entry.get("allowed_uri_prefixes") or [], f"{where}: prefixes")
        if not tokens:
            raise StartupError(f"{where} has no tokens")
        tenant = Tenant(name, tuple(prefixes))
        for token in tokens:
            key = _digest(token)
            if key in found:
                raise StartupError(f"{where}: a token is listed twice (tokens must be unique)")
            found[key] = tenant
    return found


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise StartupError(f"{what} must be a list of strings")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise StartupError(f"{what} must be non-empty strings")
    return [v.strip() for v in value]


class Tenants:
    """The tokens in force; ``reload()`` (SIGHUP) swaps them atomically."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._by_digest = parse(_read(path), path)

    @classmethod
    def from_tokens(cls, tokens: frozenset[str] | set[str]) -> Tenants:
        """One unnamed tenant holding ``tokens`` (ServerOptions.tokens, no file)."""
        made = cls.__new__(cls)
        made.path = ""
        made._lock = threading.Lock()
        made._by_digest = {_digest(t): NO_TENANT for t in tokens}
        return made

    def reload(self) -> bool:
        """Read the file again; False (logged, old tokens kept) when it won't do."""
        if not self.path:
            return False
        try:
            table = parse(_read(self.path), self.path)
        except StartupError as exc:
            log.error("SIGHUP: keeping the tokens in force: %s", exc)
            return False
        with self._lock:
            self._by_digest = table
        names = sorted({t.name for t in table.values()})
        log.info("SIGHUP: %d tokens of %d tenants in force", len(table), len(names))
        return True

    def lookup(self, token: bytes) -> Tenant | None:
        """The tenant of a presented token; None for an unknown one."""
        with self._lock:
            return self._by_digest.get(_digest(token)) if token else None

    def of(self, metadata: Any) -> Tenant:
        """The tenant of a call (its metadata already passed the TokenInterceptor)."""
        tenant = self.lookup(bearer(metadata))
        return tenant if tenant is not None else NO_TENANT


def bearer(metadata: Any) -> bytes:
    """The token of ``authorization: Bearer <token>`` in a call's metadata, or b""."""
    auth = str(dict(metadata or ()).get("authorization", ""))
    return auth[7:].encode() if auth.lower().startswith("bearer ") else b""


def _read(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8")
    except OSError as exc:
        raise StartupError(
            f"cannot read --auth-token-file {path}: {exc.strerror or exc}; check the path "
            "and its permissions"
        ) from exc
    except UnicodeDecodeError as exc:
        raise StartupError(f"--auth-token-file {path} is not UTF-8 text") from exc
