"""Image classification data from TFRecord files of tf.train.Example.

Each example holds an image under ``image_key`` (encoded PNG/JPEG bytes, or
raw floats in a float_list) and an int64 class under ``label_key``. Images
reach the model as float32 in [0, 255] by default (``scale`` changes that):
models carry their own preprocessing, as keras.applications do.

The first records are decoded eagerly before any training so that missing
keys, a wrong image size or labels the model cannot output fail at once with
a :class:`DataError` that says what was found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secateur.pruner.errors import DataError


@dataclass(frozen=True)
class DataSpec:
    """How to read the examples.

    Args:
        image_key: feature holding the image.
        label_key: feature holding the int64 label.
        scale: factor applied to decoded pixel values (1.0 keeps [0, 255]).
        resize: resize decoded images to the model's input size instead of
            rejecting a different size.
    """

    image_key: str = "image"
    label_key: str = "label"
    scale: float = 1.0
    resize: bool = False


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


def _inspect(files: Sequence[str], spec: DataSpec) -> str:
    """Check the first record's keys; return ``bytes`` or ``floats``."""
    tf = _tf()
    try:
        first = next(iter(tf.data.TFRecordDataset(list(files[:1]))))
    except StopIteration:
        raise DataError(f"data files must hold at least one record. Received: {files[0]}") from None
    except Exception as exc:
        raise DataError(f"data must be TFRecord files ({exc}). Received: {files[0]}") from exc
    example = tf.train.Example()
    try:
        example.ParseFromString(first.numpy())
    except Exception as exc:
        raise DataError(f"records must be tf.train.Example. Received: {files[0]}") from exc
    feats = example.features.feature
    for key in (spec.image_key, spec.label_key):
        if key not in feats:
            raise DataError(
                f"every example needs features '{spec.image_key}' and '{spec.label_key}'. "
                f"Received: features {sorted(feats)} in {files[0]}"
            )
    if feats[spec.label_key].WhichOneof("kind") != "int64_list":
        raise DataError(f"label '{spec.label_key}' must be int64. Received: {files[0]}")
    kind = feats[spec.image_key].WhichOneof("kind")
    if kind == "bytes_list":
        return "bytes"
    if kind == "float_list":
        return "floats"
    raise DataError(
        f"image '{spec.image_key}' must be encoded bytes or raw floats. Received: {kind}"
    )


def make_dataset(
    files: Sequence[str],
    image_shape: Sequence[int],
    batch_size: int,
    spec: DataSpec = DataSpec(),
    shuffle: bool = False,
    seed: int = 0,
    num_classes: int | None = None,
) -> Any:
    """A batched, prefetched ``tf.data.Dataset`` of (images, labels).

    Args:
        files: local TFRecord paths.
        image_shape: (H, W, C) the model expects.
        batch_size: examples per batch.
        spec: feature keys and scaling.
        shuffle: shuffle files and examples (training).
        seed: shuffle seed.
        num_classes: when given, labels are checked to be in [0, num_classes).

    Raises:
        DataError: no files, missing keys, images that do not fit the model.
    """
    tf = _tf()
    if not files:
        raise DataError("data needs at least one TFRecord file. Received: no files")
    kind = _inspect(files, spec)
    h, w, c = (int(d) for d in image_shape)

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

    _check_first(files, parse, (h, w, c), num_classes)
    ds = tf.data.Dataset.from_tensor_slices(list(files))
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(tf.data.TFRecordDataset, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    if shuffle:
        ds = ds.shuffle(10 * batch_size, seed=seed)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _check_first(
    files: Sequence[str], parse: Any, shape: tuple[int, int, int], num_classes: int | None
) -> None:
    tf = _tf()
    sample = tf.data.TFRecordDataset(list(files[:1])).take(256)
    try:
        for _image, label in sample.map(parse):
            if num_classes is not None and not 0 <= int(label) < num_classes:
                raise DataError(
                    f"labels must be in [0, {num_classes}) for this model's output. "
                    f"Received: label {int(label)} in {files[0]}"
                )
    except tf.errors.InvalidArgumentError as exc:
        raise DataError(
            f"images must decode to the model's input shape {shape} "
            f"(set resize to scale them). Received: {exc.message.splitlines()[0]} in {files[0]}"
        ) from exc


def count_examples(files: Sequence[str]) -> int:
    """Number of records in the files (one pass; small data sets only)."""
    tf = _tf()
    return int(tf.data.TFRecordDataset(list(files)).reduce(0, lambda n, _: n + 1))
