"""Refuse model files that would run their own code when loaded.

Every format :func:`secateur.pruner.modelio.load_model` accepts carries a
Keras config in plain JSON; it is read here *without* Keras and walked, to
any depth (nested models, ``TimeDistributed``/``Bidirectional`` wrappers,
RNN cells, initializers ...), before anything is deserialised:

- ``.keras`` archives: ``config.json`` read from the zip;
- ``.h5``/``.hdf5``: the ``model_config`` attribute, read with h5py (Keras'
  legacy H5 loader does not honour ``safe_mode``);
- tf.keras SavedModels: every node of ``keras_metadata.pb`` (tf_keras revives
  ``Lambda`` bytecode from there whatever ``safe_mode`` says).

Refused: ``Lambda`` and other layers that call a stored or named function
(``TFOpLambda``, ``TFSMLayer``, ``TorchModuleWrapper`` ...), serialised
Python functions (``__lambda__``, ``function_type: lambda``), functions from
outside Keras' built-in activations/losses/metrics, classes from modules
outside ``keras``/``tf_keras``, registered custom objects (``package>Name``)
and class names that are not Keras built-ins. ``compile_config`` and
``training_config`` at the root are skipped: models are loaded with
``compile=False``, so those are never deserialised (the same keys deeper
down are checked like any other).

Trusted packages: an operator may name installed packages (``--trust-package
keras_hub``) whose *registered* classes and functions a file may name. The
file still carries no code: a ``package>Name`` it names is accepted only when
Keras' global registry holds that name and the object there was defined by a
trusted package (its ``__module__``; the prefix before ``>`` is only what
the file claims). Everything else above stays refused, trusted or not.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from secateur.pruner.errors import ModelLoadError, UnsafeModelError

# Built-in classes that run code given by the file (bytecode, a named function,
# a pickled module, another SavedModel): refused even though Keras ships them.
DENIED_CLASSES = {
    "Lambda": "runs a Python function stored in the file",
    "TFOpLambda": "calls a TensorFlow function named in the file",
    "SlicingOpLambda": "calls a TensorFlow function named in the file",
    "TorchModuleWrapper": "unpickles a torch module stored in the file",
    "JaxLayer": "calls a Python function given in the file",
    "FlaxLayer": "calls a Python function given in the file",
    "TFSMLayer": "loads another SavedModel from a path named in the file",
    "__lambda__": "is serialised Python bytecode",
}
# Markers Keras itself writes for plain values (tuples, tensors, shapes).
_VALUE_CLASSES = {
    "__tuple__", "__keras_tensor__", "__tensor__", "__numpy__", "__bytes__",
    "__ellipsis__", "__slice__", "TensorShape", "TypeSpec",
    "Functional", "Sequential", "Model",
}  # fmt: skip
_KERAS_MODULES = ("keras", "tf_keras")
_FUNCTION_MODULES = (
    "builtins", "keras.activations", "keras.losses", "keras.metrics",
    "keras.src.activations", "keras.src.losses", "keras.src.metrics",
)  # fmt: skip
_NAMESPACES = (
    "layers", "models", "initializers", "regularizers", "constraints", "losses",
    "metrics", "optimizers", "activations", "mixed_precision", "dtype_policies",
)  # fmt: skip
_NOT_DESERIALISED = ("compile_config", "training_config")
MAX_CONFIG_BYTES = 64 << 20
#: The option that names trusted packages, in every command that loads models.
TRUST_OPTION = "--trust-package"


@dataclass(frozen=True)
class _Finding:
    layer: str
    class_name: str
    reason: str


@dataclass(frozen=True)
class _Allowed:
    """What a config may name: Keras built-ins, and the trusted packages' registered objects."""

    known: Callable[[str], bool]
    #: registered name (``keras_hub>ResNetBackbone``) -> object, trusted packages only.
    registered: Mapping[str, Any]
    trusted: tuple[str, ...]
    #: A Keras 3 file (tf.keras files may name tf.keras built-ins only).
    keras3: bool


@functools.cache
def builtin_names(library: str) -> frozenset[str]:
    """Public class and function names Keras (``keras``) or tf.keras (``tf_keras``) ships."""
    if library == "keras":
        from secateur.pruner._keras import keras as lib
    else:
        import tf_keras as lib
    names: set[str] = set()
    for ns in _NAMESPACES:
        mod = getattr(lib, ns, None)
        names |= {n for n in dir(mod) if not n.startswith("_")} if mod is not None else set()
    return frozenset(names)


def installed_packages(names: Iterable[str]) -> tuple[str, ...]:
    """The operator's trusted packages, each checked to be installed; nothing is imported.

    Light enough for a server's start-up (no TensorFlow): the packages are
    imported by :func:`trusted_objects`, in the process that loads models.

    Args:
        names: top-level package names (``keras_hub``), as given to ``--trust-package``.

    Returns:
        The names, without duplicates, in the order given.

    Raises:
        ValueError: a name that is not a top-level package installed here.
    """
    packages = tuple(dict.fromkeys(names))
    for name in packages:
        if not name.isidentifier():
            raise ValueError(
                f"{TRUST_OPTION} takes the name of an installed top-level package, such as "
                f"keras_hub. Received: {name!r}"
            )
        if importlib.util.find_spec(name) is None:
            raise ValueError(
                f"{TRUST_OPTION} names a package that must be installed where models are "
                f"loaded; no package {name!r} is installed here (pip install it, or drop the "
                f"option). Received: {TRUST_OPTION} {name}"
            )
    return packages


def trusted_objects(trusted: Sequence[str]) -> dict[str, Any]:
    """Every Keras object the ``trusted`` packages register, by registered name.

    Imports each package first (its classes register themselves on import).
    An object counts as the package's when it was defined in it (its
    ``__module__``), whatever prefix it is registered under: ``keras_hub``
    registers its classes as ``keras_nlp>...`` too, and imports
    ``tensorflow_text``, whose own registrations stay untrusted.

    Raises:
        ValueError: a package that is not installed or fails to import.
    """
    packages = installed_packages(trusted)
    if not packages:
        return {}
    for name in packages:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ValueError(
                f"a trusted package must import cleanly; importing {name!r} failed "
                f"({type(exc).__name__}: {exc}). Received: {TRUST_OPTION} {name}"
            ) from exc
    from secateur.pruner._keras import keras

    registry = keras.saving.get_custom_objects()
    return {key: obj for key, obj in registry.items() if _owner(obj) in packages}


def _owner(obj: Any) -> str:
    """The top-level package that defined ``obj``."""
    return str(getattr(obj, "__module__", None) or "").split(".")[0]


def check_model_file(path: str, shown: str | None = None, trusted: Sequence[str] = ()) -> None:
    """Refuse ``path`` (a ``.keras``/``.h5`` file or tf.keras SavedModel dir) if loading runs code.

    Args:
        path: the local file or directory about to be loaded.
        shown: the path to name in errors (the user's, when ``path`` is a copy).
        trusted: installed packages whose registered classes and functions the
            file may name (imported here; see the module docstring).

    Raises:
        UnsafeModelError: the config holds code, or objects that are neither
            Keras built-ins nor registered by a trusted package.
        ModelLoadError: the config cannot be read at all.
        ValueError: a trusted package is not installed or fails to import.
    """
    shown = shown or path
    if os.path.isdir(path):
        configs, library = _savedmodel_configs(path, shown), "tf_keras"
    elif path.lower().endswith(".keras"):
        configs, library = iter([_archive_config(path, shown)]), "keras"
    else:
        configs, library = iter([_h5_config(path, shown)]), "keras"
    # Trusted packages register with Keras 3; tf_keras resolves names in a registry of its own.
    keras3 = library == "keras"
    allowed = _Allowed(
        builtin_names(library).__contains__,
        trusted_objects(trusted) if keras3 else {},
        tuple(trusted) if keras3 else (),
        keras3,
    )
    for config in configs:
        if isinstance(config, dict):  # only the root's are skipped: see the module docstring
            config = {k: v for k, v in config.items() if k not in _NOT_DESERIALISED}
        try:
            finding = _scan(config, (), allowed)
        except RecursionError:
            raise ModelLoadError(
                f"the model's config is nested too deeply to check. Received: {shown}"
            ) from None
        if finding is not None:
            raise UnsafeModelError(
                "model files may hold only built-in Keras layers and objects (and classes "
                "registered by installed packages the operator trusts), never code that runs "
                f"when loaded; in layer '{finding.layer}', {finding.class_name} "
                f"{finding.reason}, so the model was refused before loading it. "
                f"Received: {shown}",
                layer=finding.layer,
                class_name=finding.class_name,
            )


def _archive_config(path: str, shown: str) -> Any:
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("config.json")
            if info.file_size > MAX_CONFIG_BYTES:
                raise ModelLoadError(
                    f"a .keras config.json must be at most {MAX_CONFIG_BYTES} bytes. "
                    f"Received: {info.file_size} bytes in {shown}"
                )
            return _parse(zf.read(info), "config.json", shown)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(
            f"a .keras archive must hold a readable config.json ({exc}). Received: {shown}"
        ) from exc


def _h5_config(path: str, shown: str) -> Any:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except OSError as exc:
        raise ModelLoadError(
            f"could not read the model (not an HDF5 file: {exc}). Received: {shown}"
        ) from exc
    if raw is None:
        raise ModelLoadError(
            f"an .h5 model must carry a model_config (this holds weights only). Received: {shown}"
        )
    return _parse(raw, "model_config", shown)


def _savedmodel_configs(path: str, shown: str) -> Iterator[Any]:
    from google.protobuf.message import DecodeError
    from tf_keras.protobuf import saved_metadata_pb2

    metadata = saved_metadata_pb2.SavedMetadata()
    try:
        with open(os.path.join(path, "keras_metadata.pb"), "rb") as fh:
            metadata.ParseFromString(fh.read())
    except (OSError, DecodeError) as exc:
        raise ModelLoadError(
            f"keras_metadata.pb must be a readable SavedMetadata proto ({exc}). Received: {shown}"
        ) from exc
    for node in metadata.nodes:
        if not node.identifier.startswith("_tf_keras_"):
            raise UnsafeModelError(
                "SavedModel metadata may describe only tf.keras objects; node "
                f"'{node.node_path}' is a '{node.identifier}'. Received: {shown}",
                layer=node.node_path,
                class_name=node.identifier,
            )
        yield _parse(node.metadata or "{}", f"keras_metadata.pb node {node.node_path}", shown)


def _parse(raw: bytes | str, what: str, shown: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ModelLoadError(f"the model's {what} must be JSON ({exc}). Received: {shown}") from exc


def _scan(
    node: Any, owners: tuple[str, ...], allowed: _Allowed, owner_cls: str = "model"
) -> _Finding | None:
    """The first refused object under ``node``; ``owners`` names the enclosing layers."""
    items: Any = ()
    if isinstance(node, list):
        items = node
    elif isinstance(node, dict):
        cls = node.get("class_name")
        if isinstance(cls, str):
            name = _layer_name(node)
            owners, owner_cls = ((*owners, name), cls) if name else (owners, owner_cls)
            reason = _refusal(node, cls, allowed)
            if reason:
                what = f"function {node.get('config')!r}" if cls == "function" else cls
                return _Finding("/".join(owners) or "<model>", what, reason)
        if "lambda" in (node.get("function_type"), node.get("output_shape_type")):
            return _Finding("/".join(owners) or "<model>", owner_cls, "holds Python bytecode")
        items = node.values()
    for item in items:
        found = _scan(item, owners, allowed, owner_cls)
        if found is not None:
            return found
    return None


def _layer_name(node: dict[str, Any]) -> str:
    """The name of a layer or model object; "" for other objects (policies, initializers)."""
    name = node.get("name")
    config = node.get("config")
    if not isinstance(name, str) and isinstance(config, dict) and "trainable" in config:
        name = config.get("name")
    return name if isinstance(name, str) else ""


def _refusal(node: dict[str, Any], cls: str, allowed: _Allowed) -> str:
    """Why ``node`` (an object with ``class_name``) would run code; "" when it is safe."""
    if cls in DENIED_CLASSES:
        return DENIED_CLASSES[cls]
    module = node.get("module")
    if cls == "function":
        fn = node.get("config")
        if isinstance(fn, str) and ">" in fn:  # Keras looks a function up by this name
            return _unregistered(fn, module, allowed)
        if not _within(module, _FUNCTION_MODULES) or not isinstance(fn, str):
            return f"from module {module!r} is not a Keras built-in activation, loss or metric"
        return ""
    # Keras looks a class up in the registry by registered_name (the class name when absent).
    registered = node.get("registered_name", cls)
    if isinstance(registered, str) and ">" in registered:
        return _unregistered(registered, module, allowed)
    if module is not None:
        if not _within(module, _KERAS_MODULES):
            return f"is a class from module {module!r}, not from Keras"
        return ""
    if cls not in _VALUE_CLASSES and not allowed.known(cls):
        return "is not a built-in Keras class (custom objects are not accepted)"
    return ""


def _unregistered(name: str, module: Any, allowed: _Allowed) -> str:
    """Why the registered name ``name`` (``package>Name``) is refused; "" if a trusted package's.

    Keras resolves a registered name before it looks at ``module``; a module
    naming another package than the object's is refused all the same.
    """
    if name in allowed.registered:
        owner = _owner(allowed.registered[name])
        if module is None or module == "builtins" or _within(module, (owner,)):
            return ""
        return f"is registered as '{name}' by package '{owner}' but names module {module!r}"
    why = f"is a custom object registered as '{name}'"
    if not allowed.keras3:
        return f"{why} (a tf.keras SavedModel may name tf.keras built-ins only)"
    from secateur.pruner._keras import keras

    registered = keras.saving.get_custom_objects().get(name)
    # The package that registered it, when imported here; else the one the name claims.
    package = _owner(registered) if registered is not None else name.split(">", 1)[0]
    installed = package.isidentifier() and importlib.util.find_spec(package) is not None
    if installed and package not in allowed.trusted:
        return (
            f"{why} by package '{package}', which is not trusted (to trust that installed "
            f"package's registered classes, start secateur with {TRUST_OPTION} {package})"
        )
    if allowed.trusted:
        return (
            f"{why}, which no trusted package ({', '.join(allowed.trusted)}) registers "
            "(custom objects of other packages are not accepted)"
        )
    return f"{why} (custom objects are not accepted)"


def _within(module: Any, roots: tuple[str, ...]) -> bool:
    return isinstance(module, str) and any(module == r or module.startswith(r + ".") for r in roots)
