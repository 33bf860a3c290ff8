"""LiteRT and ONNX artifacts of a pruned model: round trips within tolerance, clear refusals."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from secateur.pruner import PruneSpec, prune
from secateur.pruner._keras import keras
from secateur.pruner.errors import ExportError, InvalidSpecError
from secateur.pruner.exports import ATOL, RTOL, check_formats, export_model, write_exports

L = keras.layers


def _needs_onnx() -> None:
    for module in ("tf2onnx", "onnx", "onnxruntime"):
        pytest.importorskip(module, reason=f"{module} is missing: pip install 'secateur[exports]'")


@pytest.fixture(scope="module")
def pruned_conv() -> tuple[keras.Model, keras.Model]:
    """A small conv net and its pruned copy (half of the prunable channels gone)."""
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((12, 12, 3))
    for width in (8, 16):
        x = L.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.ReLU()(x)
        x = L.MaxPooling2D()(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(5)(x))
    for layer in model.layers:  # non-trivial BN statistics, so scores differ
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [np.linspace(0.1, 2, n), np.linspace(-0.5, 0.5, n), np.zeros(n), np.ones(n)]
            )
    return model, prune(model, PruneSpec(ratio=0.5)).model


@pytest.mark.parametrize("fmt,name", [("litert", "model.tflite"), ("onnx", "model.onnx")])
def test_export_prunedConvModel_roundTripsWithinTolerance(pruned_conv, tmp_path, fmt, name) -> None:
    if fmt == "onnx":
        _needs_onnx()
    original, pruned = pruned_conv
    assert pruned.count_params() < original.count_params()
    samples = np.random.default_rng(1).uniform(0, 1, (3, 12, 12, 3)).astype("float32")
    [entry] = write_exports(pruned, [fmt], str(tmp_path), samples)
    path = tmp_path / name
    assert entry["file"] == name and entry["bytes"] == os.path.getsize(path) > 0
    assert entry["format"] == fmt and entry["samples"] == 3
    assert 0 <= entry["max_abs_diff"] <= ATOL and (entry["atol"], entry["rtol"]) == (ATOL, RTOL)
    assert entry["exporter"].startswith("keras 3.") and f"format={fmt!r}" in entry["exporter"]
    # The artifact is the pruned model: the same on fresh inputs, not the original.
    fresh = np.random.default_rng(2).uniform(0, 1, (2, 12, 12, 3)).astype("float32")
    got = _run(fmt, str(path), fresh)
    np.testing.assert_allclose(got, pruned.predict(fresh, verbose=0), atol=ATOL, rtol=RTOL)
    assert not np.allclose(got, original.predict(fresh, verbose=0), atol=1e-2)


def _run(fmt: str, path: str, x: np.ndarray) -> np.ndarray:
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # deprecated, still in TensorFlow 2.21
        from tensorflow.lite import Interpreter

    runner = Interpreter(model_path=path).get_signature_runner()
    [key] = runner.get_input_details()
    return runner(**{key: x})["output_0"]


def _resizing(interpolation: str) -> keras.Model:
    x = inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="stem")(x)
    x = L.Resizing(4, 4, interpolation=interpolation, name="shrink")(x)
    return keras.Model(inputs, L.GlobalAveragePooling2D()(x))


@pytest.mark.parametrize(
    "fmt,interpolation,op",
    [
        # tf.ResizeArea has no TFLite builtin kernel: the converter refuses it.
        ("litert", "area", "ResizeArea"),
        # tf2onnx cannot convert ScaleAndTranslate, leaves it in the graph and
        # reports success; the opset check refuses it.
        ("onnx", "lanczos3", "ScaleAndTranslate"),
    ],
)
def test_export_opTheFormatLacks_refusedNamingOpAndLayer_nothingLeft(
    tmp_path, fmt, interpolation, op
) -> None:
    if fmt == "onnx":
        _needs_onnx()
    path = tmp_path / ("m.tflite" if fmt == "litert" else "m.onnx")
    with pytest.raises(ExportError) as info:
        export_model(_resizing(interpolation), fmt, str(path))
    assert info.value.format == fmt and info.value.ops == (op,)
    assert op in str(info.value) and "layer 'shrink' (Resizing)" in str(info.value)
    assert not path.exists()


def test_onnx_areaResize_convertedToAnotherOp_refusedByTheOutputCheck(tmp_path) -> None:
    """tf2onnx turns tf.ResizeArea into ONNX Resize, which does not average areas: the
    file loads and runs, and only comparing outputs with Keras shows it is wrong."""
    _needs_onnx()
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as info:
        export_model(_resizing("area"), "onnx", str(path))
    assert info.value.format == "onnx" and info.value.ops == ()
    assert "must match the Keras model's within" in str(info.value)
    assert not path.exists()


def test_checkFormats_unknownRefused_repeatsDropped() -> None:
    assert check_formats(["litert", "litert"]) == ("litert",)
    with pytest.raises(InvalidSpecError) as info:
        check_formats(["coreml"])
    assert info.value.field == "exports" and "litert, onnx" in str(info.value)


def test_checkFormats_missingRuntime_refusedNamingTheExtra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # Python's "not importable"
    with pytest.raises(InvalidSpecError) as info:
        check_formats(["litert", "onnx"])
    assert "onnxruntime" in str(info.value) and "secateur[exports]" in str(info.value)
    assert check_formats(["litert"]) == ("litert",)  # tf.lite.Interpreter stands in


def test_validatingAnExportRequest_importsNoRuntimeNorTensorFlow() -> None:
    """The service validates `exports` at CreateJob without loading any runtime (or TF)."""
    import subprocess

    _needs_onnx()  # installed, yet not imported
    code = (
        "import sys\n"
        "from secateur.server.pipeline.convert import job_request\n"
        "from secateur.v1 import pruning_pb2 as pb\n"
        "spec = pb.JobSpec(model_uri='m.keras', output_uri='out', exports=[1, 2])\n"
        "assert job_request(spec).exports == ('litert', 'onnx')\n"
        "heavy = ('tensorflow', 'keras', 'onnx', 'onnxruntime', 'tf2onnx', 'ai_edge_litert')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stderr
