"""Extra artifacts of a pruned model: LiteRT (TFLite) and ONNX, each checked against Keras.

A job's TF Serving version stays the contract; these are optional files a
user asks for (``JobSpec.exports``), written beside the ``.keras`` archive
under ``assets.extra/secateur/`` by Keras's own ``model.export(path,
format=...)``. Each one is loaded back with its runtime and run on a few
inputs; its outputs must match the Keras model's within
``|runtime - keras| <= ATOL + RTOL * |keras|`` elementwise, or the export is
refused.

A format that cannot take an op of the model is refused with
:class:`~secateur.pruner.errors.ExportError` naming the op and the layers it
came from. Two real cases among Keras's built-in layers:

- LiteRT: ``Resizing(interpolation="area")`` lowers to ``tf.ResizeArea``,
  which has no TFLite builtin (the converter refuses it without Select TF
  ops, and a LiteRT runtime without Flex could not run it).
- ONNX: ``Resizing(interpolation="lanczos3")`` lowers to
  ``ScaleAndTranslate``, which tf2onnx cannot convert; it *writes the TF op
  into the ONNX graph anyway* and succeeds, so every node is checked against
  the ONNX operator schemas of the file's opset before the file is kept.

The runtimes are optional (the ``exports`` extra of the distribution) and are
imported only when an export runs; :func:`check_formats` says, without
importing them, whether this process can serve a request.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from secateur.pruner.errors import ExportError, InvalidSpecError

#: Elementwise tolerance of an exported artifact against the Keras model.
ATOL = 1e-4
RTOL = 1e-3
#: Inputs each artifact is run on (one batch) when the caller gives none.
SAMPLES = 4
#: The distribution's extra that installs every runtime (pyproject.toml).
EXTRA = "exports"


@dataclass(frozen=True)
class ExportFormat:
    """One artifact kind.

    Attributes:
        name: the request's name (``litert``, ``onnx``).
        keras_format: what ``keras.Model.export`` calls it.
        filename: the file written under the assets directory.
        needs: modules that must be importable (besides TensorFlow).
    """

    name: str
    keras_format: str
    filename: str
    needs: tuple[str, ...]


FORMATS: dict[str, ExportFormat] = {
    # Keras 3.15 names LiteRT "litert" (not "tflite") and wants a .tflite path.
    # Validation prefers ai-edge-litert's Interpreter and falls back to
    # tf.lite.Interpreter, so LiteRT needs nothing beyond TensorFlow.
    "litert": ExportFormat("litert", "litert", "model.tflite", ()),
    "onnx": ExportFormat("onnx", "onnx", "model.onnx", ("tf2onnx", "onnx", "onnxruntime")),
}


@dataclass(frozen=True)
class ExportResult:
    """What one artifact is and how well it matched Keras (the report's entry)."""

    format: str
    file: str
    bytes: int
    exporter: str
    runtime: str
    samples: int
    max_abs_diff: float
    atol: float = ATOL
    rtol: float = RTOL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _importable(module: str) -> bool:
    if module in sys.modules:  # None there means "refuse to import" (Python's own rule)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_runtimes(name: str) -> tuple[str, ...]:
    """The modules format ``name`` needs that this process cannot import (none imported)."""
    return tuple(m for m in FORMATS[name].needs if not _importable(m))


def check_formats(names: Sequence[str], field: str = "exports") -> tuple[str, ...]:
    """The requested formats, in order without repeats, each known and runnable here.

    Raises:
        InvalidSpecError: an unknown format, or one whose runtime is not
            installed (the message names the modules and the extra).
    """
    out: list[str] = []
    for name in names:
        if name not in FORMATS:
            raise InvalidSpecError(
                f"{field} must be among {', '.join(FORMATS)}. Received: {name!r}", field
            )
        missing = missing_runtimes(name)
        if missing:
            raise InvalidSpecError(
                f"the {name} export needs {', '.join(missing)}, not installed on this server: "
                f"install the '{EXTRA}' extra (pip install 'secateur[{EXTRA}]'). "
                f"Received: {field}={list(names)}",
                field,
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def write_exports(
    model: Any, names: Sequence[str], out_dir: str, samples: Any = None
) -> list[dict[str, Any]]:
    """Export ``model`` in every format of ``names`` into ``out_dir``; the report entries.

    Args:
        samples: see :func:`export_model`.

    Raises:
        ExportError: a format cannot take the model, or its outputs differ.
    """
    return [
        export_model(model, n, os.path.join(out_dir, FORMATS[n].filename), samples).to_dict()
        for n in check_formats(names)
    ]


def check_exportable(model: Any, names: Sequence[str]) -> None:
    """Export ``model`` in every format of ``names`` into a temporary directory, then drop it.

    A job runs this on the original model before any pruning or training:
    pruning changes widths, never the ops, so a format that cannot take the
    original cannot take the pruned model either, and the job fails in
    seconds rather than after fine-tuning.

    Raises:
        ExportError: as :func:`export_model` (on seeded inputs).
    """
    names = check_formats(names)
    if names:
        with tempfile.TemporaryDirectory(prefix="secateur-exports-") as tmp:
            write_exports(model, names, tmp)


def export_model(model: Any, name: str, path: str, samples: Any = None) -> ExportResult:
    """Write ``model`` as format ``name`` to ``path``, load it back and compare.

    Args:
        model: a Keras 3 functional model with float inputs.
        name: a key of :data:`FORMATS`.
        path: the file to write (its directory must exist).
        samples: the inputs to compare on: an array, a list per model input,
            or a batched ``tf.data.Dataset`` of (inputs, labels) whose first
            :data:`SAMPLES` examples are taken; None: :data:`SAMPLES` seeded
            uniform inputs in [0, 1) (32 for a free spatial size).

    Raises:
        ExportError: an op the format cannot take, a conversion failure, or
            outputs beyond the tolerance; nothing is left at ``path``.
    """
    import tensorflow as tf

    fmt = FORMATS[check_formats([name])[0]]
    inputs = _inputs(model, samples)
    # The runtimes run on the CPU in float32; so does the reference (TensorFlow's
    # default TF32 convolutions on recent GPUs would differ by more than the tolerance).
    with tf.device("/CPU:0"):
        reference = _flat(model(inputs if len(inputs) > 1 else inputs[0], training=False))
    try:
        _convert(model, fmt, path)
        if fmt.name == "onnx":
            _check_onnx_ops(model, path)
        outputs, runtime = _run(fmt.name, path, model, inputs)
        diff = _compare(fmt.name, reference, outputs)
    except BaseException:
        if os.path.exists(path):
            os.remove(path)
        raise
    return ExportResult(
        format=fmt.name,
        file=os.path.basename(path),
        bytes=os.path.getsize(path),
        exporter=f"keras {_version('keras')} Model.export(format={fmt.keras_format!r})",
        runtime=runtime,
        samples=int(inputs[0].shape[0]),
        max_abs_diff=diff,
    )


def _inputs(model: Any, samples: Any) -> list[Any]:
    import numpy as np

    if hasattr(samples, "unbatch"):  # a batched tf.data.Dataset of (inputs, labels)
        samples = next(iter(samples.unbatch().batch(SAMPLES).take(1)))[0]
        samples = [np.asarray(s) for s in samples] if isinstance(samples, list | tuple) else samples
    if samples is not None:
        given = samples if isinstance(samples, list | tuple) else [samples]
        return [np.asarray(s, dtype=t.dtype) for s, t in zip(given, model.inputs, strict=True)]
    rng = np.random.default_rng(0)
    out = []
    for t in model.inputs:
        shape = (SAMPLES, *(32 if d is None else d for d in t.shape[1:]))  # 32: a free size
        if not str(t.dtype).startswith(("float", "bfloat")):
            raise ExportError(
                f"exports are checked on float inputs; give samples for others. "
                f"Received: input {t.name!r} of {t.dtype}"
            )
        out.append(rng.uniform(0.0, 1.0, shape).astype(str(t.dtype)))
    return out


def _flat(outputs: Any) -> list[Any]:
    import numpy as np

    items = outputs if isinstance(outputs, list | tuple) else [outputs]
    return [np.asarray(o) for o in items]


_LITERT_OP = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


def _convert(model: Any, fmt: ExportFormat, path: str) -> None:
    """Keras's own export; refusals become ExportError naming the ops and layers."""
    try:
        model.export(path, format=fmt.keras_format, verbose=False)
    except Exception as exc:
        text = str(exc)
        ops = tuple(dict.fromkeys(_LITERT_OP.findall(text)))
        if ops:
            raise ExportError(
                f"the {fmt.name} export needs a LiteRT builtin kernel for every op; "
                f"{', '.join(ops)} has none. Received: a model with {_where(model, text)}",
                fmt.name,
                ops,
            ) from None
        raise ExportError(
            f"the {fmt.name} export of the model failed: {type(exc).__name__}: "
            f"{text.splitlines()[0] if text else ''}",
            fmt.name,
        ) from exc


def _where(model: Any, text: str) -> str:
    """The model's layers whose name scopes appear in a converter's message."""
    names = {layer.name: type(layer).__name__ for layer in model.layers}
    found: dict[str, str] = {}
    for segment in re.split(r"[/\"'\s@:]+", text):
        for name in (segment, re.sub(r"_\d+$", "", segment)):
            if name in names and name != model.name:
                found[name] = names[name]
    return ", ".join(f"layer {n!r} ({c})" for n, c in found.items()) or "a layer of the model"


def _check_onnx_ops(model: Any, path: str) -> None:
    """Every node must be an ONNX operator of the file's opset (tf2onnx keeps TF ops it
    cannot convert in the graph and reports success)."""
    import onnx

    proto = onnx.load(path)
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    bad: dict[str, list[str]] = {}
    for node in proto.graph.node:
        domain = node.domain or "ai.onnx"
        try:
            onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), node.domain)
        except onnx.defs.SchemaError:
            bad.setdefault(node.op_type, []).append(node.name)
    if bad:
        where = _where(model, " ".join(n for names in bad.values() for n in names))
        raise ExportError(
            f"the onnx export needs every op in ONNX opset {opsets.get('ai.onnx')}; tf2onnx "
            f"has no conversion for {', '.join(bad)}. Received: a model with {where}",
            "onnx",
            tuple(bad),
        )


def _run(name: str, path: str, model: Any, inputs: list[Any]) -> tuple[list[Any], str]:
    """The artifact's outputs on ``inputs`` (Keras's output order), and the runtime's name."""
    if name == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {i.name: x for i, x in zip(session.get_inputs(), inputs, strict=True)}
        return list(session.run(None, feed)), f"onnxruntime {ort.__version__}"
    interpreter, runtime = _litert_interpreter(path)
    runner = interpreter.get_signature_runner("serving_default")
    keys = list(runner.get_input_details())
    by_name = {t.name: x for t, x in zip(model.inputs, inputs, strict=True)}
    feed = (
        {k: by_name[k] for k in keys} if set(keys) == set(by_name) else {keys[0]: inputs[0]}
    )  # one unnamed input: Keras calls it keras_tensor
    result = runner(**feed)
    ordered = sorted(result, key=lambda k: int(re.sub(r"\D", "", k) or 0))  # output_0, ...
    return [result[k] for k in ordered], runtime


def _litert_interpreter(path: str) -> tuple[Any, str]:
    if _importable("ai_edge_litert"):
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter(model_path=path), f"ai-edge-litert {_version('ai-edge-litert')}"
    import tensorflow as tf

    return tf.lite.Interpreter(model_path=path), f"tf.lite.Interpreter {tf.__version__}"


def _compare(name: str, reference: list[Any], outputs: list[Any]) -> float:
    import numpy as np

    if [r.shape for r in reference] != [np.shape(o) for o in outputs]:
        raise ExportError(
            f"the {name} artifact's outputs must have the Keras model's shapes "
            f"{[r.shape for r in reference]}. Received: {[np.shape(o) for o in outputs]}",
            name,
        )
    worst = 0.0
    for ref, out in zip(reference, outputs, strict=True):
        diff = np.abs(np.asarray(out, dtype=np.float64) - ref.astype(np.float64))
        worst = max(worst, float(diff.max(initial=0.0)))
        if not np.all(diff <= ATOL + RTOL * np.abs(ref)):
            raise ExportError(
                f"the {name} artifact's outputs must match the Keras model's within "
                f"{ATOL} + {RTOL} * |keras|. Received: a max abs difference of {worst:.3g}",
                name,
            )
    return worst


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"
