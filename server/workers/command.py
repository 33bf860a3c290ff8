"""``secateur worker``'s process: a :class:`~secateur.server.workers.loop.WorkerLoop`
over a shared store, its metrics, and SIGTERM/SIGINT handling."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

from secateur.server.errors import StartupError
from secateur.server.jobstore import StoreOpenError, open_store
from secateur.server.metrics import ServerMetrics
from secateur.server.workers.loop import (
    COUNTS_EVERY_S,
    LoopConfig,
    WorkerLoop,
    default_worker_id,
    publish_counts,
)
from secateur.server.workers.spawn import WorkerRunner

log = logging.getLogger("secateur.server")


async def run_worker(args: Any) -> int:
    """``secateur worker``'s process: the loop, its metrics, and SIGTERM/SIGINT handling.

    Raises:
        StartupError: the store or the metrics port cannot be opened.
    """
    state_dir = os.path.abspath(os.path.expanduser(args.state_dir))
    allowed = tuple(args.allowed_uri_prefix or [os.path.join(state_dir, "models")])
    try:
        store = open_store(args.store, state_dir, cache=False)  # it serves no reads
    except StoreOpenError as exc:
        raise StartupError(str(exc)) from exc
    metrics = _worker_metrics(args.metrics_port, args.metrics_host)
    command = (sys.executable, "-m", "secateur.server.workers.job_process")
    trusted = tuple(args.trust_package or ())
    runner = WorkerRunner(command, state_dir, allowed, grace_s=10.0, trusted=trusted)
    runner.max_download_bytes = args.max_model_bytes or None  # 0: no cap
    runner.max_job_seconds = args.max_job_seconds or None  # 0: none
    cfg = LoopConfig(
        args.worker_id or default_worker_id(),
        args.max_concurrent_jobs,
        args.lease_seconds,
        args.max_attempts,
        max_preemptions=args.max_preemptions,
    )
    loop = WorkerLoop(cfg, store, runner, metrics)
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, loop.stop)

    async def count_forever() -> None:
        while True:
            await publish_counts(store, metrics)
            await asyncio.sleep(COUNTS_EVERY_S)

    counter = asyncio.create_task(count_forever()) if metrics else None
    print(f"secateur worker {cfg.worker_id} running jobs of the store", flush=True)
    try:
        await loop.run()
    finally:
        if counter is not None:
            counter.cancel()
        await runner.kill_all()
        if metrics:
            metrics.stop()
        store.close()
    log.info("worker %s stopped", cfg.worker_id)
    return 0


def _worker_metrics(port: int, host: str) -> Any:
    """A worker's /metrics (None when ``port`` < 0); StartupError when it cannot listen."""
    if port < 0:
        return None
    metrics = ServerMetrics()
    try:
        metrics.serve(port, host=host)
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose another "
            "--metrics-port (-1 disables it)"
        ) from exc
    return metrics
