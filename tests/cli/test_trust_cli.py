"""``secateur plan``/``prune --trust-package``: a keras-hub model is refused (exit 2, naming
the package and the option) without it and planned with it; a package that is
not installed is a one-line error."""

from __future__ import annotations

import re

import pytest

from secateur.cli.main import main
from secateur.cli.outcome import EXIT_BAD_INPUT, EXIT_OK

from .. import trusted_models as tm

pytest.importorskip("keras_hub", reason="keras_hub is not importable; it is in the dev extra")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tm.backbone(str(tmp_path_factory.mktemp("hub") / "backbone.keras"))


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["plan", "prune"])
def test_hubBackbone_withoutTrust_exit2NamingThePackageAndTheOption(
    backbone, command, capsys, tmp_path
) -> None:
    args = [command, backbone] + ([str(tmp_path / "out")] if command == "prune" else [])
    code, _, err = _run(capsys, *args, "--ratio", "0.3")
    assert code == EXIT_BAD_INPUT, err
    assert "registered as 'keras_hub>ResNetBackbone' by package 'keras_hub'" in err
    assert "--trust-package keras_hub" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_plan_hubBackbone_trusted_plansItsChannels(backbone, capsys) -> None:
    code, out, err = _run(
        capsys, "plan", backbone, "--ratio", "0.3", "--trust-package", "keras_hub"
    )
    assert code == EXIT_OK, err
    # Keras numbers auto-generated names per process (res_net_backbone_2 when
    # another test in this xdist worker built one first), so the suffix is free.
    assert re.match(r"plan for res_net_backbone(_\d+)?: ratio 0\.3", out.splitlines()[0]), out
    assert "stack0_block0_1_conv" in out and "params: 85.9K -> " in out


def test_plan_trustPackageNotInstalled_exit2BeforeReadingTheModel(backbone, capsys) -> None:
    code, _, err = _run(capsys, "plan", backbone, "--trust-package", "no_such_package_xyz")
    assert code == EXIT_BAD_INPUT
    assert "no package 'no_such_package_xyz' is installed" in err and "Traceback" not in err


def test_plan_trustPackageWithServer_exit2TheServerDecides(backbone, capsys) -> None:
    code, _, err = _run(
        capsys, "plan", backbone, "--server", "127.0.0.1:1", "--trust-package", "keras_hub"
    )
    assert code == EXIT_BAD_INPUT and "secateur serve --trust-package" in err
