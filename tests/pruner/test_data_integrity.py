"""Bad data anywhere in a file fails before training, naming the file and the record."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from secateur.pruner.data import DataSpec, make_dataset, write_examples
from secateur.pruner.errors import DataError

N = 300
BAD = 281  # beyond any "first records" sample


def _example(image: np.ndarray | bytes | None, label: int | float | None) -> bytes:
    feats = {}
    if isinstance(image, bytes):
        feats["image"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))
    elif image is not None:
        encoded = tf.io.encode_png(image.astype(np.uint8)).numpy()
        feats["image"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))
    if isinstance(label, float):
        feats["label"] = tf.train.Feature(float_list=tf.train.FloatList(value=[label]))
    elif label is not None:
        feats["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _write(path: str, bad: bytes | None = None, at: int = BAD) -> str:
    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(N):
            record = _example(rng.integers(0, 256, (8, 8, 3)), i % 3)
            writer.write(bad if bad is not None and i == at else record)
    return path


BAD_RECORDS = {
    "label out of range": (_example(np.zeros((8, 8, 3)), 7), r"labels must be in \[0, 3\)"),
    "negative label": (_example(np.zeros((8, 8, 3)), -1), r"Received: label -1"),
    "wrong image shape": (_example(np.zeros((9, 8, 3)), 1), r"input shape \(8, 8, 3\)"),
    "undecodable image": (_example(b"not a png", 1), r"input shape \(8, 8, 3\)"),
    "missing label": (_example(np.zeros((8, 8, 3)), None), r"features \['image'\]"),
    "float label": (_example(np.zeros((8, 8, 3)), 1.0), "must be one int64"),
    "not an Example": (b"\xff\xfe garbage", "tf.train.Example"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_makeDataset_badRecordAnywhere_dataErrorNamesFileAndRecord(tmp_path, case) -> None:
    record, match = BAD_RECORDS[case]
    good = write_examples_of(tmp_path / "a.tfrecord")
    path = _write(str(tmp_path / "b.tfrecord"), record)
    with pytest.raises(DataError, match=match) as info:
        make_dataset(
            [good, path], (8, 8, 3), 16, num_classes=3, names=["gs://b/a.tfrecord", "gs://b/b"]
        )
    assert info.value.file == "gs://b/b" and info.value.record == BAD
    assert f"record {BAD} of gs://b/b" in str(info.value)
    assert str(tmp_path) not in str(info.value)  # the user's name, not the local copy


def write_examples_of(path) -> str:
    write_examples(str(path), np.zeros((5, 8, 8, 3)), np.arange(5) % 3)
    return str(path)


def test_makeDataset_truncatedFile_isAnErrorNotFewerRecords(tmp_path) -> None:
    path = _write(str(tmp_path / "t.tfrecord"))
    data = (tmp_path / "t.tfrecord").read_bytes()
    record_size = len(data) // N  # every record here has about the same size
    (tmp_path / "t.tfrecord").write_bytes(data[: 60 * record_size + record_size // 2])
    with pytest.raises(DataError, match="truncated") as info:
        make_dataset([path], (8, 8, 3), 16, num_classes=3)
    assert info.value.record == 60 and info.value.file == path


def test_makeDataset_corruptRecord_crcFailure_namesTheRecord(tmp_path) -> None:
    path = _write(str(tmp_path / "c.tfrecord"))
    data = bytearray((tmp_path / "c.tfrecord").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside record ~150's payload: its CRC no longer matches
    (tmp_path / "c.tfrecord").write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt") as info:
        make_dataset([path], (8, 8, 3), 16, num_classes=3)
    assert info.value.record is not None and 140 <= info.value.record <= 160


def test_makeDataset_cleanData_allRecordsPass(tmp_path) -> None:
    path = _write(str(tmp_path / "ok.tfrecord"))
    ds = make_dataset([path], (8, 8, 3), 64, DataSpec(), num_classes=3)
    assert sum(int(y.shape[0]) for _, y in ds) == N


def test_finetune_recordCorruptedAfterTheCheck_dataErrorNotACrash(tmp_path) -> None:
    import keras

    from secateur.pruner.config import TrainConfig
    from secateur.pruner.finetune import evaluate, finetune, select_device

    path = _write(str(tmp_path / "late.tfrecord"))
    ds = make_dataset([path], (8, 8, 3), 32, num_classes=3)
    data = bytearray((tmp_path / "late.tfrecord").read_bytes())
    data[len(data) // 2] ^= 0xFF  # rewritten under the running job
    (tmp_path / "late.tfrecord").write_bytes(bytes(data))
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    with pytest.raises(DataError, match="corrupted record"):
        finetune(model, ds, TrainConfig(epochs=1, batch_size=32), select_device())
    with pytest.raises(DataError, match="stay readable"):
        evaluate(model, ds)
