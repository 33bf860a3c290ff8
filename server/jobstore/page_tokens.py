"""ListJobs page tokens: opaque, tamper-evident keyset cursors.

A token names the last job of the page before it by its sort key
``(create_time, id)`` — never an offset, so jobs created between two pages
neither repeat nor push others out — and the ``state`` filter it was issued
for. It is signed with HMAC-SHA256 under a per-server secret kept in the
state directory, so a token survives a restart and a forged or edited one is
refused with INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
from typing import NamedTuple

import grpc

from secateur.server.errors import ServiceError
from secateur.server.jobstore.records import JobState

log = logging.getLogger("secateur.server")

SECRET_FILE = "page-token.key"
SECRET_BYTES = 32
MAC_BYTES = 16
MAX_TOKEN_CHARS = 1024  # as convert bounds the field; tokens issued are ~100 characters
VERSION = 1
# A token carries its filter as the contract's Job.State number (0: all jobs).
_NUMBERS = {state: number for number, state in enumerate(JobState)}
_STATES = {number: state for state, number in _NUMBERS.items()}


class Cursor(NamedTuple):
    """A job's position in ListJobs order (newest first): its create time and id."""

    create_ns: int
    job_id: str


class PageTokens:
    """Issues and checks page tokens (see module docstring)."""

    def __init__(self, state_dir: str, secret: bytes | None = None) -> None:
        # ``secret``: a key shared by replicas (PostgreSQL store) instead of the state dir's.
        self._secret = secret if secret is not None else _load_secret(state_dir)

    def issue(self, state: JobState | None, after: Cursor) -> str:
        number = _NUMBERS[state] if state is not None else 0
        body = json.dumps([VERSION, number, after.create_ns, after.job_id]).encode()
        raw = self._mac(body) + body
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def parse(self, token: str, state: JobState | None) -> Cursor:
        """The cursor in ``token``; INVALID_ARGUMENT unless this server issued it for ``state``."""
        if len(token) > MAX_TOKEN_CHARS:
            raise _invalid(token, f"longer than any token this server issues ({MAX_TOKEN_CHARS})")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            raw = b""
        body = raw[MAC_BYTES:]
        if not body or not hmac.compare_digest(raw[:MAC_BYTES], self._mac(body)):
            raise _invalid(token, "not a token this server issued")
        version, issued_for, create_ns, job_id = json.loads(body)  # signed by us: well formed
        if version != VERSION:
            raise _invalid(token, "issued by another version of this server")
        if issued_for != (_NUMBERS[state] if state is not None else 0):
            shown = _STATES[issued_for].value if issued_for in _STATES and issued_for else "any"
            raise _invalid(
                token,
                f"issued for state={shown}; pass the same state filter as the first page",
            )
        return Cursor(create_ns, job_id)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()[:MAC_BYTES]


def _invalid(token: str, why: str) -> ServiceError:
    shown = token if len(token) <= 100 else f"{token[:100]}... ({len(token)} characters)"
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"page_token must be the next_page_token of a previous ListJobs call "
        f"with the same filter; this one is {why}. Received: {shown!r}",
        [("page_token", why)],
    )


def _load_secret(state_dir: str) -> bytes:
    """The state directory's secret, created on first use (mode 0600)."""
    path = os.path.join(state_dir, SECRET_FILE)
    try:
        with open(path, "rb") as f:
            secret = f.read()
        if len(secret) == SECRET_BYTES:
            return secret
        log.warning("%s is not a %d-byte secret; writing a new one", path, SECRET_BYTES)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot read %s (%s); page tokens will not survive a restart", path, exc)
        return os.urandom(SECRET_BYTES)
    secret = os.urandom(SECRET_BYTES)
    try:
        os.makedirs(state_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write %s (%s); page tokens will not survive a restart", path, exc)
    return secret
