"""`secateur prune` as members of a multi-host job: two processes on loopback.

TF_CONFIG names two workers on free local ports (MultiWorkerMirroredStrategy);
both members train, worker 0 (the chief) alone measures and publishes, and its
loss curve matches one process training with the same global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from secateur.cli.outcome import EXIT_OK
from secateur.pruner.cluster import ClusterConfigError, read_member

SECATEUR = [sys.executable, "-m", "secateur.cli"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small conv net with BatchNorm and 256 labelled 8x8 images in one TFRecord."""
    import keras

    from secateur.pruner.data import write_examples

    root = tmp_path_factory.mktemp("multihost")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (256, 8, 8, 3)).astype("float32")
    labels = (images.mean(axis=(1, 2)).argmax(axis=-1)).astype("int64")
    write_examples(str(root / "train.tfrecord"), images, labels)
    write_examples(str(root / "eval.tfrecord"), images[:64], labels[:64])
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = inputs
    for i in range(2):
        x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    keras.Model(inputs, outputs).save(str(root / "tiny.keras"))
    return root


def _prune(root: Path, out: Path, report: Path, tf_config: dict | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env |= {"TF_CPP_MIN_LOG_LEVEL": "3"}
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    args = [
        "prune", root / "tiny.keras", out, "--ratio", "0.5", "--criterion", "l1",
        "--round-to", "1", "--epochs", "3", "--batch-size", "32", "--learning-rate", "0.05",
        "--train-data", root / "train.tfrecord", "--eval-data", root / "eval.tfrecord",
        "--measure-steps", "1", "--report", report,
    ]  # fmt: skip
    return subprocess.Popen(
        [*SECATEUR, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"a member hung (collectives out of step?): {err[-3000:]}") from None
    return proc.returncode, err


@pytest.mark.slow  # three TensorFlow processes, ~2 min on two shared cores
def test_prune_twoWorkersOnLoopback_chiefAlonePublishes_lossMatchesOneProcess(
    tiny: Path, tmp_path: Path
) -> None:
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    out = tmp_path / "served"
    reports = [tmp_path / f"report-{i}.json" for i in range(2)]
    procs = [
        _prune(tiny, out, reports[i], {"cluster": cluster, "task": {"type": "worker", "index": i}})
        for i in range(2)
    ]
    results = [_wait(p) for p in procs]
    for code, err in results:
        assert code == EXIT_OK, err[-3000:]
    assert "wrote nothing" in results[1][1]
    for _, err in results:
        assert "WARNING:tensorflow" not in err, err
    assert sorted(os.listdir(out)) == ["1"]  # one version, by the chief
    assert reports[0].exists() and not reports[1].exists()
    multi = json.loads(reports[0].read_text())
    assert multi["output_uri"] == str(out / "1")
    assert "2 workers" in multi["device"]["name"]

    single_report = tmp_path / "single.json"
    code, err = _wait(_prune(tiny, tmp_path / "single", single_report, None))
    assert code == EXIT_OK, err[-3000:]
    single = json.loads(single_report.read_text())
    assert multi["plan"] == single["plan"]
    got = multi["candidates"][0]["history"]["loss"]
    want = single["candidates"][0]["history"]["loss"]
    assert len(got) == 3
    # The same global batches in the same order; BatchNormalization normalises
    # each replica's half batch on its own (not synchronised), hence a few %.
    np.testing.assert_allclose(got, want, rtol=0.05)


@pytest.mark.parametrize(
    ("env", "chief", "members"),
    [
        ({}, None, None),
        ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker"}}'}, None, None),
        (
            {"TF_CONFIG": '{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", '
             '"index": 1}}'},
            False,
            2,
        ),
        (
            {"TF_CONFIG": '{"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, '
             '"task": {"type": "worker", "index": 0}}'},
            False,
            2,
        ),
        ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "0"}, True, 4),
        ({"TPU_WORKER_HOSTNAMES": "h0", "TPU_WORKER_ID": "0"}, None, None),
    ],
)  # fmt: skip
def test_readMember_chiefIsChiefTaskElseWorkerZero(
    env: dict[str, str], chief: bool | None, members: int | None
) -> None:
    member = read_member(env)
    if chief is None:
        assert member is None
    else:
        assert member is not None and (member.is_chief, member.members) == (chief, members)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"TF_CONFIG": "{not json"}, "TF_CONFIG must be JSON"),
        (
            {"TF_CONFIG": '{"cluster": {"worker": ["a:1"], "ps": ["p:1"]}, '
             '"task": {"type": "ps", "index": 0}}'},
            "chief and worker tasks only",
        ),
        (
            {"TF_CONFIG": '{"cluster": {"worker": ["a:1", "b:1"]}, '
             '"task": {"type": "worker", "index": 2}}'},
            "index must name one",
        ),
        ({"TPU_WORKER_HOSTNAMES": "h0,h1"}, "needs TPU_WORKER_ID in 0..1"),
    ],
)  # fmt: skip
def test_readMember_badEnvironment_namesTheConstraint(env: dict[str, str], match: str) -> None:
    with pytest.raises(ClusterConfigError, match=match) as info:
        read_member(env)
    assert "Received:" in str(info.value)
