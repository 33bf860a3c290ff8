"""Survey: every keras-hub image backbone under a 20% bn_scale prune.

For each backbone (tiny random config, no preset download; the configs live in
``tests/pruner/hub_models.py``, shared with ``tests/pruner/test_keras_hub.py``):
plan, apply, run, compare output shapes, params, and dead-channel exactness
(removed channels' producers zeroed first; groups the plan names as
LayerNorm-over-channels are kept whole for that check). Prints one table row
per model and the prunable share / frozen reasons the plan reports.

Usage: ``python benchmarks/keras_hub_survey.py [NAME ...]``
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.pruner import hub_models


def main(argv: list[str]) -> int:
    try:
        version = hub_models.hub().__version__
    except ImportError as exc:
        print(f"keras_hub is not importable ({exc}); install the dev extra")
        return 2
    names = argv or hub_models.backbone_names()
    print(f"keras_hub {version}, ratio {hub_models.RATIO} bn_scale")
    print("excluded:")
    for name, why in sorted(hub_models.EXCLUDED.items()):
        print(f"  {name}: {why}")
    missing = hub_models.uncovered_backbones()
    if missing:
        print(f"image backbones neither surveyed nor excluded: {missing}")
    print(hub_models.HEADER)
    results = []
    for name in names:
        res = hub_models.check(name)
        results.append(res)
        print(hub_models.row(res), flush=True)
    ok = sum(r.ok for r in results)
    exact = sum(bool(r.exact) for r in results)
    failed = [r.name for r in results if r.error]
    print(f"\n{ok}/{len(results)} pass every check; {exact} exact; errors: {failed or 'none'}")
    for r in results:
        if r.layernorm_groups:
            print(
                f"{r.name}: LayerNorm-over-channels groups kept whole for exactness: "
                f"{len(r.layernorm_groups)}"
            )
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
