"""Multi-host training: ``secateur prune`` as one member of a cluster.

Two kinds of cluster are recognised from the environment the scheduler sets:

- ``TF_CONFIG`` naming two or more members (multi-node GPUs, or CPUs):
  ``tf.distribute.MultiWorkerMirroredStrategy``.
- a multi-host TPU slice, ``TPU_WORKER_HOSTNAMES`` naming two or more hosts
  with ``TPU_WORKER_ID`` this host's index (what GKE sets for a TPU slice's
  pods): ``TPUClusterResolver`` and ``TPUStrategy``.

Every member runs the same job: it loads the same model, makes the same plan
(checked across members: :func:`agree_on_plan`) and trains; the chief (task
type ``chief``, else worker 0; TPU worker 0) alone evaluates, measures and
publishes, the others write nothing. Collective ops are only ever issued at
the same points on every member (the plan check, fine-tuning, and taking the
trained model out of the strategy), so a member that skips a stage never
leaves another waiting on it.

The strategy must exist before TensorFlow runs its first op in the process
(collective ops are configured at context start-up), so ``secateur prune``
calls :func:`start_cluster` before anything else touches TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from secateur.pruner.errors import PlanMismatchError, SecateurError


class ClusterConfigError(SecateurError, ValueError):
    """TF_CONFIG or the TPU slice's environment does not describe a usable member."""


@dataclass(frozen=True)
class Member:
    """This process's place in a cluster."""

    kind: str  # "MULTI_WORKER" (TF_CONFIG) or "TPU_SLICE"
    task_type: str
    task_index: int
    members: int
    is_chief: bool
    strategy: Any = field(default=None, repr=False, compare=False)


def read_member(environ: Mapping[str, str] | None = None) -> Member | None:
    """This process's place from ``TF_CONFIG`` / the TPU env; None when alone.

    Raises:
        ClusterConfigError: malformed TF_CONFIG, an unsupported task type, or
            a TPU slice without a valid TPU_WORKER_ID.
    """
    env = os.environ if environ is None else environ
    if env.get("TF_CONFIG", "").strip():
        return _from_tf_config(env["TF_CONFIG"])
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) < 2:
        return None
    raw = env.get("TPU_WORKER_ID", "")
    if not raw.isdigit() or int(raw) >= len(hosts):
        raise ClusterConfigError(
            f"a TPU slice of {len(hosts)} hosts needs TPU_WORKER_ID in 0..{len(hosts) - 1}. "
            f"Received: TPU_WORKER_ID={raw!r}"
        )
    index = int(raw)
    return Member("TPU_SLICE", "worker", index, len(hosts), index == 0)


def _from_tf_config(text: str) -> Member | None:
    try:
        config = json.loads(text)
        cluster = {str(k): list(v) for k, v in config.get("cluster", {}).items()}
        task_type = str(config["task"]["type"])
        index = int(config["task"].get("index", 0))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ClusterConfigError(
            'TF_CONFIG must be JSON {"cluster": {"worker": [...]}, "task": {"type": ..., '
            f'"index": ...}}}}. Received: {text[:200]!r} ({exc})'
        ) from exc
    extra = sorted(set(cluster) - {"chief", "worker"})
    if extra or task_type not in ("chief", "worker"):
        raise ClusterConfigError(
            "multi-host fine-tuning runs chief and worker tasks only "
            f"(MultiWorkerMirroredStrategy). Received: task {task_type!r}, cluster roles {extra}"
        )
    members = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    if not 0 <= index < len(cluster.get(task_type, [])):
        raise ClusterConfigError(
            f"TF_CONFIG's task index must name one of its {task_type} addresses. "
            f"Received: index {index} of {len(cluster.get(task_type, []))}"
        )
    if members < 2:
        return None
    chief = task_type == "chief" or ("chief" not in cluster and index == 0)
    return Member("MULTI_WORKER", task_type, index, members, chief)


_STARTED: list[Member | None] = []


def start_cluster(environ: Mapping[str, str] | None = None) -> Member | None:
    """Join the cluster the environment describes (once per process).

    Call before any other TensorFlow op. Returns None when the process runs
    alone; later calls return the first call's answer.
    """
    if _STARTED:
        return _STARTED[0]
    member = read_member(environ)
    if member is not None:
        member = Member(
            member.kind,
            member.task_type,
            member.task_index,
            member.members,
            member.is_chief,
            _make_strategy(member.kind),
        )
    _STARTED.append(member)
    return member


def current_member() -> Member | None:
    """The member :func:`start_cluster` joined as, or None (alone, or never started)."""
    return _STARTED[0] if _STARTED else None


def _make_strategy(kind: str) -> Any:
    import tensorflow as tf

    if kind == "TPU_SLICE":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    strategy.reduce = _keras_safe_reduce(strategy, strategy.reduce)
    return strategy


def _keras_safe_reduce(strategy: Any, reduce: Any) -> Any:
    """``strategy.reduce`` as Keras 3's ``fit`` calls it under MultiWorkerMirrored.

    Keras reduces its first (images, labels) batch in one call to learn the
    input shapes, but the strategy's reduce takes one value, not a tuple
    ("Attempt to convert a value (PerReplica...) to a Tensor"); and it
    averages every step's scalar logs with ``axis=0``, which a scalar has not
    ("Invalid reduction dimension 0"). Structures are reduced value by value,
    and a scalar's mean is taken across replicas (``axis=None``).
    """
    import tensorflow as tf

    def one(reduce_op: Any, value: Any, axis: Any) -> Any:
        if axis is not None:
            local = strategy.experimental_local_results(value)[0]
            if getattr(local, "shape", None) is not None and local.shape.rank == 0:
                axis = None
        return reduce(reduce_op, value, axis=axis)

    def nested(reduce_op: Any, value: Any, axis: Any = None) -> Any:
        if isinstance(value, (tuple, list, dict)):
            return tf.nest.map_structure(lambda v: one(reduce_op, v, axis), value)
        return one(reduce_op, value, axis)

    return nested


def agree_on_plan(plan: dict[str, Any], device: Any) -> None:
    """Check that every member made the same plan (a collective: all members call it).

    Each member contributes its plan digest's bytes b and b**2; all members
    agree exactly when (sum b)**2 == n * sum(b**2) for every byte (equality in
    Cauchy-Schwarz). The sums stay exact in float32 for up to 256 replicas.

    Raises:
        PlanMismatchError: the members' plans differ (scoring was not
            deterministic, or the members were given different models/specs).
    """
    import numpy as np
    import tensorflow as tf

    if getattr(device, "members", 1) < 2 or not isinstance(
        device.strategy, tf.distribute.MultiWorkerMirroredStrategy
    ):
        return  # alone; on a TPU slice the plan is not cross-checked
    strategy = device.strategy
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).digest()
    b = np.frombuffer(digest[:16], dtype=np.uint8).astype("float32")
    mine = tf.constant(np.concatenate([b, b * b]))

    @tf.function  # one all-reduce, not an eager collective (TensorFlow warns about those)
    def total_over_replicas() -> Any:
        return strategy.reduce(
            tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(mine)), axis=None
        )

    total = total_over_replicas()
    n = float(strategy.num_replicas_in_sync)
    sums, squares = np.split(np.asarray(total, dtype="float64"), 2)
    if not np.array_equal(sums * sums, n * squares):
        raise PlanMismatchError(
            "every member of a multi-host job must make the same plan from the same model "
            f"and spec. Received: plans that differ between the {int(n)} replicas"
        )


def out_of_strategy(model: Any) -> Any:
    """A copy of a model trained under a cluster strategy that lives outside it.

    Every member calls this at the same point (reading distributed variables
    may need collectives); the copy evaluates, measures and saves with no
    collective ops, so the chief can do those alone.
    """
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    return clone


def member_dataset(ds: Any, device: Any) -> Any:
    """The training set as every member reads it: batches of the GLOBAL batch size,
    sharded by element (``AutoShardPolicy.DATA``).

    Each member reads the same stream in the same (seeded) order and keeps its
    share of every global batch, so the members together train on exactly the
    batches one process would: the loss curve matches a single-host run. File
    sharding would read less per member but change which examples share a
    step, and it fails outright with fewer files than members.
    """
    import tensorflow as tf

    if getattr(device, "members", 1) < 2:
        return ds
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)
