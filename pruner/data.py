"""Image classification data from TFRecord files of tf.train.Example.

Each example holds an image under ``image_key`` (encoded PNG/JPEG bytes, or
raw floats in a float_list) and an int64 class under ``label_key``. Images
reach the model as float32 in [0, 255] by default (``scale`` changes that):
models carry their own preprocessing, as keras.applications do.

Every record of every file is checked before any training (:func:`check_file`,
one tf.data pass per file, so it works the same on a file streamed from a
URI): missing keys, an undecodable image or one of the wrong size, a label the
model cannot output, and a corrupt or truncated record all fail at once with a
:class:`DataError` naming the file and the record (counted from 0). Bad
records are never skipped.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secateur.pruner.errors import CancelledError, DataError

#: Reads one file's raw records where it lies (an injected reader, e.g. the
#: server's streaming ``gs://`` reader); a truncated or corrupt record raises
#: ``ValueError``. Without one, TensorFlow's own TFRecord reader opens the path.
RecordReader = Callable[[str], Iterable[bytes]]


@dataclass(frozen=True)
class DataSpec:
    """How to read the examples.

    Args:
        image_key: feature holding the image.
        label_key: feature holding the int64 label.
        scale: factor applied to decoded pixel values (1.0 keeps [0, 255]).
        resize: resize decoded images to the model's input size instead of
            rejecting a different size.
        cache_mib: cache the decoded examples in memory (read and decoded
            once, not every epoch) when they fit this many MiB; 0: never.
    """

    image_key: str = "image"
    label_key: str = "label"
    scale: float = 1.0
    resize: bool = False
    cache_mib: int = 256

    def __post_init__(self) -> None:
        from secateur.pruner.config import check_int

        check_int("cache_mib", self.cache_mib, 0, MAX_CACHE_MIB)


#: A memory cache bigger than this is a typo (1 TiB).
MAX_CACHE_MIB = 2**20


def decoded_bytes(count: int, shape: Sequence[int]) -> int:
    """Memory ``count`` decoded examples take: float32 pixels and an int64 label each."""
    h, w, c = (int(d) for d in shape)
    return count * (4 * h * w * c + 8)


def fits_cache(count: int, shape: Sequence[int], spec: DataSpec) -> bool:
    """Whether ``count`` decoded examples fit ``spec.cache_mib`` (0: never cache)."""
    return spec.cache_mib > 0 and decoded_bytes(count, shape) <= spec.cache_mib * 2**20


def _tf() -> Any:
    import tensorflow as tf

    return tf


def write_examples(
    path: str,
    images: np.ndarray,
    labels: np.ndarray,
    encoding: str = "png",
    spec: DataSpec = DataSpec(),
) -> None:
    """Write images (N, H, W, C) in [0, 255] and int labels as a TFRecord file.

    Args:
        path: local output file.
        images: uint8-compatible pixel values.
        labels: integer classes.
        encoding: ``png``, ``jpeg`` or ``raw`` (a float_list of pixel values).
        spec: feature keys to use.
    """
    tf = _tf()
    with tf.io.TFRecordWriter(path) as writer:
        for image, label in zip(images, labels, strict=True):
            if encoding == "raw":
                feature = tf.train.Feature(
                    float_list=tf.train.FloatList(value=np.asarray(image, np.float32).ravel())
                )
            else:
                pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
                encoded = (
                    tf.io.encode_png(pixels) if encoding == "png" else tf.io.encode_jpeg(pixels)
                )
                feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded.numpy()]))
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        spec.image_key: feature,
                        spec.label_key: tf.train.Feature(
                            int64_list=tf.train.Int64List(value=[int(label)])
                        ),
                    }
                )
            )
            writer.write(example.SerializeToString())


def _raw_records(path: str, read: RecordReader | None, start: int = 0) -> Iterator[bytes]:
    """One file's raw records from ``start`` on, in Python."""
    if read is not None:
        return itertools.islice(iter(read(path)), start, None)
    return (r.numpy() for r in _tf().data.TFRecordDataset([path]).skip(start))


def _file_records(path: Any, read: RecordReader | None) -> Any:
    """One file's raw records as a dataset (``path`` may be a string tensor)."""
    tf = _tf()
    if read is None:
        return tf.data.TFRecordDataset(path)
    return tf.data.Dataset.from_generator(
        lambda p: read(p.decode() if isinstance(p, bytes) else str(p)),
        args=(path,),
        output_signature=tf.TensorSpec((), tf.string),
    )


def _inspect(path: str, name: str, spec: DataSpec, read: RecordReader | None = None) -> str:
    """Check the first record's keys; return ``bytes`` or ``floats``."""
    tf = _tf()
    try:
        first = next(_raw_records(path, read))
    except StopIteration:
        raise DataError(
            f"data files must hold at least one record. Received: {name}", file=name
        ) from None
    except (tf.errors.OpError, ValueError) as exc:
        raise DataError(
            f"data must be TFRecord files ({tf_reason(exc)}). Received: {name}", file=name
        ) from exc
    problem = _example_problem(first, spec, None)
    if problem:
        raise DataError(f"{problem} in {name}", file=name, record=0)
    kind = tf.train.Example.FromString(first).features.feature[spec.image_key]
    return "bytes" if kind.WhichOneof("kind") == "bytes_list" else "floats"


def _example_problem(raw: bytes, spec: DataSpec, kind: str | None) -> str:
    """What makes one record unusable, as "constraint. Received: what"; "" if nothing."""
    tf = _tf()
    from google.protobuf.message import DecodeError

    try:
        feats = tf.train.Example.FromString(raw).features.feature
    except DecodeError:
        return f"records must be tf.train.Example. Received: {len(raw)} bytes that are not one"
    if spec.image_key not in feats or spec.label_key not in feats:
        return (
            f"every example needs features '{spec.image_key}' and '{spec.label_key}'. "
            f"Received: features {sorted(feats)}"
        )
    label = feats[spec.label_key]
    if label.WhichOneof("kind") != "int64_list" or len(label.int64_list.value) != 1:
        return (
            f"label '{spec.label_key}' must be one int64. "
            f"Received: {label.WhichOneof('kind')} {_values(label)}"
        )
    found = feats[spec.image_key].WhichOneof("kind")
    expected = {"bytes": ("bytes_list",), "floats": ("float_list",), None: _IMAGE_KINDS}[kind]
    if found not in expected:
        return (
            f"image '{spec.image_key}' must be encoded bytes or raw floats, the same in "
            f"every record. Received: {found}"
        )
    return ""


_IMAGE_KINDS = ("bytes_list", "float_list")


def _values(feature: Any) -> str:
    kind = feature.WhichOneof("kind")
    return str(list(getattr(feature, kind).value)[:5]) if kind else "(no value)"


def tf_reason(exc: Any) -> str:
    """TensorFlow's own words for an op error, without its graph-node decoration."""
    lines = [ln for ln in str(getattr(exc, "message", exc)).splitlines() if ln.strip()] or [""]
    if lines[0].startswith("Graph execution error"):
        # Then "Detected at node", a traceback (indented), the reason, "\t[[{{node ...}}]]".
        reasons = [ln for ln in lines[1:] if not ln[0].isspace()]
        lines = [r for r in reasons if not r.startswith("Detected at node")] or lines
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$", "", lines[0])
    return text.strip().rstrip(".")[:200]


def _parser(spec: DataSpec, kind: str, shape: tuple[int, int, int]) -> Any:
    """record -> (image float32 (H, W, C), label int64)."""
    tf = _tf()
    h, w, c = shape

    def parse(record: Any) -> tuple[Any, Any]:
        img_feature = (
            tf.io.FixedLenFeature([], tf.string)
            if kind == "bytes"
            else tf.io.VarLenFeature(tf.float32)
        )
        parsed = tf.io.parse_single_example(
            record,
            {spec.image_key: img_feature, spec.label_key: tf.io.FixedLenFeature([], tf.int64)},
        )
        if kind == "bytes":
            image = tf.io.decode_image(parsed[spec.image_key], channels=c, expand_animations=False)
            image = tf.cast(image, tf.float32)
            if spec.resize:
                image = tf.image.resize(image, (h, w))
        else:
            image = tf.reshape(tf.sparse.to_dense(parsed[spec.image_key]), (h, w, c))
        image = tf.ensure_shape(image * spec.scale, (h, w, c))
        return image, parsed[spec.label_key]

    return parse


def make_dataset(
    files: Sequence[str],
    image_shape: Sequence[int],
    batch_size: int,
    spec: DataSpec = DataSpec(),
    shuffle: bool = False,
    seed: int = 0,
    num_classes: int | None = None,
    names: Sequence[str] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    read_records: RecordReader | None = None,
) -> Any:
    """A batched, prefetched ``tf.data.Dataset`` of (images, labels), every record checked.

    The files are read where they lie, interleaved in parallel; nothing is copied.

    Args:
        files: TFRecord paths TensorFlow can open (or ``read_records`` reads).
        image_shape: (H, W, C) the model expects.
        batch_size: examples per batch.
        spec: feature keys, scaling and the memory cache budget.
        shuffle: shuffle files and examples (training).
        seed: shuffle seed.
        num_classes: when given, labels are checked to be in [0, num_classes).
        names: what to call each file in errors (the user's URI for a local
            copy); defaults to ``files``.
        should_cancel: polled between chunks of the check.
        read_records: reads each file's raw records instead of TensorFlow
            (e.g. streaming ``gs://`` through the server's storage).

    Raises:
        DataError: no files, missing keys, images that do not fit the model,
            labels out of range, corrupt or truncated records (the error names
            the file and the record).
        CancelledError: ``should_cancel`` returned True during the check.
    """
    shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
    parse, count = _checked(files, shape, spec, num_classes, names, should_cancel, read_records)
    return _pipeline(files, parse, count, shape, batch_size, spec, shuffle, seed, read_records)


def _checked(
    files: Sequence[str],
    shape: tuple[int, int, int],
    spec: DataSpec,
    num_classes: int | None,
    names: Sequence[str] | None,
    should_cancel: Callable[[], bool] | None,
    read_records: RecordReader | None,
) -> tuple[Any, int]:
    """Every record of ``files`` checked: (the record parser, the number of records)."""
    if not files:
        raise DataError("data needs at least one TFRecord file. Received: no files")
    names = list(names) if names is not None else list(files)
    if len(names) != len(files):
        raise ValueError(f"names must match files one to one. Received: {len(names)} names")
    kind = _inspect(files[0], names[0], spec, read_records)
    count = sum(
        check_file(path, name, spec, kind, shape, num_classes, should_cancel, read_records)
        for path, name in zip(files, names, strict=True)
    )
    return _parser(spec, kind, shape), count


def _records(
    files: Sequence[str],
    parse: Any,
    count: int,
    read_records: RecordReader | None,
    seed: int | None,
    reshuffle: bool = True,
) -> Any:
    """The parsed records of ``files`` (files shuffled by ``seed``; None: in order)."""
    tf = _tf()
    ds = tf.data.Dataset.from_tensor_slices(list(files))
    if seed is not None:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=reshuffle)
    ds = ds.interleave(
        lambda path: _file_records(path, read_records), num_parallel_calls=tf.data.AUTOTUNE
    )
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    # The check counted the records: a known length lets Keras end each epoch
    # on the count instead of running into the end ("input ran out of data").
    return ds.apply(tf.data.experimental.assert_cardinality(count))


def _pipeline(
    files: Sequence[str],
    parse: Any,
    count: int,
    shape: tuple[int, int, int],
    batch_size: int,
    spec: DataSpec,
    shuffle: bool,
    seed: int,
    read_records: RecordReader | None,
) -> Any:
    """The tf.data chain over files already checked (``count`` records in all)."""
    tf = _tf()
    ds = _records(files, parse, count, read_records, seed if shuffle else None)
    if fits_cache(count, shape, spec):  # before the example shuffle: each epoch reshuffles
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(10 * batch_size, seed=seed)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


_CHUNK = 512
# Bytes a TFRecord adds around each record: length (8), its CRC (4), data CRC (4).
_FRAMING = 16


def check_file(
    path: str,
    name: str,
    spec: DataSpec,
    kind: str,
    shape: tuple[int, int, int],
    num_classes: int | None,
    should_cancel: Callable[[], bool] | None = None,
    read_records: RecordReader | None = None,
) -> int:
    """Decode every record of one file as training will; return how many there are.

    One tf.data pass, in chunks, reading the file where it lies (through
    ``read_records`` when given). A chunk that fails is read again record by
    record to name the first bad one. TensorFlow's reader stops quietly at a
    record cut off by the end of the file, so the bytes the records account
    for are compared with the file's size as well (an injected reader checks
    the framing itself).

    Raises:
        DataError: naming ``name`` and the record (counted from 0).
        CancelledError: ``should_cancel`` returned True.
    """
    tf = _tf()
    parse = _parser(spec, kind, shape)

    def summary(record: Any) -> tuple[Any, Any, Any]:
        image, label = parse(record)
        # The image's max keeps its decoding and shape check in the graph.
        return label, tf.reduce_max(image), tf.strings.length(record)

    chunks = iter(
        _file_records(path, read_records)
        .map(summary, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(_CHUNK)
        .prefetch(1)
    )
    done = payload = 0
    while True:
        if should_cancel is not None and should_cancel():
            raise CancelledError(f"the data check was cancelled at record {done} of {name}")
        try:
            labels, _, lengths = next(chunks)
        except StopIteration:
            break
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError, UnicodeDecodeError) as exc:
            # UnicodeDecodeError: TensorFlow quotes a non-Example record's bytes in its message.
            # An injected reader's ValueError arrives as InvalidArgumentError; _locate
            # reads again in Python, where a storage error keeps its own type.
            located = _locate(path, name, spec, kind, shape, num_classes, done, exc, read_records)
            raise located from exc
        labels = labels.numpy()
        _check_labels(labels, num_classes, done, name)
        done += len(labels)
        payload += int(np.sum(lengths.numpy())) + _FRAMING * len(labels)
    if read_records is None:
        _check_size(path, payload, done, name)
    return done


def _check_labels(labels: Any, num_classes: int | None, done: int, name: str) -> None:
    """A chunk's labels (the chunk starts at record ``done``) are the model's classes."""
    if num_classes is None:
        return
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        record = done + int(bad[0])
        raise DataError(
            f"labels must be in [0, {num_classes}) for this model's output. "
            f"Received: label {int(labels[bad[0]])} at record {record} of {name}",
            file=name,
            record=record,
        )


def _check_size(path: str, payload: int, done: int, name: str) -> None:
    """The records account for every byte of the file (TensorFlow stops quietly at a cut)."""
    size = int(_tf().io.gfile.stat(path).length)
    if payload != size:
        raise DataError(
            "a TFRecord file must end where its last record ends; corrupt or truncated "
            f"records are not skipped. Received: {size - payload} trailing bytes after "
            f"{done} readable records (the file is cut or corrupt at record {done}) in {name}",
            file=name,
            record=done,
        )


def _locate(
    path: str,
    name: str,
    spec: DataSpec,
    kind: str,
    shape: tuple[int, int, int],
    num_classes: int | None,
    start: int,
    exc: Exception,
    read: RecordReader | None = None,
) -> DataError:
    """The DataError for the first bad record at or after ``start``."""
    tf = _tf()
    parse = _parser(spec, kind, shape)
    record = start
    records = _raw_records(path, read, start)
    while True:
        try:
            raw = next(records)
        except StopIteration:
            break
        except (tf.errors.DataLossError, ValueError) as loss:  # a reader's framing error
            exc = loss
            break
        problem = _example_problem(raw, spec, kind)
        if not problem:
            problem = _decode_problem(parse, raw, shape, num_classes)
        if problem:
            message = f"{problem} at record {record} of {name}"
            return DataError(message, file=name, record=record)
        record += 1
    return DataError(
        "every record must be readable; corrupt or truncated records are not skipped. "
        f"Received: {tf_reason(exc)} at record {record} of {name}",
        file=name,
        record=record,
    )


def _decode_problem(
    parse: Any, raw: Any, shape: tuple[int, int, int], num_classes: int | None
) -> str:
    tf = _tf()
    try:
        _image, label = parse(raw)
    except tf.errors.InvalidArgumentError as bad:
        return (
            f"images must decode to the model's input shape {shape} "
            f"(set resize to scale them). Received: {tf_reason(bad)}"
        )
    if num_classes is not None and not 0 <= int(label) < num_classes:
        return (
            f"labels must be in [0, {num_classes}) for this model's output. "
            f"Received: label {int(label)}"
        )
    return ""


def count_examples(files: Sequence[str]) -> int:
    """Number of records in the files (one pass; small data sets only)."""
    tf = _tf()
    return int(tf.data.TFRecordDataset(list(files)).reduce(0, lambda n, _: n + 1))
