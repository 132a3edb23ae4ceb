"""The ``advdefense`` command.

User errors (bad arguments, missing files, unreadable checkpoints) print one line to stderr and
exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from advdefense import __version__
from advdefense.attacks.catalog import ATTACKS, DEMO_ATTACKS, get_attack
from advdefense.attacks.norms import NORMS, Norm
from advdefense.data import DATASETS, load_dataset, verify_datasets
from advdefense.devices import DEVICE_CHOICES, resolve_device
from advdefense.errors import InputError, UserError
from advdefense.evaluation.record import evaluate_model, read_record, write_record
from advdefense.evaluation.report import FORMATS, plot_accuracy_curves, render
from advdefense.evaluation.robustness import clean_accuracy
from advdefense.io import load, load_config, save
from advdefense.registry import get_architecture
from advdefense.training.loop import TrainingConfig, train_classifier

__all__ = ["main"]

TRAINABLE = ("cnn",)
RECIPES_ENV_HINT = "recipes/NAME.py in the current directory or --recipes DIR"


class _Parser(argparse.ArgumentParser):
    """argparse that exits with 2 and one line, like every other user error."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _common(parser: argparse.ArgumentParser, *, out_default: str | None) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help="where to compute: auto picks CUDA when available (default: auto)",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    if out_default is None:
        group.add_argument("--out", type=Path, required=True, help="output directory")
    else:
        group.add_argument(
            "--out",
            type=Path,
            default=Path(out_default),
            help=f"output directory (default: {out_default})",
        )
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="advdefense",
        description="Train defenses against adversarial examples and evaluate them honestly.",
    )
    parser.add_argument("--version", action="version", version=f"advdefense {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    datasets = commands.add_parser(
        "datasets",
        help="list datasets or verify their files",
        description="List the datasets advdefense reads, or verify which are present "
        "(files and checksums) and where. Lookup order: --root, $ADVDEFENSE_DATA, "
        "~/.cache/advdefense, and /usr/share/datasets for Debian's dataset-fashion-mnist.",
    )
    datasets.add_argument(
        "action",
        nargs="?",
        choices=("list", "verify"),
        default="list",
        help="list (default) or verify",
    )
    datasets.add_argument("--root", type=Path, help="a data directory searched first")
    datasets.set_defaults(handler=_datasets)

    train = commands.add_parser(
        "train",
        help="train a model and save it as safetensors + JSON",
        description="Train ARCH on a dataset's training split and save a loadable model "
        "directory (model.safetensors + config.json) to --out.",
    )
    train.add_argument(
        "architecture",
        metavar="ARCH",
        choices=TRAINABLE,
        help=f"what to train: {', '.join(TRAINABLE)} (cnn: the ABS-paper CNN)",
    )
    train.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="dataset name")
    train.add_argument("--epochs", type=int, required=True, help="passes over the training set")
    train.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default: 64)")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    train.add_argument("--n-train", type=int, help="train on the first N samples only")
    train.add_argument("--data-root", type=Path, help="a data directory searched first")
    _common(train, out_default=None)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="clean and robust accuracy of a saved model",
        description="Evaluate a saved model on the first N test samples: clean accuracy, then "
        "each attack on an epsilon grid up to the threshold. Writes results.json, "
        "results.md and accuracy_vs_epsilon.png to --out.",
    )
    evaluate.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="saved model")
    evaluate.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        help="dataset (default: the one the model was trained on)",
    )
    evaluate.add_argument("--split", default="test", help="split to evaluate (default: test)")
    evaluate.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    evaluate.add_argument(
        "--attacks",
        default=",".join(DEMO_ATTACKS),
        help=f"comma-separated attack ids (default: {','.join(DEMO_ATTACKS)}); "
        f"known: {', '.join(sorted(ATTACKS))}",
    )
    evaluate.add_argument(
        "--epsilon",
        action="append",
        default=[],
        metavar="NORM=VALUE",
        help="override a threshold, e.g. --epsilon linf=0.1 (repeatable)",
    )
    evaluate.add_argument("--batch-size", type=int, default=200, help="attack batch size")
    evaluate.add_argument("--data-root", type=Path, help="a data directory searched first")
    _common(evaluate, out_default="runs/evaluate")
    evaluate.set_defaults(handler=_evaluate)

    report = commands.add_parser(
        "report",
        help="render evaluation runs as one table",
        description="Render the results.json of one or more runs as a table (one column per "
        "model, one row per attack) with 95%% Wilson intervals, and optionally a plot.",
    )
    report.add_argument(
        "runs", metavar="RUN", nargs="+", type=Path, help="run directories or results.json files"
    )
    report.add_argument("--format", choices=FORMATS, default="md", help="output format")
    report.add_argument("--out", type=Path, help="write here instead of standard output")
    report.add_argument("--plot", type=Path, help="also write accuracy-vs-epsilon plot (PNG)")
    report.set_defaults(handler=_report)

    reproduce = commands.add_parser(
        "reproduce",
        help="run a paper-reproduction recipe",
        description=f"Run a recipe, {RECIPES_ENV_HINT}, which defines "
        "`reproduce(out: Path, device: torch.device, seed: int, progress: bool, n: int | None)`."
        " With no RECIPE, list the recipes found.",
    )
    reproduce.add_argument("recipe", metavar="RECIPE", nargs="?", help="recipe name or .py path")
    reproduce.add_argument("--recipes", type=Path, help="directory holding recipe files")
    reproduce.add_argument("--n", type=int, help="number of test samples (recipe default)")
    _common(reproduce, out_default="results")
    reproduce.set_defaults(handler=_reproduce)

    demo = commands.add_parser(
        "demo",
        help="train the CNN on mnist-sample, attack it, print a table",
        description="Train the ABS-paper CNN on the embedded MNIST sample (4,000 digits), then "
        "evaluate clean accuracy, FGSM and L-inf PGD at 0.3, L2 PGD and L2 DeepFool at 1.5 on "
        "the first N test digits. Writes the model, results.json, results.md and a plot.",
    )
    demo.add_argument("--n", type=int, default=200, help="test digits to attack (default: 200)")
    demo.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    _common(demo, out_default="runs/demo")
    demo.set_defaults(handler=_demo)
    return parser


def _datasets(args: argparse.Namespace) -> None:
    if args.action == "list":
        for spec in DATASETS.values():
            shape = "x".join(str(d) for d in spec.image_shape)
            print(f"{spec.name:<14} {spec.num_classes:>3} classes  {shape:<8}  {spec.description}")
        return
    missing = 0
    for status in verify_datasets(args.root):
        state = "found" if status.found else "missing"
        missing += not status.found
        print(f"{status.name:<14} {state:<8} {status.path}")
        for file in status.files:
            if file.state != "ok" or not status.found:
                detail = f" ({file.detail})" if file.detail else ""
                print(f"    {file.state:<18} {file.filename}{detail}")
    print(f"{len(DATASETS) - missing} of {len(DATASETS)} datasets found")


def _train(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    images, labels = load_dataset(args.dataset, "train", args.data_root)
    if args.n_train is not None:
        images, labels = images[: args.n_train], labels[: args.n_train]
    config = TrainingConfig(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed
    )
    architecture = get_architecture(args.architecture)
    channels = int(images.shape[1])
    model = architecture(architecture.config_class(in_channels=channels))  # type: ignore[attr-defined]
    if images.shape[2:] != (28, 28):
        raise UserError(
            f"{args.architecture} takes 28 x 28 images; {args.dataset} has "
            f"{tuple(images.shape[2:])}"
        )
    history = train_classifier(
        model, images, labels, config, device=device, progress=not args.quiet
    )
    test_images, test_labels = load_dataset(args.dataset, "test", args.data_root)
    accuracy = clean_accuracy(model, test_images, test_labels)
    save(
        model,
        args.out,
        dataset=args.dataset,
        training={**asdict(config), "train_samples": int(images.shape[0])},
        seed=args.seed,
        metrics={
            "train_accuracy": history.epochs[-1].accuracy,
            "test_accuracy": accuracy,
            "test_samples": int(test_images.shape[0]),
        },
    )
    print(
        f"saved {args.architecture} to {args.out}: train accuracy "
        f"{100 * history.epochs[-1].accuracy:.2f}%, test accuracy {100 * accuracy:.2f}% "
        f"(n={test_images.shape[0]})"
    )


def _parse_epsilons(values: Sequence[str]) -> dict[Norm, float]:
    epsilons: dict[Norm, float] = {}
    for value in values:
        norm, _, number = value.partition("=")
        if norm not in NORMS or not number:
            raise InputError(
                f"--epsilon expects NORM=VALUE with NORM in {', '.join(NORMS)}, got {value!r}"
            )
        try:
            epsilons[norm] = float(number)
        except ValueError:
            raise InputError(f"--epsilon {value!r}: {number!r} is not a number") from None
    return epsilons


def _evaluate(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    attack_ids = [a.strip() for a in args.attacks.split(",") if a.strip()]
    for attack_id in attack_ids:
        get_attack(attack_id)
    epsilons = _parse_epsilons(args.epsilon)
    model = load(args.model_dir, device=device)
    dataset = args.dataset or load_config(args.model_dir).get("dataset")
    if dataset is None:
        raise UserError(f"{args.model_dir} records no dataset; pass --dataset")
    images, labels = load_dataset(dataset, args.split, args.data_root)
    images, labels = images[: args.n], labels[: args.n]
    record = evaluate_model(
        model,
        images,
        labels,
        attack_ids,
        model_name=args.model_dir.name,
        dataset=dataset,
        split=args.split,
        seed=args.seed,
        epsilons=epsilons,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    write_record(record, args.out)
    table = render([record], "md")
    (args.out / "results.md").write_text(table)
    plot_accuracy_curves([record], args.out / "accuracy_vs_epsilon.png")
    print(table)
    print(f"wrote {args.out}/results.json, results.md and accuracy_vs_epsilon.png")


def _report(args: argparse.Namespace) -> None:
    records = [read_record(run) for run in args.runs]
    text = render(records, args.format)
    if args.out is None:
        print(text, end="")
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    if args.plot is not None:
        plot_accuracy_curves(records, args.plot)
        print(f"wrote {args.plot}")


def _recipe_dirs(explicit: Path | None) -> list[Path]:
    if explicit is not None:
        return [explicit]
    source_checkout = Path(__file__).resolve().parents[2] / "recipes"
    return list(dict.fromkeys([Path("recipes").resolve(), source_checkout]))


def _find_recipes(explicit: Path | None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in _recipe_dirs(explicit):
        if directory.is_dir():
            for path in sorted(directory.glob("*.py")):
                if not path.name.startswith("_"):
                    found.setdefault(path.stem, path)
    return found


def _reproduce(args: argparse.Namespace) -> None:
    recipes = _find_recipes(args.recipes)
    if args.recipe is None:
        if not recipes:
            print(f"no recipes found; looked for {RECIPES_ENV_HINT}")
        for name, recipe_path in recipes.items():
            print(f"{name:<24} {recipe_path}")
        return
    path: Path | None = (
        Path(args.recipe) if args.recipe.endswith(".py") else recipes.get(args.recipe)
    )
    if path is None or not path.is_file():
        known = ", ".join(recipes) or "none found"
        raise UserError(
            f"unknown recipe {args.recipe!r} (known: {known}); looked for {RECIPES_ENV_HINT}"
        )
    spec = importlib.util.spec_from_file_location(f"advdefense_recipe_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import recipe {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run: Callable[..., None] | None = getattr(module, "reproduce", None)
    if run is None:
        raise UserError(f"recipe {path} defines no reproduce(...) function")
    run(
        out=args.out,
        device=resolve_device(args.device),
        seed=args.seed,
        progress=not args.quiet,
        n=args.n,
    )


def _demo(args: argparse.Namespace) -> None:
    from advdefense.demo import DemoOptions, run_demo

    result = run_demo(
        DemoOptions(
            out=args.out,
            epochs=args.epochs,
            n=args.n,
            seed=args.seed,
            device=resolve_device(args.device),
            progress=not args.quiet,
        )
    )
    print(result.table)
    print(f"model: {result.model_dir}  table: {result.table_path}  plot: {result.plot_path}")
    print(f"demo finished in {result.seconds:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``advdefense`` console script; returns the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except UserError as error:
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"advdefense {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"advdefense {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
