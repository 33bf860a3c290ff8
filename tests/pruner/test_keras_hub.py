"""Every keras-hub image backbone prunes at 20% bn_scale, runs, shrinks, and is exact.

Tiny random configs (``tests/pruner/hub_models.py``, shared with
``benchmarks/keras_hub_survey.py``); no preset is downloaded. Exactness: the
producers of the channels the plan removes are zeroed first, so removing them
cannot change any output; groups the plan names as normalised by a
LayerNormalization over the channels are kept whole for that check (removing
channels changes the statistics there) and must be named in the plan.
"""

from __future__ import annotations

import pytest

from . import hub_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _keras_hub() -> None:
    pytest.importorskip("keras_hub", reason="keras_hub is not importable; it is in the dev extra")


def test_everyImageBackbone_isSurveyedOrExcludedWithAReason() -> None:
    assert hub_models.uncovered_backbones() == []


@pytest.mark.parametrize("name", hub_models.backbone_names())
def test_backbone_prunes20PercentBnScale_runsShrinksAndIsExact(name: str) -> None:
    res = hub_models.HubResult(name)
    hub_models.run(res)
    report = f"{name}: prunable share {res.share:.0%}, frozen: {res.reasons[:3]}"
    assert res.prunes, f"the plan removes no channel; {report}"
    assert res.shapes_kept, report
    assert res.finite, report
    assert res.params_after < res.params_before, report
    assert res.params_after == res.plan_params_after, report
    assert res.exact, f"max |diff| {res.max_diff:.3g} on an output scale of {res.scale:.3g}"
    # Exactness means something only if the checked plan removes channels
    # (groups normalised by a LayerNorm over channels are kept whole there;
    # when those are all it prunes, each must carry the plan's note).
    assert res.exactness_checked, f"the check removes no channel, not all noted; {report}"
