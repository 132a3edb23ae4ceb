"""What the Brendel-Bethge solver's watchdog costs: the same attack unwatched and watched.

Run: ``.venv/bin/python benchmarks/bench_solver_watchdog.py [--norm linf] [--n 50]
[--steps 100]`` from the repository root, with Fashion-MNIST installed (``apt-get install
dataset-fashion-mnist``). It attacks the first ``n`` Fashion-MNIST test images of the committed
CNN (``results/dim/fashion-mnist/models/cnn``), started from PGD's adversarials (ε 0.3 in L∞,
3 in L2), with Foolbox's Brendel-Bethge at ``steps`` steps: once with the solver in this process
(Foolbox as it is), once with each solve sent to a worker process under a time limit
(``advdefense.attacks.solver_watchdog``, what the harness does). Both run in one process, each
after a short run that compiles the solver for its argument types, so neither pays for Numba's
compilation (once per process: the worker receives writable copies of Foolbox's read-only
views, another specialization). Printed: seconds
of each, their ratio, and whether the adversarials are identical (they should be: the same
solver computes the same steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from foolbox.models.pytorch import PyTorchModel

import advdefense
from advdefense.attacks.catalog import BB_SOLVER_TIMEOUT, get_attack
from advdefense.attacks.starting_points import best_starting_points, run_attack
from advdefense.data import load_dataset

_PGD_EPSILON = {"linf": 0.3, "l2": 3.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--norm", choices=sorted(_PGD_EPSILON), default="linf")
    parser.add_argument("--n", type=int, default=50, help="test images (default 50)")
    parser.add_argument("--steps", type=int, default=100, help="Brendel-Bethge steps")
    parser.add_argument("--model", type=Path, default=Path("results/dim/fashion-mnist/models/cnn"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = advdefense.load(args.model).eval()
    fmodel = PyTorchModel(model, bounds=(0.0, 1.0))
    images, labels = load_dataset("fashion-mnist", "test")
    images, labels = images[: args.n], labels[: args.n]
    pgd = run_attack(
        get_attack(f"{args.norm}-pgd"), fmodel, images, labels, [_PGD_EPSILON[args.norm]]
    )
    starts, mask = best_starting_points(model, images, labels, pgd.adversarials, args.norm)
    entry = get_attack(f"{args.norm}-brendel-bethge")
    print(
        f"{entry.id} on {args.model} (Fashion-MNIST): first {args.n} test images, "
        f"{int(mask.sum())} with a PGD start, {args.steps} steps, seed 0"
    )
    settings = (("in process", None), ("watched", BB_SOLVER_TIMEOUT))
    for _, timeout in settings:  # Numba compiles once per process and argument types
        compile_run = dataclasses.replace(entry, parameters={"steps": 2}, solver_timeout=timeout)
        run_attack(compile_run, fmodel, images, labels, [None], starts, mask)
    seconds, adversarials = {}, {}
    for name, timeout in settings:
        configured = dataclasses.replace(
            entry, parameters={"steps": args.steps}, solver_timeout=timeout
        )
        started = time.perf_counter()
        result = run_attack(configured, fmodel, images, labels, [None], starts, mask)
        seconds[name] = time.perf_counter() - started
        adversarials[name] = result.adversarials[0]
        print(f"{name:<11} {seconds[name]:8.1f} s, {int(result.success[0].sum())} adversarial")
    identical = torch.equal(adversarials["in process"], adversarials["watched"])
    print(
        f"ratio (watched / in process): {seconds['watched'] / seconds['in process']:.2f}; "
        f"identical adversarials: {'yes' if identical else 'no'}"
    )


if __name__ == "__main__":
    main()
