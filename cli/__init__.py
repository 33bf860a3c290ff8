"""The ``secateur`` command line, on top of the client, the server and the pruner.

Subcommands load heavy modules only when they run, so ``secateur --help``
and the remote subcommands never import TensorFlow, the server or the pruner.
This package ships in the ``secateur-client`` distribution (docs/client.md);
the local subcommands are offered only where the full ``secateur`` is installed.

Modules: ``parser`` (argument definitions), ``options`` (flags over a
``--spec`` file), ``local`` (``prune``, ``demo``, ``serve``: in-process),
``demo`` (the embedded default job), ``remote`` (``submit``, ``status``,
``watch``, ``cancel``, ``list``: grpc and protobuf only), ``plan`` (the dry
run, here or on a server), ``render`` (tables, with ``rich``), ``progress``
(a ``rich`` bar, or heartbeat lines when stderr is not a terminal),
``outcome`` (exit codes), ``signals``, ``verbosity`` (library lines only with
``-v``), ``main``.

Local, in-process (import the pruner): ``prune``, ``demo``, ``plan``
(``plan --server`` asks the server instead). Against a server
(grpc and protobuf only; ``--server`` defaults to $SECATEUR_SERVER or
localhost:50051, the bearer token comes from ``--token-file`` or
$SECATEUR_TOKEN): ``submit`` (``--wait`` shows progress, prints the table and
exits by the job's outcome, for CI stages), ``status``, ``watch``, ``cancel``,
``list``.

Exit codes (stable; CI stages gate on them):

====  =========================================================
0     success (for ``status``: also a job still QUEUED or RUNNING)
1     unexpected internal error (traceback printed); a job FAILED
      with INTERNAL or another server-side code; server
      unavailable after retries or no answer within the deadline
2     bad input: invalid spec, model or data; URI not found, not
      allowed or unreachable; output version already exists. For
      jobs and calls: INVALID_ARGUMENT, NOT_FOUND,
      PERMISSION_DENIED, FAILED_PRECONDITION, ALREADY_EXISTS,
      RESOURCE_EXHAUSTED, UNAUTHENTICATED
3     accuracy gate failed: no candidate within --max-accuracy-drop
      (nothing published)
4     cancelled: Ctrl-C / SIGTERM (``prune``, ``demo``: the run
      stops, nothing is published; ``submit --wait``, ``watch``:
      the job goes on unless --cancel-on-interrupt); a job that
      ended CANCELLED
====  =========================================================
"""
