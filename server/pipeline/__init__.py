"""One pruning job with no transport: what is asked, how it runs, what it reports.

- ``job_request``: :class:`JobRequest`, the stages and the progress formula.
- ``prune_job``: :class:`PruneJob`, FETCHING .. EXPORTING as one local run.
- ``report``: what a job decides and writes about its candidates.
- ``boundary``: preflight of a job's places; errors that name what the user sent.
- ``convert``: ``secateur.v1`` messages <-> these objects, field paths in errors.
- ``job_data``: a job's training and eval data; passes ordered by seed alone.
- ``checkpoint``: a service job's checkpoints in its work area, resumed after a
  preemption (docs/resume.md).

``secateur prune`` runs :class:`PruneJob` directly; the service runs it in a
job subprocess (:mod:`secateur.server.workers`).
"""
