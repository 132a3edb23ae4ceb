"""Per attack, what the real-model judge (the surrogate fix) broke next to the records from
before it, on the same batches.

Usage: ``python scripts/compare_surrogate_fix.py results/dim/mnist-sample``.

Records made after the fix carry a ``selection`` key; a batch is matched by model, attack and
sample indices. Prints samples attacked, broken after the fix, and broken before on the
matched batches (results/dim/README.md quotes these counts)."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

RUNS = ("quick-adaptive-linf", "quick-adaptive-l2", "convergence-linf", "convergence-l2")
MODELS = ("bidim", "bicnn")


def compare(run_file: Path) -> dict[tuple[str, str], list[int]]:
    """(model, attack) -> [samples, broken after the fix, broken before, matched batches]."""
    before: dict[tuple[str, str, tuple[int, ...]], dict[str, Any]] = {}
    after: dict[tuple[str, str, tuple[int, ...]], dict[str, Any]] = {}
    for line in run_file.read_text().splitlines():
        record = json.loads(line)
        if record["model"] in MODELS:
            key = (record["model"], record["attack"], tuple(record["indices"]))
            (after if "selection" in record else before)[key] = record
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for key, record in after.items():
        total = totals[key[:2]]
        total[0] += len(record["indices"])
        total[1] += sum(record["broken"])
        if key in before:
            total[2] += sum(before[key]["broken"])
            total[3] += 1
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a dataset's folder, results/dim/DATASET")
    args = parser.parse_args()
    for run in RUNS:
        path = args.directory / "runs" / run / "records.jsonl"
        if path.is_file():
            for (model, attack), (n, new, old, matched) in compare(path).items():
                print(
                    f"{run} {model} {attack}: {n} attacked, {new} broken after the fix, "
                    f"{old} before on the {matched} matched batches"
                )


if __name__ == "__main__":
    main()
