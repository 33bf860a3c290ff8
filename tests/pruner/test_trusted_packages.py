"""``trusted``: classes an operator-trusted installed package registers may be named by a file.

Only those: the registry entry must exist and have been defined by the trusted
package; Lambda layers, serialised functions, other packages' classes and
module paths stay refused, trusted or not. Default: Keras built-ins only.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from secateur.pruner.errors import UnsafeModelError
from secateur.pruner.modelio import load_model
from secateur.pruner.safety import check_model_file, installed_packages

from .. import hostile_models as hm
from .. import trusted_models as tm

pytest.importorskip("keras_hub", reason="keras_hub is not importable; it is in the dev extra")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("trusted")
    return {
        "backbone": tm.backbone(str(d / "backbone.keras")),
        "classifier_path": str(d / "classifier.keras"),
        "classifier": tm.classifier(str(d / "classifier.keras")),
        "dir": d,
    }


@pytest.mark.parametrize("which", ["backbone", "classifier_path"])
def test_loadModel_hubModel_untrusted_refusedNamingThePackageAndTheOption(files, which) -> None:
    path = files[which]
    with pytest.raises(UnsafeModelError) as info:
        load_model(path)
    message = str(info.value)
    assert "registered as 'keras_hub>" in message and "package 'keras_hub'" in message
    assert "--trust-package keras_hub" in message and "Received: " + path in message


def test_loadModel_hubBackbone_trusted_sameOutputsAsTheModelSaved(files) -> None:
    import keras

    original = keras.saving.load_model(files["backbone"])  # the control: Keras alone
    loaded = load_model(files["backbone"], trusted=tm.TRUSTED)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(original(x)), atol=1e-5)
    assert type(loaded).__name__ == "ResNetBackbone"


def test_loadModel_hubTask_trusted_itsNestedBackboneAndPreprocessorToo(files) -> None:
    task = files["classifier"]
    loaded = load_model(files["classifier_path"], trusted=tm.TRUSTED)
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(task(x)), atol=1e-5)


def test_loadModel_trustedPackagesRegisteredFunction_loads(tmp_path) -> None:
    """``keras_hub>gelu_approximate``: a registered function, named in a layer's config."""
    import keras
    import keras_hub

    gelu = keras.saving.get_custom_objects()["keras_hub>gelu_approximate"]
    inp = keras.Input((8, 16))
    layer = keras_hub.layers.TransformerEncoder(8, 2, activation=gelu, name="enc")
    model = keras.Model(inp, layer(inp))
    path = str(tmp_path / "enc.keras")
    model.save(path)
    with pytest.raises(UnsafeModelError, match="--trust-package keras_hub"):
        load_model(path)
    x = np.random.default_rng(2).normal(size=(2, 8, 16)).astype("float32")
    loaded = load_model(path, trusted=tm.TRUSTED)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-5)


def test_loadModel_trusted_lambdaBesideATrustedLayer_stillRefused_noCodeRuns(tmp_path) -> None:
    import keras
    import keras_hub

    marker = tmp_path / "marker"
    inp = keras.Input((8, 16))
    x = keras_hub.layers.TransformerEncoder(8, 2, name="enc")(inp)
    out = keras.layers.Lambda(hm.evil_lambda_fn(str(marker)), name="evil")(x)
    path = str(tmp_path / "evil.keras")
    keras.Model(inp, out, name="m").save(path)
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeModelError) as info:
        load_model(path, trusted=tm.TRUSTED)
    assert info.value.layer == "m/evil" and info.value.class_name == "Lambda"
    assert not marker.exists()


def test_loadModel_trusted_anotherPackagesRegisteredClass_refused_noCodeRuns(tmp_path) -> None:
    """``secateur_test>MarkerLayer`` is in the registry, but defined by this test package."""
    marker = tmp_path / "marker"
    path = hm.keras_custom_layer(str(tmp_path / "c.keras"), str(marker))
    with pytest.raises(UnsafeModelError, match="by package 'tests', which is not trusted"):
        load_model(path, trusted=tm.TRUSTED)
    assert not marker.exists()


def _hub(cls: str, **extra: Any) -> dict[str, Any]:
    return {
        "module": "keras_hub.src.layers.modeling.transformer_encoder",
        "class_name": cls,
        "config": {"name": "bad", "trainable": True, "intermediate_dim": 8, "num_heads": 2},
        "registered_name": f"keras_hub>{cls}",
        "name": "bad",
    } | extra


def _function(module: str, name: str) -> dict[str, Any]:
    dense = _hub("Dense", module="keras.layers", registered_name=None)
    dense["config"] = {"name": "bad", "trainable": True, "units": 2}
    dense["config"]["activation"] = {"module": module, "class_name": "function", "config": name}
    return dense


@pytest.mark.parametrize(
    "layer,match",
    [
        (_hub("NoSuchLayer"), "which no trusted package \\(keras_hub\\) registers"),
        (
            _hub("WordpieceTokenizer", registered_name="Text>WordpieceTokenizer"),
            "by package 'tensorflow_text', which is not trusted",
        ),
        (_hub("TransformerEncoder", registered_name=None), "not from Keras"),
        (_function("keras_hub.src.utils.preset_utils", "get_file"), "not a Keras built-in"),
        (_function("builtins", "keras_hub>no_such_function"), "no trusted package"),
        (_hub("TransformerEncoder") | {"class_name": "Lambda"}, "Python function stored"),
        (_hub("TransformerEncoder", module="os"), "but names module 'os'"),
    ],
    ids=[
        "unregisteredNameUnderTheTrustedPrefix",
        "registeredByAPackageTheTrustedOneImports",
        "modulePathWithoutRegistration",
        "unregisteredFunctionFromTheTrustedPackage",
        "unregisteredFunctionName",
        "deniedClassName",
        "trustedNameWithAnotherPackagesModule",
    ],
)
def test_checkModelFile_trusted_stillRefusesEverythingElse(tmp_path, layer, match) -> None:
    with pytest.raises(UnsafeModelError, match=match):
        check_model_file(hm.config_archive(str(tmp_path / "m.keras"), [layer]), trusted=tm.TRUSTED)


def test_checkModelFile_trusted_registeredClassAndFunctionFromConfigAlone_pass(tmp_path) -> None:
    layers = [_hub("TransformerEncoder"), _function("builtins", "keras_hub>gelu_approximate")]
    check_model_file(hm.config_archive(str(tmp_path / "m.keras"), layers), trusted=tm.TRUSTED)


@pytest.mark.parametrize(
    "names,match",
    [
        (
            ["no_such_package_for_secateur"],
            "no package 'no_such_package_for_secateur' is installed",
        ),
        (["keras_hub.models"], "top-level package"),
        ([""], "top-level package"),
    ],
)
def test_installedPackages_notAnInstalledTopLevelPackage_valueErrorNamingIt(names, match) -> None:
    with pytest.raises(ValueError, match=match):
        installed_packages(names)


def test_installedPackages_importsNothing_dropsRepeats() -> None:
    assert installed_packages(["json", "keras_hub", "json"]) == ("json", "keras_hub")
    assert installed_packages([]) == ()


def test_loadModel_untrustedByDefault_keepsRefusingWhateverThisProcessImported(files) -> None:
    """keras_hub is imported (and registered) by now: the default trusts it no more."""
    import keras_hub  # noqa: F401

    with pytest.raises(UnsafeModelError, match="--trust-package keras_hub"):
        load_model(files["backbone"])
    assert os.path.exists(files["backbone"])


def test_loadModel_tfKerasSavedModel_trustAppliesToKeras3Only_customLayerRefused(tmp_path) -> None:
    """Trusted packages register with Keras 3; tf_keras would resolve names its own way."""
    marker = tmp_path / "marker"
    path = hm.tf_keras_custom_layer(str(tmp_path / "sm"), str(marker))
    with pytest.raises(UnsafeModelError, match=r"tf\.keras built-ins only"):
        load_model(path, trusted=tm.TRUSTED)
    assert not marker.exists()
