"""The gRPC edge: the server, its servicer and interceptors, and the job manager.

- ``service``: ``build_server``/``serve``: servicer, tokens, health, reflection, TLS.
- ``jobs``: :class:`JobManager`, the job operations the servicer calls.
- ``error_interceptor``: typed errors -> gRPC statuses.
- ``metrics_interceptor``: every RPC counted and timed.
"""
