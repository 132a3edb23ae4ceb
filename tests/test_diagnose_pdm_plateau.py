"""The variant parsing of ``scripts/diagnose_pdm_plateau.py`` (its training runs are the
library's :func:`advdefense.training.pdm.train_pdm`, tested in ``test_pdm.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "diagnose_pdm_plateau.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("diagnose_pdm_plateau", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_split_on_commas_that_start_a_new_loss() -> None:
    script = _script()
    text = "pdm,siamese-rvl,pdm:siamese=0.1,variance=0.01;rce,pdm:warmup=2;"
    assert script.split_variants(text) == [
        "pdm",
        "siamese-rvl",
        "pdm:siamese=0.1,variance=0.01",
        "rce",
        "pdm:warmup=2",
    ]


def test_a_variant_is_the_recipe_config_with_its_options_replaced() -> None:
    script = _script()
    config = script.parse_variant("pdm:siamese=0.1,variance=0.01,warmup=2", 8, 0)
    assert (config.loss, config.epochs, config.siamese_weight) == ("pdm", 8, 0.1)
    assert (config.variance_weight, config.warmup_epochs) == (0.01, 2)
    assert script.parse_variant("pdm", 8, 0).variance_weight == 0.1  # the recipe's RVL weight
    assert script.parse_variant("rce", 8, 0).variance_weight == 1.0  # unused without pairs
    with pytest.raises(SystemExit, match="unknown variant option 'gamma'"):
        script.parse_variant("pdm:gamma=1", 8, 0)
