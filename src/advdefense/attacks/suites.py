"""Attack suites: named, versioned, ordered selections of catalogue entries.

``dim42``
    The 42 attacks of the DIM paper (Table 3, Appendix A): 22 L2, 12 L-inf, 6 L1 and 2 L0, as
    Foolbox 3.3.4 classes with their default parameters. Table 3 lists only 21 L2 rows although
    the paper counts 22; the 22nd, ``l2-linear-search-blended-uniform-noise`` (no
    ``paper_name``), is inferred: the paper runs the blended-noise search in L1 and L-inf next to
    the four distance-parameterized siblings (inversion, two contrast reductions, blur) it also
    runs in L2. "Pointwise x 10" is Foolbox's Pointwise attack with 10 restarts, best kept.
``quick``
    FGSM, L-inf PGD, L2 PGD, DDN, L2 DeepFool and additive Gaussian noise: demos and tests.
``adaptive``
    What the DIM paper did not run (DESIGN.md §3.4): L-inf and L2 PGD, 100 steps, on the
    targeted margin and DLR losses towards each of the K - 1 other classes, and the internal
    attack (the margin loss on a defense's ``internal-intensity`` score view; models without
    that view skip it). See :mod:`advdefense.attacks.adaptive`.
``quick-adaptive``
    ``quick`` then ``adaptive``, for fixed mode (AutoAttack's protocol: each attack only on the
    samples still robust), which makes the expensive all-targets attacks cheap.
``pdm-graybox``
    The gray-box attacks of the PDM paper (Sec. 4, Appendix C; Cleverhans v2.1 there): FGSM, BIM
    (10 steps), C&W L2 (9 x 10 steps, confidence 0), JSMA (at most 100 iterations, theta 1,
    gamma 1, random targets) and C&W-hc (9 x 1,000 steps, confidence 10). The paper runs FGSM
    and BIM at the fixed epsilons 0.05 and 0.1 and the others unbounded: run the L-inf entries
    in minimal mode with one grid point at each epsilon (``grid_points=1``), the others with a
    threshold no adversarial can exceed.
``minimal``
    Strong minimal-norm attacks for median distances: FMN in L0/L1/L2/L-inf, DDN, and
    Brendel-Bethge in each norm started from a PGD adversarial (``start_from``). PGD is a
    fixed-epsilon attack; run it at the largest epsilon of the grid when its adversarials only
    serve as starting points.

Entries are stored cheapest first (``AttackEntry.cost``), so that attacks needing a starting
point follow cheap attacks whose adversarials can serve as one, and expensive attacks (C&W: 9 x
10,000 steps, about 15 minutes per 50 MNIST samples on 2 cores; Boundary: 25,000 steps; Pointwise
x 10) run last. ``DIM42_TABLE_ORDER`` keeps the paper's row order for reports.

Foolbox 3.3.4 against the 3.2.1 the paper used (the two releases' sources compared file by file):

- ``DDNAttack``: default ``steps`` 10 -> 100, and 3.2.1's cosine step-size schedule compounded
  on its own previous value (it decayed much faster than intended); fixed in 3.3.
- ``SaltAndPepperNoiseAttack``: 3.2.1 kept the draw with the smallest L2 norm of the noisy
  *image*; 3.3 uses the norm of the perturbation, as intended. In both its ``distance`` is L2,
  so it is run unbounded here and its L0 distance measured afterwards.
- ``PointwiseAttack`` is not in 3.2.1 (the paper used Foolbox 2.4.0's). 3.3's batched port has
  the same two phases (reset pixels to the original in random order, then a 10-step binary search
  per remaining pixel) and draws its order from ``np.random``; it has no ``distance``, so it can
  only be called with ``epsilons=[None]``.
- FMN (``L0FMNAttack`` ... ``LInfFMNAttack``) is new in 3.3 (``minimal`` only); ``HopSkipJump``
  was renamed ``HopSkipJumpAttack`` (not used here).
- Brendel-Bethge: 3.3 adds small constants against divisions by zero in the trust-region
  solvers; defaults unchanged.
- Every 3.3 attack asserts that its inputs lie within the model's bounds.
- C&W moved its Adam optimizer into ``gradient_descent_base`` and PGD/BIM/FGM gained targeted
  support; the untargeted updates are unchanged. All other defaults, and which classes are
  minimization or fixed-epsilon attacks, are identical in both versions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from advdefense.attacks.catalog import ATTACKS, AttackEntry
from advdefense.attacks.norms import NORMS, Norm
from advdefense.errors import InputError

__all__ = ["DIM42_TABLE_ORDER", "PDM_GRAYBOX_IDS", "SUITES", "AttackSuite", "get_suite"]


@dataclass(frozen=True)
class AttackSuite:
    """A named, versioned list of attack entries, in the order they should run.

    Checked on construction: ids are unique, the first entry needs no starting point, and a
    ``start_from`` names an earlier entry of the suite.
    """

    name: str
    version: str
    entries: tuple[AttackEntry, ...]
    description: str

    def __post_init__(self) -> None:
        ids = [entry.id for entry in self.entries]
        if not ids or len(set(ids)) != len(ids):
            raise InputError(f"suite {self.name!r} needs unique, non-empty entries, got {ids}")
        if self.entries[0].needs_starting_point:
            raise InputError(f"suite {self.name!r} cannot start with a starting-point attack")
        for position, entry in enumerate(self.entries):
            if entry.start_from is not None and entry.start_from not in ids[:position]:
                raise InputError(
                    f"suite {self.name!r}: {entry.id!r} starts from {entry.start_from!r}, "
                    "which must be an earlier entry of the suite"
                )

    def ids(self) -> tuple[str, ...]:
        return tuple(entry.id for entry in self.entries)

    def norms(self) -> tuple[Norm, ...]:
        """The norms the suite covers, in the order of ``NORMS``."""
        present = {entry.norm for entry in self.entries}
        return tuple(norm for norm in NORMS if norm in present)

    def entries_for(self, norm: Norm) -> tuple[AttackEntry, ...]:
        """The entries of one norm, in run order."""
        return tuple(entry for entry in self.entries if entry.norm == norm)

    def to_json(self) -> dict[str, Any]:
        """Name, version and every entry's configuration, for run records."""
        return {
            "name": self.name,
            "version": self.version,
            "entries": [entry.to_json() for entry in self.entries],
        }

    def restricted_to(self, attack_ids: Sequence[str]) -> AttackSuite:
        """The sub-suite of ``attack_ids`` (in this suite's run order), e.g. one attack alone.

        Named ``<suite>[<id>,...]`` so its run records never mix with the whole suite's; an
        attack that starts from another needs that one selected too (checked on construction).
        """
        unknown = [attack_id for attack_id in attack_ids if attack_id not in self.ids()]
        if unknown:
            raise InputError(
                f"suite {self.name!r} has no attack {', '.join(map(repr, unknown))}; "
                f"its attacks: {', '.join(self.ids())}"
            )
        chosen = tuple(entry for entry in self.entries if entry.id in attack_ids)
        return AttackSuite(
            f"{self.name}[{','.join(entry.id for entry in chosen)}]",
            self.version,
            chosen,
            f"{self.description} (only {', '.join(entry.id for entry in chosen)})",
        )

    def entry(self, attack_id: str) -> AttackEntry:
        """The entry ``attack_id`` of this suite (e.g. to resolve a ``start_from``)."""
        for entry in self.entries:
            if entry.id == attack_id:
                return entry
        raise InputError(f"suite {self.name!r} has no attack {attack_id!r}")


def _cheapest_first(ids: Sequence[str]) -> tuple[AttackEntry, ...]:
    """Catalogue entries by cost, starting-point attacks last among equals; else given order."""
    entries = (ATTACKS[attack_id] for attack_id in ids)
    return tuple(sorted(entries, key=lambda entry: (entry.cost, entry.needs_starting_point)))


# Table 3 row order: L2, L-inf, L0, L1; the inferred 22nd L2 attack closes the L2 block.
DIM42_TABLE_ORDER: tuple[str, ...] = (
    "l2-contrast-reduction",
    "l2-ddn",
    "l2-pgd",
    "l2-basic-iterative",
    "l2-fgm",
    "l2-gn",
    "l2-un",
    "l2-clipping-aware-gn",
    "l2-clipping-aware-un",
    "l2-repeated-gn",
    "l2-repeated-un",
    "l2-clipping-aware-repeated-gn",
    "l2-clipping-aware-repeated-un",
    "l2-deepfool",
    "l2-inversion",
    "l2-binary-search-contrast-reduction",
    "l2-linear-search-contrast-reduction",
    "l2-gaussian-blur",
    "l2-carlini-wagner",
    "l2-brendel-bethge",
    "l2-boundary",
    "l2-linear-search-blended-uniform-noise",
    "linf-pgd",
    "linf-basic-iterative",
    "linf-fgsm",
    "linf-additive-uniform-noise",
    "linf-repeated-additive-uniform-noise",
    "linf-deepfool",
    "linf-inversion",
    "linf-binary-search-contrast-reduction",
    "linf-linear-search-contrast-reduction",
    "linf-gaussian-blur",
    "linf-linear-search-blended-uniform-noise",
    "linf-brendel-bethge",
    "l0-salt-and-pepper",
    "l0-pointwise-x10",
    "l1-inversion",
    "l1-binary-search-contrast-reduction",
    "l1-linear-search-contrast-reduction",
    "l1-gaussian-blur",
    "l1-linear-search-blended-uniform-noise",
    "l1-brendel-bethge",
)

QUICK_IDS = ("linf-fgsm", "linf-pgd", "l2-pgd", "l2-ddn", "l2-deepfool", "l2-gn")
ADAPTIVE_IDS = (
    "linf-margin-all-targets",
    "linf-dlr-all-targets",
    "linf-internal-all-targets",
    "l2-margin-all-targets",
    "l2-dlr-all-targets",
    "l2-internal-all-targets",
)
PDM_GRAYBOX_IDS = (
    "linf-fgsm",
    "linf-basic-iterative",
    "l2-carlini-wagner-10x9",
    "l0-jsma",
    "l2-carlini-wagner-hc-1000x9",
)

_SUITES = (
    AttackSuite(
        "dim42",
        "1",
        _cheapest_first(DIM42_TABLE_ORDER),
        "The 42 Foolbox attacks of the DIM paper (Table 3), Foolbox 3.3.4 defaults",
    ),
    AttackSuite(
        "quick",
        "1",
        _cheapest_first(QUICK_IDS),
        "FGSM, L-inf PGD, L2 PGD, DDN, L2 DeepFool and Gaussian noise, for demos and tests",
    ),
    AttackSuite(
        "minimal",
        "1",
        _cheapest_first(
            (
                "l0-fmn",
                "l1-fmn",
                "l2-fmn",
                "linf-fmn",
                "l2-ddn",
                "l1-pgd",
                "l2-pgd",
                "linf-pgd",
                "l0-brendel-bethge-from-pgd",
                "l1-brendel-bethge-from-pgd",
                "l2-brendel-bethge-from-pgd",
                "linf-brendel-bethge-from-pgd",
            ),
        ),
        "Minimal-norm attacks for median distances: FMN (L0/L1/L2/L-inf), DDN, and "
        "Brendel-Bethge started from PGD adversarials",
    ),
    AttackSuite(
        "adaptive",
        "1",
        _cheapest_first(ADAPTIVE_IDS),
        "Adaptive PGD for scores that are not logits: targeted margin and DLR losses towards "
        "every other class, and DIM's internal attack, in L-inf and L2",
    ),
    AttackSuite(
        "quick-adaptive",
        "1",
        (*_cheapest_first(QUICK_IDS), *_cheapest_first(ADAPTIVE_IDS)),
        "The quick suite, then the adaptive one: for fixed mode, where the cheap attacks break "
        "most samples and the adaptive ones attack only the survivors",
    ),
    AttackSuite(
        "convergence",
        "1",
        _cheapest_first(
            ("l1-pgd", "l1-pgd-long", "l2-pgd", "l2-pgd-long", "linf-pgd", "linf-pgd-long")
        ),
        "PGD in L1, L2 and L-inf next to the same with 5x the steps and 5 random restarts: a "
        "sanity flag reports when the longer runs break more (DESIGN.md §3.5)",
    ),
    AttackSuite(
        "pdm-graybox",
        "1",
        _cheapest_first(PDM_GRAYBOX_IDS),
        "The PDM paper's gray-box attacks (Appendix C): FGSM, BIM, C&W (9 x 10 steps), JSMA "
        "(100 iterations) and C&W-hc (9 x 1,000 steps, confidence 10)",
    ),
)

SUITES: Mapping[str, AttackSuite] = MappingProxyType({suite.name: suite for suite in _SUITES})


def get_suite(name: str) -> AttackSuite:
    """The suite ``name``, or an error listing the known suites."""
    try:
        return SUITES[name]
    except KeyError:
        raise InputError(
            f"unknown attack suite {name!r}; known suites: {', '.join(sorted(SUITES))}"
        ) from None
