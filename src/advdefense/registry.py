"""Registry of model architectures, so :func:`advdefense.load` can rebuild any saved model.

A registered class is an ``nn.Module`` whose constructor takes a single frozen dataclass
(its ``config_class``) and stores it as ``self.config``. Registering is explicit, with the
:func:`register_model` decorator: no metaclasses, no import-time scanning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from torch import nn

from advdefense.errors import CheckpointError

__all__ = [
    "RegisteredModel",
    "architecture_name",
    "get_architecture",
    "list_architectures",
    "register_model",
]


class RegisteredModel(Protocol):
    """What :func:`register_model` requires of a model class."""

    config_class: type[Any]

    def __init__(self, config: Any) -> None: ...


_ARCHITECTURES: dict[str, type[nn.Module]] = {}

ModelT = TypeVar("ModelT", bound=type[nn.Module])


def register_model(name: str) -> Callable[[ModelT], ModelT]:
    """Class decorator: register ``cls`` under ``name``; ``cls.config_class`` is a dataclass."""

    def decorate(cls: ModelT) -> ModelT:
        config_class = getattr(cls, "config_class", None)
        if config_class is None or not dataclasses.is_dataclass(config_class):
            raise TypeError(f"{cls.__name__} needs a dataclass attribute 'config_class'")
        existing = _ARCHITECTURES.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"architecture name {name!r} is already taken by {existing!r}")
        _ARCHITECTURES[name] = cls
        cls.architecture = name  # type: ignore[attr-defined]
        return cls

    return decorate


def architecture_name(model: nn.Module) -> str:
    """The registered name of ``model``'s class; a clear error for unregistered modules."""
    name = getattr(type(model), "architecture", None)
    if not isinstance(name, str) or _ARCHITECTURES.get(name) is not type(model):
        raise CheckpointError(
            f"{type(model).__name__} is not a registered architecture, so it could not be "
            "rebuilt on load; decorate its class with @advdefense.register_model(NAME)"
        )
    return name


def get_architecture(name: str) -> type[nn.Module]:
    """The class registered under ``name``."""
    _import_builtin_models()
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(_ARCHITECTURES)) or "none"
        raise CheckpointError(
            f"unknown architecture {name!r}; registered architectures: {known}. If it comes from "
            "a plugin, import the module that registers it before loading"
        ) from None


def list_architectures() -> list[str]:
    """Names of every registered architecture, sorted."""
    _import_builtin_models()
    return sorted(_ARCHITECTURES)


def _import_builtin_models() -> None:
    """Import the library's own model modules, which register themselves on import."""
    import advdefense.defenses.dim
    import advdefense.defenses.kde
    import advdefense.defenses.mahalanobis
    import advdefense.nn  # noqa: F401
