"""Fixtures for the server tests: a real in-process GCS emulator on loopback."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

# A real PostgreSQL for the store/queue tests: pg_server (session), pg_url (a database per test).
from tests.server.pg_fixture import pg_server_fixture, pg_url_fixture  # noqa: F401


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """Start gcp-storage-emulator (in memory) on a free loopback port; yield its URL.

    The emulator runs in a thread of the test process and is stopped at the end
    of the session. Tests reach it through :func:`gcs_bucket`, which points
    ``STORAGE_EMULATOR_HOST`` at it for that test only.
    """
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="test-bucket")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def gcs_client(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A google.cloud.storage client bound to the emulator (env set for this test)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    return gcs.Client(project="test", credentials=AnonymousCredentials())


@pytest.fixture
def gcs_bucket(gcs_client: Any) -> str:
    """A fresh, empty bucket with a unique name in the emulator."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    gcs_client.create_bucket(name)
    return name
