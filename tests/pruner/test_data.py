"""TFRecord data: formats, configuration, and data that does not fit."""

from __future__ import annotations

import numpy as np
import pytest

from secateur.pruner.data import DataSpec, count_examples, make_dataset, write_examples
from secateur.pruner.errors import DataError


def _images(n: int = 6, side: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, side, side, 3)).astype("float32"), np.arange(n) % 3


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_makeDataset_decodesExactPixelsInZeroTo255(tmp_path, encoding) -> None:
    images, labels = _images()
    path = str(tmp_path / "d.tfrecord")
    write_examples(path, images, labels, encoding)
    ds = make_dataset([path], (8, 8, 3), batch_size=4)
    got_x, got_y = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    np.testing.assert_array_equal(np.concatenate(got_x), images)
    np.testing.assert_array_equal(np.concatenate(got_y), labels)
    assert np.concatenate(got_x).dtype == np.float32
    assert count_examples([path]) == 6


def test_makeDataset_jpegKeysScaleAndResize(tmp_path) -> None:
    images, labels = _images(side=16)
    spec = DataSpec(image_key="img", label_key="cls", scale=1 / 255.0, resize=True)
    path = str(tmp_path / "d.tfrecord")
    write_examples(path, images, labels, "jpeg", spec)
    x, y = next(iter(make_dataset([path], (8, 8, 3), 6, spec)))
    assert x.shape == (6, 8, 8, 3)
    assert float(np.max(x)) <= 1.0
    np.testing.assert_array_equal(y.numpy(), labels)


def test_makeDataset_shuffledTrainingIsAPermutation(tmp_path) -> None:
    images, _ = _images(12)
    paths = [str(tmp_path / f"s{i}.tfrecord") for i in range(2)]
    write_examples(paths[0], images[:6], np.arange(6))
    write_examples(paths[1], images[6:], np.arange(6, 12))
    ys = np.concatenate([y.numpy() for _, y in make_dataset(paths, (8, 8, 3), 5, shuffle=True)])
    assert sorted(ys.tolist()) == list(range(12))


@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        ((16, 16, 3), {}, r"decode to the model's input shape \(16, 16, 3\)"),
        ((8, 8, 3), {"spec": DataSpec(image_key="pixels")}, r"features \['image', 'label'\]"),
        ((8, 8, 3), {"num_classes": 2}, r"labels must be in \[0, 2\)"),
    ],
)
def test_makeDataset_dataThatDoesNotFit_raisesDataError(tmp_path, shape, kwargs, match) -> None:
    images, labels = _images()
    path = str(tmp_path / "d.tfrecord")
    write_examples(path, images, labels)
    with pytest.raises(DataError, match=match):
        make_dataset([path], shape, 2, **kwargs)


def test_makeDataset_notTfrecordOrEmpty_raisesDataError(tmp_path) -> None:
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(DataError, match="TFRecord"):
        make_dataset([str(bad)], (8, 8, 3), 2)
    empty = tmp_path / "empty.tfrecord"
    write_examples(str(empty), np.zeros((0, 8, 8, 3)), np.zeros(0))
    with pytest.raises(DataError, match="at least one record"):
        make_dataset([str(empty)], (8, 8, 3), 2)
    with pytest.raises(DataError, match="no files"):
        make_dataset([], (8, 8, 3), 2)


def test_makeDataset_cachesDecodedDataWithinTheMemoryBudget(tmp_path) -> None:
    from secateur.pruner.data import decoded_bytes, fits_cache
    from secateur.pruner.errors import InvalidSpecError

    images, labels = _images(6)
    path = str(tmp_path / "d.tfrecord")
    write_examples(path, images, labels)
    assert decoded_bytes(6, (8, 8, 3)) == 6 * (8 * 8 * 3 * 4 + 8)
    assert fits_cache(6, (8, 8, 3), DataSpec()) and not fits_cache(
        6, (8, 8, 3), DataSpec(cache_mib=0)
    )
    cached = make_dataset([path], (8, 8, 3), 4)
    uncached = make_dataset([path], (8, 8, 3), 4, DataSpec(cache_mib=0))
    first = [np.concatenate([b[1].numpy() for b in ds]) for ds in (cached, uncached)]
    # The file changes after an epoch (same count): only the cached set still reads the old one.
    write_examples(path, images, (labels + 1) % 10)
    second = [np.concatenate([b[1].numpy() for b in ds]) for ds in (cached, uncached)]
    assert np.array_equal(second[0], first[0])
    assert np.array_equal(second[1], (first[1] + 1) % 10)
    with pytest.raises(InvalidSpecError, match="cache_mib=-1"):
        DataSpec(cache_mib=-1)
