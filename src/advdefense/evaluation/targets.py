"""What an attack runs on, read from the defense's declaration (:mod:`advdefense.declaration`).

For each attack entry the harness picks the modules to attack:

* an entry naming a ``score_view`` runs on that view (skipped when the model has none);
* a gradient-based entry on a defense with ``surrogates`` runs once on each surrogate (BPDA);
* everything else runs on the model itself.

Whatever was attacked, adversarials are judged by the real model; a defense that binarizes its
input has each adversarial refined first by Foolbox's ``BinarizationRefinementAttack`` (the DIM
paper's fine-tune projection, Appendix A.2: a pixel whose binarized value did not change goes
back to its clean value, one that flipped moves to just across the threshold, which is at least
as close as the paper's "0 or 0.5" and gives the same binarized input).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from foolbox.attacks.binarization import BinarizationRefinementAttack
from foolbox.criteria import Misclassification
from foolbox.models.pytorch import PyTorchModel
from torch import nn

from advdefense.attacks.catalog import AttackEntry
from advdefense.declaration import AttackDeclaration
from advdefense.evaluation.counting import CallCounter

__all__ = ["AttackTarget", "attack_targets", "refine_binarized"]

MODEL_TARGET = "model"


@dataclass(frozen=True)
class AttackTarget:
    """One module an attack runs on: its name (``model``, a surrogate or a view) and wrapper."""

    name: str
    foolbox_model: PyTorchModel
    counter: CallCounter | None = None  # counts calls to a surrogate or view


def attack_targets(
    entry: AttackEntry,
    declaration: AttackDeclaration,
    foolbox_model: PyTorchModel,
    device: torch.device,
    on_forward: Callable[[], None] | None = None,
) -> list[AttackTarget]:
    """The targets ``entry`` runs on (empty: the model lacks the entry's score view).

    ``on_forward`` is called after each forward pass through a surrogate or view (the model's
    own passes are counted by the caller's wrapper).
    """
    modules: Mapping[str, nn.Module]
    if entry.score_view is not None:
        view = declaration.score_views.get(entry.score_view)
        modules = {} if view is None else {entry.score_view: view}
    elif entry.uses_gradients and declaration.surrogates:
        modules = declaration.surrogates
    else:
        return [AttackTarget(MODEL_TARGET, foolbox_model)]
    targets = []
    for name, module in modules.items():
        counter = CallCounter(module.eval(), on_forward)
        targets.append(
            AttackTarget(name, PyTorchModel(counter, bounds=(0.0, 1.0), device=device), counter)
        )
    return targets


def refine_binarized(
    foolbox_model: PyTorchModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    adversarials: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """Foolbox's binarization refinement of ``adversarials`` (same binarized input, closer).

    Raises ``ValueError`` when the refined images are classified differently, i.e. the model
    does not binarize at ``threshold`` as declared.
    """
    attack = BinarizationRefinementAttack(threshold=threshold, included_in="upper")
    refined: torch.Tensor = attack.run(
        foolbox_model,
        images,
        Misclassification(labels),
        starting_points=adversarials.clamp(0.0, 1.0),
    )
    return refined
