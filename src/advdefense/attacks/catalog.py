"""The attack catalogue: every named attack configuration, each an id, a norm and a Foolbox 3 class.

An :class:`AttackEntry` is one configuration (class + parameters + how to run it). Suites
(:mod:`advdefense.attacks.suites`) are ordered selections of these entries; ``ATTACKS`` holds every
entry of every suite, so an id found in a run record always resolves to one configuration.

Ids follow the row names of Table 3 of the DIM paper (Appendix A), made slug-like: norm prefix,
the class name without ``Attack`` split into words, or the paper's own abbreviation where it gives
one (``l2-fgm``, ``l2-gn``). The entries keep Foolbox's default parameters; the only parameter set
is ``distance`` for the attacks whose norm is chosen at construction
(``FlexibleDistanceMinimizationAttack`` subclasses). ``DEMO_ATTACKS`` is what ``advdefense demo``
runs; its ids (``fgsm``, ``linf-pgd``, ``l2-pgd``, ``l2-deepfool``) keep their meaning.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from foolbox.attacks.additive_noise import (
    L2AdditiveGaussianNoiseAttack,
    L2AdditiveUniformNoiseAttack,
    L2ClippingAwareAdditiveGaussianNoiseAttack,
    L2ClippingAwareAdditiveUniformNoiseAttack,
    L2ClippingAwareRepeatedAdditiveGaussianNoiseAttack,
    L2ClippingAwareRepeatedAdditiveUniformNoiseAttack,
    L2RepeatedAdditiveGaussianNoiseAttack,
    L2RepeatedAdditiveUniformNoiseAttack,
    LinfAdditiveUniformNoiseAttack,
    LinfRepeatedAdditiveUniformNoiseAttack,
)
from foolbox.attacks.base import MinimizationAttack
from foolbox.attacks.basic_iterative_method import L2BasicIterativeAttack, LinfBasicIterativeAttack
from foolbox.attacks.blended_noise import LinearSearchBlendedUniformNoiseAttack
from foolbox.attacks.blur import GaussianBlurAttack
from foolbox.attacks.boundary_attack import BoundaryAttack
from foolbox.attacks.brendel_bethge import (
    BrendelBethgeAttack,
    L0BrendelBethgeAttack,
    L1BrendelBethgeAttack,
    L2BrendelBethgeAttack,
    LinfinityBrendelBethgeAttack,
)
from foolbox.attacks.carlini_wagner import L2CarliniWagnerAttack
from foolbox.attacks.contrast import L2ContrastReductionAttack
from foolbox.attacks.contrast_min import (
    BinarySearchContrastReductionAttack,
    LinearSearchContrastReductionAttack,
)
from foolbox.attacks.ddn import DDNAttack
from foolbox.attacks.deepfool import DeepFoolAttack, L2DeepFoolAttack, LinfDeepFoolAttack
from foolbox.attacks.ead import EADAttack
from foolbox.attacks.fast_gradient_method import (
    L1FastGradientAttack,
    L2FastGradientAttack,
    LinfFastGradientAttack,
)
from foolbox.attacks.fast_minimum_norm import (
    FMNAttackLp,
    L0FMNAttack,
    L1FMNAttack,
    L2FMNAttack,
    LInfFMNAttack,
)
from foolbox.attacks.gradient_descent_base import BaseGradientDescent
from foolbox.attacks.inversion import InversionAttack
from foolbox.attacks.pointwise import PointwiseAttack
from foolbox.attacks.projected_gradient_descent import (
    L1ProjectedGradientDescentAttack,
    L2ProjectedGradientDescentAttack,
    LinfProjectedGradientDescentAttack,
)
from foolbox.attacks.saltandpepper import SaltAndPepperNoiseAttack
from foolbox.distances import LpDistance, l1, l2, linf

from advdefense.attacks.adaptive import (
    AllTargetsAttack,
    L2DLRAllTargetsAttack,
    L2MarginAllTargetsAttack,
    LinfDLRAllTargetsAttack,
    LinfMarginAllTargetsAttack,
)
from advdefense.attacks.jsma import SaliencyMapAttack
from advdefense.attacks.norms import NORMS, Norm
from advdefense.errors import InputError, UserError

__all__ = ["ATTACKS", "DEMO_ATTACKS", "AttackEntry", "get_attack"]

# Attacks that differentiate the model (everything else only queries its decisions or scores).
_GRADIENT_BASED: tuple[type, ...] = (
    AllTargetsAttack,
    BaseGradientDescent,
    BrendelBethgeAttack,
    DDNAttack,
    DeepFoolAttack,
    EADAttack,
    FMNAttackLp,
    L2CarliniWagnerAttack,
    SaliencyMapAttack,
)

# One-step gradient attacks (FGSM, FGM): any working iterative attack of the norm beats them.
_SINGLE_STEP: tuple[type, ...] = (
    L1FastGradientAttack,
    L2FastGradientAttack,
    LinfFastGradientAttack,
)


@dataclass(frozen=True)
class AttackEntry:
    """One attack configuration; ``build()`` returns a fresh Foolbox attack object.

    Attributes:
        id: Unique slug, e.g. ``l2-carlini-wagner``.
        norm: The norm the attack minimizes or is bounded in, and in which results are measured.
        factory: The Foolbox attack class (or any callable returning an attack).
        parameters: Keyword arguments for ``factory``; Foolbox defaults are left out.
        description: One line for reports.
        paper_name: The row name in the DIM paper's Table 3, or "" if the entry is not a row.
        needs_starting_point: The attack refines an adversarial it is given. The starting points
            reach Foolbox 3.3.4 as ``attack(model, inputs, labels, epsilons=[None],
            starting_points=...)``: ``MinimizationAttack.__call__`` forwards extra keyword
            arguments to ``run(model, inputs, criterion, *, early_stop, starting_points)``.
            Without them Boundary and Brendel-Bethge fall back to a blended-noise search and
            Pointwise to salt-and-pepper noise, and raise when that fails on any input.
        start_from: Id of the entry whose adversarials serve as starting points; None means the
            best adversarial the run's earlier attacks found for the sample.
        restarts: Independent runs (fresh seed each); the smallest successful result is kept.
        cost: Approximate model evaluations per sample with these parameters, for ordering.
        requires: Python modules the attack needs beyond Foolbox (Brendel-Bethge: ``numba``).
        score_view: A score view the attack runs on (see :mod:`advdefense.declaration`), e.g.
            ``internal-intensity`` for DIM's internal attack; models without it skip the entry.
        checks_convergence_of: Id of the entry this one reruns with more steps and restarts;
            a sanity flag compares the two (DESIGN.md §3.5). Not part of a record's key.
        solver_timeout: Seconds one per-sample solve of a Brendel-Bethge step may take before it
            is abandoned (:mod:`advdefense.attacks.solver_watchdog`: Foolbox's solver can loop
            forever); None runs the attack unwatched. Not part of a record's key: it changes
            nothing on samples whose solves return.
    """

    id: str
    norm: Norm
    factory: Callable[..., Any]
    parameters: Mapping[str, Any]
    description: str
    paper_name: str = ""
    needs_starting_point: bool = False
    start_from: str | None = None
    restarts: int = 1
    cost: int = 1
    requires: tuple[str, ...] = field(default=())
    score_view: str | None = None
    checks_convergence_of: str | None = None
    solver_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise InputError(f"attack {self.id!r}: unknown norm {self.norm!r}; use one of {NORMS}")
        if self.restarts < 1 or self.cost < 1:
            raise InputError(
                f"attack {self.id!r}: restarts and cost must be >= 1, "
                f"got {self.restarts} and {self.cost}"
            )
        if self.solver_timeout is not None and not self.solver_timeout > 0:
            raise InputError(
                f"attack {self.id!r}: solver_timeout must be > 0 seconds or None, "
                f"got {self.solver_timeout!r}"
            )
        if self.start_from is not None and not self.needs_starting_point:
            raise InputError(
                f"attack {self.id!r}: start_from={self.start_from!r} needs "
                "needs_starting_point=True"
            )

    @property
    def minimization(self) -> bool:
        """True for Foolbox ``MinimizationAttack`` classes, False for fixed-epsilon ones.

        A minimization attack runs once (``epsilons=[None]``) and returns the smallest adversarial
        it finds; a fixed-epsilon attack must be run once per epsilon.
        """
        return isinstance(self.factory, type) and issubclass(self.factory, MinimizationAttack)

    @property
    def uses_gradients(self) -> bool:
        """True when the attack differentiates the model, so a defense's surrogates apply."""
        return isinstance(self.factory, type) and issubclass(self.factory, _GRADIENT_BASED)

    @property
    def single_step(self) -> bool:
        """True for one-step gradient attacks (FGSM, FGM), which iterative ones should beat."""
        return isinstance(self.factory, type) and issubclass(self.factory, _SINGLE_STEP)

    @property
    def black_box(self) -> bool:
        """True for attacks that only query the model, from no other attack's adversarials.

        Refining attacks (Boundary, Pointwise) start from what earlier, possibly white-box,
        attacks found, so they are neither black- nor white-box evidence.
        """
        return not self.uses_gradients and not self.needs_starting_point

    def build(self) -> Any:
        """A fresh attack object; a clear error if a required module is missing."""
        missing = [name for name in self.requires if importlib.util.find_spec(name) is None]
        if missing:
            raise UserError(
                f"attack {self.id!r} needs the Python package(s) {', '.join(missing)}; "
                f"install them with `pip install {' '.join(missing)}`"
            )
        return self.factory(**self.parameters)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description of the configuration, for run records."""
        return {
            "id": self.id,
            "norm": self.norm,
            "attack": f"{self.factory.__module__}.{getattr(self.factory, '__qualname__', '?')}",
            "parameters": {key: _json_value(value) for key, value in self.parameters.items()},
            "paper_name": self.paper_name,
            "minimization": self.minimization,
            "needs_starting_point": self.needs_starting_point,
            "start_from": self.start_from,
            "restarts": self.restarts,
            "cost": self.cost,
            "score_view": self.score_view,
        }


def _json_value(value: Any) -> Any:
    if isinstance(value, LpDistance):
        return "linf" if math.isinf(value.p) else f"l{int(value.p)}"
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _entry(
    id: str,
    norm: Norm,
    factory: Callable[..., Any],
    description: str,
    *,
    cost: int,
    paper_name: str = "",
    parameters: Mapping[str, Any] | None = None,
    needs_starting_point: bool = False,
    start_from: str | None = None,
    restarts: int = 1,
    requires: tuple[str, ...] = (),
    score_view: str | None = None,
    checks_convergence_of: str | None = None,
    solver_timeout: float | None = None,
) -> AttackEntry:
    return AttackEntry(
        id=id,
        norm=norm,
        factory=factory,
        parameters=MappingProxyType(dict(parameters or {})),
        description=description,
        paper_name=paper_name,
        needs_starting_point=needs_starting_point,
        start_from=start_from,
        restarts=restarts,
        cost=cost,
        requires=requires,
        score_view=score_view,
        checks_convergence_of=checks_convergence_of,
        solver_timeout=solver_timeout,
    )


_DISTANCES = {"l1": l1, "l2": l2, "linf": linf}
_PREFIX: dict[Norm, str] = {"l0": "L₀", "l1": "L₁", "l2": "L₂", "linf": "L∞"}


def _flexible(norm: Norm, stem: str, factory: Callable[..., Any], cost: int) -> AttackEntry:
    """A ``FlexibleDistanceMinimizationAttack`` run in ``norm`` (``distance`` set accordingly)."""
    words = "-".join(_split_camel(stem))
    return _entry(
        f"{norm}-{words}",
        norm,
        factory,
        f"{stem}Attack minimizing the {norm} distance (Foolbox defaults)",
        paper_name=f"{_PREFIX[norm]} {stem}Attack",
        parameters={"distance": _DISTANCES[norm]},
        cost=cost,
    )


def _split_camel(name: str) -> list[str]:
    words: list[str] = []
    for char in name:
        if char.isupper() or not words:
            words.append(char.lower())
        else:
            words[-1] += char
    return words


_BB_NOTE = "needs an adversarial starting point and numba"
# A solve takes milliseconds on 28 x 28 images; the limit leaves room for slow machines, large
# inputs and Numba compiling in a fresh worker.
BB_SOLVER_TIMEOUT = 300.0
_FMN: tuple[tuple[Norm, Callable[..., Any]], ...] = (
    ("l0", L0FMNAttack),
    ("l1", L1FMNAttack),
    ("l2", L2FMNAttack),
    ("linf", LInfFMNAttack),
)
# Brendel-Bethge refining a PGD adversarial (any adversarial is a valid start; L0 uses L1 PGD).
_BB_FROM_PGD: tuple[tuple[Norm, Callable[..., Any], str], ...] = (
    ("l0", L0BrendelBethgeAttack, "l1-pgd"),
    ("l1", L1BrendelBethgeAttack, "l1-pgd"),
    ("l2", L2BrendelBethgeAttack, "l2-pgd"),
    ("linf", LinfinityBrendelBethgeAttack, "linf-pgd"),
)

# Table 3 of the DIM paper, in its row order, then the entries of the other suites.
_ENTRIES: tuple[AttackEntry, ...] = (
    # ---- L2 (22) ----
    _entry(
        "l2-contrast-reduction",
        "l2",
        L2ContrastReductionAttack,
        "Reduces contrast towards 0.5 within the L2 budget, one step (Foolbox defaults)",
        paper_name="L₂ ContrastReductionAttack",
        cost=1,
    ),
    _entry(
        "l2-ddn",
        "l2",
        DDNAttack,
        "Decoupled direction and norm, 100 steps (Rony 2019; Foolbox 3.3 defaults; 3.2.1: 10)",
        paper_name="L₂ DDNAttack",
        cost=100,
    ),
    _entry(
        "l2-pgd",
        "l2",
        L2ProjectedGradientDescentAttack,
        "L2 PGD with random start, 50 steps (Foolbox defaults)",
        paper_name="L₂ PGD",
        cost=50,
    ),
    _entry(
        "l2-basic-iterative",
        "l2",
        L2BasicIterativeAttack,
        "L2 basic iterative method, 10 steps (Kurakin 2016; Foolbox defaults)",
        paper_name="L₂ BasicIterativeAttack",
        cost=10,
    ),
    _entry(
        "l2-fgm",
        "l2",
        L2FastGradientAttack,
        "Fast gradient method, one L2-normalized step (Foolbox defaults)",
        paper_name="L₂ FastGradientAttack (FGM)",
        cost=1,
    ),
    _entry(
        "l2-gn",
        "l2",
        L2AdditiveGaussianNoiseAttack,
        "Additive Gaussian noise scaled to the L2 budget (Foolbox defaults)",
        paper_name="L₂ AdditiveGaussianNoiseAttack (GN)",
        cost=1,
    ),
    _entry(
        "l2-un",
        "l2",
        L2AdditiveUniformNoiseAttack,
        "Additive uniform noise scaled to the L2 budget (Foolbox defaults)",
        paper_name="L₂ AdditiveUniformNoiseAttack (UN)",
        cost=1,
    ),
    _entry(
        "l2-clipping-aware-gn",
        "l2",
        L2ClippingAwareAdditiveGaussianNoiseAttack,
        "Gaussian noise rescaled so the clipped noise has the L2 budget (Rauber 2020)",
        paper_name="L₂ ClippingAwareGN",
        cost=1,
    ),
    _entry(
        "l2-clipping-aware-un",
        "l2",
        L2ClippingAwareAdditiveUniformNoiseAttack,
        "Uniform noise rescaled so the clipped noise has the L2 budget (Rauber 2020)",
        paper_name="L₂ ClippingAwareUN",
        cost=1,
    ),
    _entry(
        "l2-repeated-gn",
        "l2",
        L2RepeatedAdditiveGaussianNoiseAttack,
        "Additive Gaussian noise, 100 draws (Foolbox defaults)",
        paper_name="L₂ RepeatedGN",
        cost=100,
    ),
    _entry(
        "l2-repeated-un",
        "l2",
        L2RepeatedAdditiveUniformNoiseAttack,
        "Additive uniform noise, 100 draws (Foolbox defaults)",
        paper_name="L₂ RepeatedUN",
        cost=100,
    ),
    _entry(
        "l2-clipping-aware-repeated-gn",
        "l2",
        L2ClippingAwareRepeatedAdditiveGaussianNoiseAttack,
        "Clipping-aware Gaussian noise, 100 draws (Foolbox defaults)",
        paper_name="L₂ ClippingAwareRepeatedGN",
        cost=100,
    ),
    _entry(
        "l2-clipping-aware-repeated-un",
        "l2",
        L2ClippingAwareRepeatedAdditiveUniformNoiseAttack,
        "Clipping-aware uniform noise, 100 draws (Foolbox defaults)",
        paper_name="L₂ ClippingAwareRepeatedUN",
        cost=100,
    ),
    _entry(
        "l2-deepfool",
        "l2",
        L2DeepFoolAttack,
        "L2 DeepFool, 50 steps, overshoot 0.02 (Moosavi-Dezfooli 2016; Foolbox defaults)",
        paper_name="L₂ DeepFoolAttack",
        cost=500,
    ),
    _flexible("l2", "Inversion", InversionAttack, cost=1),
    _flexible("l2", "BinarySearchContrastReduction", BinarySearchContrastReductionAttack, 15),
    _flexible("l2", "LinearSearchContrastReduction", LinearSearchContrastReductionAttack, 1000),
    _flexible("l2", "GaussianBlur", GaussianBlurAttack, cost=1000),
    _entry(
        "l2-carlini-wagner",
        "l2",
        L2CarliniWagnerAttack,
        "Carlini-Wagner L2, 9 binary-search steps x 10,000 Adam steps (Foolbox defaults)",
        paper_name="L₂ CarliniWagnerAttack",
        cost=90_000,
    ),
    _entry(
        "l2-brendel-bethge",
        "l2",
        L2BrendelBethgeAttack,
        f"Brendel-Bethge L2, 1000 steps (Brendel 2019; Foolbox defaults); {_BB_NOTE}",
        paper_name="L₂ BrendelBethgeAttack",
        needs_starting_point=True,
        requires=("numba",),
        solver_timeout=BB_SOLVER_TIMEOUT,
        cost=2000,
    ),
    _entry(
        "l2-boundary",
        "l2",
        BoundaryAttack,
        "Decision-based boundary attack, 25,000 steps (Brendel 2018; Foolbox defaults); "
        "needs an adversarial starting point",
        paper_name="L₂ BoundaryAttack",
        needs_starting_point=True,
        cost=50_000,
    ),
    _entry(
        "l2-linear-search-blended-uniform-noise",
        "l2",
        LinearSearchBlendedUniformNoiseAttack,
        "Blends in uniform noise until misclassified, L2 (Foolbox defaults). Not a row of "
        "Table 3, which lists 21 L2 attacks although the paper counts 22: inferred because the "
        "paper runs this attack in L1 and L-inf next to the same four siblings it runs in L2",
        parameters={"distance": l2},
        cost=2000,
    ),
    # ---- L-inf (12) ----
    _entry(
        "linf-pgd",
        "linf",
        LinfProjectedGradientDescentAttack,
        "L-inf PGD with random start, 40 steps (Madry 2018; Foolbox defaults)",
        paper_name="L∞ PGD",
        cost=40,
    ),
    _entry(
        "linf-basic-iterative",
        "linf",
        LinfBasicIterativeAttack,
        "L-inf basic iterative method, 10 steps (Kurakin 2016; Foolbox defaults)",
        paper_name="L∞ BasicIterativeAttack",
        cost=10,
    ),
    _entry(
        "linf-fgsm",
        "linf",
        LinfFastGradientAttack,
        "Fast gradient sign method (Goodfellow 2015)",
        paper_name="L∞ FastGradientAttack (FGSM)",
        cost=1,
    ),
    _entry(
        "linf-additive-uniform-noise",
        "linf",
        LinfAdditiveUniformNoiseAttack,
        "Additive uniform noise within the L-inf budget (Foolbox defaults)",
        paper_name="L∞ AdditiveUniformNoiseAttack",
        cost=1,
    ),
    _entry(
        "linf-repeated-additive-uniform-noise",
        "linf",
        LinfRepeatedAdditiveUniformNoiseAttack,
        "Additive uniform noise within the L-inf budget, 100 draws (Foolbox defaults)",
        paper_name="L∞ RepeatedAdditiveUniformNoiseAttack",
        cost=100,
    ),
    _entry(
        "linf-deepfool",
        "linf",
        LinfDeepFoolAttack,
        "L-inf DeepFool, 50 steps, overshoot 0.02 (Moosavi-Dezfooli 2016; Foolbox defaults)",
        paper_name="L∞ DeepFoolAttack",
        cost=500,
    ),
    _flexible("linf", "Inversion", InversionAttack, cost=1),
    _flexible("linf", "BinarySearchContrastReduction", BinarySearchContrastReductionAttack, 15),
    _flexible("linf", "LinearSearchContrastReduction", LinearSearchContrastReductionAttack, 1000),
    _flexible("linf", "GaussianBlur", GaussianBlurAttack, cost=1000),
    _flexible(
        "linf", "LinearSearchBlendedUniformNoise", LinearSearchBlendedUniformNoiseAttack, 2000
    ),
    _entry(
        "linf-brendel-bethge",
        "linf",
        LinfinityBrendelBethgeAttack,
        f"Brendel-Bethge L-inf, 1000 steps (Brendel 2019; Foolbox defaults); {_BB_NOTE}",
        paper_name="L∞ BrendelBethgeAttack",
        needs_starting_point=True,
        requires=("numba",),
        solver_timeout=BB_SOLVER_TIMEOUT,
        cost=2000,
    ),
    # ---- L0 (2) ----
    _entry(
        "l0-salt-and-pepper",
        "l0",
        SaltAndPepperNoiseAttack,
        "Salt-and-pepper noise of growing density, 1000 steps (Foolbox defaults; Foolbox keeps "
        "the draw with the smallest L2 norm)",
        paper_name="SaltAndPepperAttack",
        cost=1000,
    ),
    _entry(
        "l0-pointwise-x10",
        "l0",
        PointwiseAttack,
        "Pointwise attack (Schott 2019), 10 restarts, best kept; resets pixels to the original "
        "in random order, then binary-searches each remaining pixel; needs a starting point",
        paper_name="Pointwise \u00d7 10",  # the paper writes a multiplication sign
        needs_starting_point=True,
        restarts=10,
        cost=100_000,
    ),
    # ---- L1 (6) ----
    _flexible("l1", "Inversion", InversionAttack, cost=1),
    _flexible("l1", "BinarySearchContrastReduction", BinarySearchContrastReductionAttack, 15),
    _flexible("l1", "LinearSearchContrastReduction", LinearSearchContrastReductionAttack, 1000),
    _flexible("l1", "GaussianBlur", GaussianBlurAttack, cost=1000),
    _flexible("l1", "LinearSearchBlendedUniformNoise", LinearSearchBlendedUniformNoiseAttack, 2000),
    _entry(
        "l1-brendel-bethge",
        "l1",
        L1BrendelBethgeAttack,
        f"Brendel-Bethge L1, 1000 steps (Brendel 2019; Foolbox defaults); {_BB_NOTE}",
        paper_name="L₁ BrendelBethgeAttack",
        needs_starting_point=True,
        requires=("numba",),
        solver_timeout=BB_SOLVER_TIMEOUT,
        cost=2000,
    ),
    # ---- not in the DIM paper ----
    _entry(
        "fgsm",
        "linf",
        LinfFastGradientAttack,
        "Fast gradient sign method (Goodfellow 2015); same configuration as linf-fgsm",
        cost=1,
    ),
    _entry(
        "l1-pgd",
        "l1",
        L1ProjectedGradientDescentAttack,
        "L1 PGD with random start, 50 steps (Foolbox defaults)",
        cost=50,
    ),
    *(
        _entry(
            f"{norm}-fmn",
            norm,
            factory,
            f"Fast minimum-norm attack, {norm}, 100 steps (Pintor 2021; Foolbox defaults)",
            cost=100,
        )
        for norm, factory in _FMN
    ),
    *(
        _entry(
            f"{norm}-brendel-bethge-from-pgd",
            norm,
            factory,
            f"Brendel-Bethge {norm}, 1000 steps, started from the adversarials of {start} "
            "(Brendel 2019; Foolbox defaults); needs numba",
            needs_starting_point=True,
            start_from=start,
            requires=("numba",),
            solver_timeout=BB_SOLVER_TIMEOUT,
            cost=2000,
        )
        for norm, factory, start in _BB_FROM_PGD
    ),
)

ADAPTIVE_STEPS = 100
_ADAPTIVE: tuple[tuple[Norm, str, type[AllTargetsAttack]], ...] = (
    ("linf", "margin", LinfMarginAllTargetsAttack),
    ("l2", "margin", L2MarginAllTargetsAttack),
    ("linf", "dlr", LinfDLRAllTargetsAttack),
    ("l2", "dlr", L2DLRAllTargetsAttack),
)
_ADAPTIVE_ENTRIES: tuple[AttackEntry, ...] = (
    *(
        _entry(
            f"{norm}-{loss}-all-targets",
            norm,
            factory,
            f"{norm} PGD on the targeted {loss} loss towards each other class, "
            f"{ADAPTIVE_STEPS} steps, random start (adaptive; Foolbox PGD step sizes)",
            parameters={"steps": ADAPTIVE_STEPS},
            cost=9 * ADAPTIVE_STEPS,
        )
        for norm, loss, factory in _ADAPTIVE
    ),
    *(
        _entry(
            f"{norm}-internal-all-targets",
            norm,
            factory,
            f"Internal attack: {norm} PGD maximizing ||F_t(D(x))||_1 - max_j!=t ||F_j(D(x))||_1 "
            f"towards each other class t, {ADAPTIVE_STEPS} steps (margin loss on the "
            "internal-intensity view)",
            parameters={"steps": ADAPTIVE_STEPS},
            cost=9 * ADAPTIVE_STEPS,
            score_view="internal-intensity",
        )
        for norm, loss, factory in _ADAPTIVE
        if loss == "margin"
    ),
)
# The gray-box attacks of the PDM paper (Sec. 4, Appendix C), which used Cleverhans v2.1: FGSM and
# BIM are the catalogue's linf-fgsm and linf-basic-iterative (10 steps), run at fixed epsilons.
# Parameters the paper does not state: the initial constant 0.01 is Cleverhans' default (Foolbox:
# 0.001); the Adam step size stays Foolbox's 0.01 (Cleverhans: 0.005, the weaker of the two).
_CLEVERHANS_INITIAL_CONST = 1e-2
_PDM_ENTRIES: tuple[AttackEntry, ...] = (
    _entry(
        "l2-carlini-wagner-10x9",
        "l2",
        L2CarliniWagnerAttack,
        "Carlini-Wagner L2 of the PDM paper (App. C, 'C&W'): 9 binary-search steps x 10 Adam "
        "steps, confidence 0, initial constant 0.01 (Cleverhans default), step size 0.01",
        parameters={
            "steps": 10,
            "binary_search_steps": 9,
            "confidence": 0.0,
            "initial_const": _CLEVERHANS_INITIAL_CONST,
        },
        cost=90,
    ),
    _entry(
        "l0-jsma",
        "l0",
        SaliencyMapAttack,
        "JSMA (Papernot 2016) of the PDM paper (App. C): at most 100 iterations of the pair "
        "saliency map, theta 1, gamma 1 (Cleverhans defaults), a random target per sample",
        parameters={"theta": 1.0, "gamma": 1.0, "max_iterations": 100},
        cost=200,
    ),
    _entry(
        "l2-carlini-wagner-hc-1000x9",
        "l2",
        L2CarliniWagnerAttack,
        "High-confidence Carlini-Wagner L2 of the PDM paper (App. C, 'C&W-hc'): 9 binary-search "
        "steps x 1,000 Adam steps, confidence 10, initial constant 0.01, step size 0.01",
        parameters={
            "steps": 1000,
            "binary_search_steps": 9,
            "confidence": 10.0,
            "initial_const": _CLEVERHANS_INITIAL_CONST,
        },
        cost=9000,
    ),
)
# DESIGN.md §3.5, "more steps or restarts change little": each PGD entry rerun with 5x its steps
# (same step size, so 5x the reach) and 5 random restarts, best kept. A sanity flag reports when
# the longer run breaks more samples than the original beyond noise.
CONVERGENCE_FACTOR = 5
_PGD: tuple[tuple[Norm, Callable[..., Any], int], ...] = (  # Foolbox 3.3.4's default steps
    ("l1", L1ProjectedGradientDescentAttack, 50),
    ("l2", L2ProjectedGradientDescentAttack, 50),
    ("linf", LinfProjectedGradientDescentAttack, 40),
)
_CONVERGENCE_ENTRIES: tuple[AttackEntry, ...] = tuple(
    _entry(
        f"{norm}-pgd-long",
        norm,
        factory,
        f"{norm} PGD, {CONVERGENCE_FACTOR * steps} steps ({CONVERGENCE_FACTOR}x {norm}-pgd's) "
        f"and {CONVERGENCE_FACTOR} random restarts, best kept: is {norm}-pgd converged?",
        parameters={"steps": CONVERGENCE_FACTOR * steps},
        restarts=CONVERGENCE_FACTOR,
        cost=CONVERGENCE_FACTOR**2 * steps,
        checks_convergence_of=f"{norm}-pgd",
    )
    for norm, factory, steps in _PGD
)
_ALL_ENTRIES = (*_ENTRIES, *_ADAPTIVE_ENTRIES, *_PDM_ENTRIES, *_CONVERGENCE_ENTRIES)

ATTACKS: Mapping[str, AttackEntry] = MappingProxyType({entry.id: entry for entry in _ALL_ENTRIES})
if len(ATTACKS) != len(_ALL_ENTRIES):  # pragma: no cover - guards edits of the table above
    raise RuntimeError("duplicate attack ids in the catalogue")

DEMO_ATTACKS: tuple[str, ...] = ("fgsm", "linf-pgd", "l2-pgd", "l2-deepfool")


def get_attack(attack_id: str) -> AttackEntry:
    """The catalogue entry ``attack_id``, or an error listing the known ids."""
    try:
        return ATTACKS[attack_id]
    except KeyError:
        raise InputError(
            f"unknown attack {attack_id!r}; known attacks: {', '.join(sorted(ATTACKS))}"
        ) from None
