"""Running jobs: claim from the job store, hold the lease, run, fence, conclude.

- ``loop``: :class:`WorkerLoop`, the claim/lease/fence/conclude loop.
- ``spawn``: :class:`WorkerRunner`, a job's subprocess: start, events, stop.
- ``job_process``: that subprocess's main (``python -m secateur.server.workers.job_process``).
- ``pipes``: reading a subprocess's pipes without trusting what it writes.
- ``lifecycle``: what a job left RUNNING becomes, and its end as logged.
- ``command``: ``secateur worker``'s process.
"""
