"""Secateur's service side: the gRPC edge, the job pipeline, the job store, workers, storage.

- ``api``: the gRPC server, its servicer, interceptors and the job manager it calls.
- ``pipeline``: one pruning job with no transport (request, run, report, URI checks,
  message conversion).
- ``jobstore``: durable jobs and their queue (SQLite or PostgreSQL), one ``open_store``.
- ``workers``: the loop that claims, leases, runs and concludes jobs in subprocesses.
- ``storage``: model and data storage (local paths, gs://).
- ``errors`` and ``metrics``: the shared error types and every Prometheus metric.
- ``main``: the ``serve`` and ``worker`` command lines.
"""
