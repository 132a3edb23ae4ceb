"""advdefense: defenses against adversarial examples, and an honest harness to evaluate them.

Quickstart::

    import advdefense
    from advdefense.data import load_dataset

    images, labels = load_dataset("mnist-sample", "test")
    model = advdefense.load("runs/demo/model")
"""

from __future__ import annotations

from advdefense.io import load, load_config, save
from advdefense.registry import list_architectures, register_model

__version__ = "0.1.0"

__all__ = ["__version__", "list_architectures", "load", "load_config", "register_model", "save"]
