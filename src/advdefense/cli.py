"""The ``advdefense`` command.

User errors (bad arguments, missing files, unreadable checkpoints) print one line to stderr and
exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from advdefense import __version__
from advdefense.attacks.norms import NORM_ALIASES, default_threshold
from advdefense.attacks.suites import SUITES, AttackSuite, get_suite
from advdefense.data import DATASETS, load_dataset, verify_datasets
from advdefense.defenses.adversarial_training import PGDConfig
from advdefense.defenses.detector import Detector
from advdefense.demo import DIM_DEMO_EPOCHS
from advdefense.devices import DEVICE_CHOICES, resolve_device
from advdefense.errors import InputError, UserError
from advdefense.evaluation.report import FORMATS, plot_accuracy_curves, render, write_reports
from advdefense.evaluation.robustness import clean_accuracy
from advdefense.evaluation.run import RunConfig, evaluate_models, first_indices, load_run
from advdefense.io import load, load_config, save
from advdefense.training.architectures import TRAINABLE, TrainOptions, train_architecture
from advdefense.training.checkpoint import STATE_FILE, EpochCheckpoint
from advdefense.training.pdm import PDMTrainingConfig
from advdefense.validation import check_positive_int

__all__ = ["main"]

RECIPES_ENV_HINT = "recipes/NAME.py in the current directory or --recipes DIR"
DEFAULT_EVALUATION_SAMPLES = 1000


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
        "directory (model.safetensors + config.json) to --out. cnn, madry and the PDM family "
        f"save their state to --out/{STATE_FILE} after every epoch: rerunning an interrupted "
        "command resumes from the last finished epoch.",
    )
    train.add_argument(
        "architecture",
        metavar="ARCH",
        choices=TRAINABLE,
        help=f"what to train: {', '.join(TRAINABLE)}. cnn: the ABS-paper CNN; madry: the Madry "
        "MNIST CNN, adversarially trained (PGD L-inf); dim/bidim: Denoised Internal Models; "
        "im, singleim, dn-singleim: the DIM paper's ablations; ce, rce, siamese-rvl, pdm: a "
        "ResNet (--arch) trained on the PDM paper's objectives",
    )
    train.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="dataset name")
    train.add_argument("--epochs", type=int, required=True, help="passes over the training set")
    train.add_argument(
        "--batch-size", type=int, help="mini-batch size (default: 64; pdm family: 128)"
    )
    train.add_argument(
        "--lr",
        type=float,
        help="learning rate (default: Adam 1e-3; pdm family: SGD 0.1 with step decay)",
    )
    train.add_argument(
        "--arch", default="resnet20", help="pdm family: resnet<6n+2>[-v2] (default: resnet20)"
    )
    train.add_argument(
        "--weight-decay",
        type=float,
        default=PDMTrainingConfig.weight_decay,
        help=f"pdm family: SGD weight decay (default {PDMTrainingConfig.weight_decay:g}, App. B)",
    )
    train.add_argument(
        "--variance-weight",
        type=float,
        default=PDMTrainingConfig.variance_weight,
        help="pdm family: weight of the reduce-variance loss (default 1, Algorithm 1; with "
        "ResNet-20 on mnist-sample 1 gave 58.3%% test accuracy and 0.1 gave 98.5%%: see "
        "results/pdm/README.md)",
    )
    train.add_argument(
        "--classification-weight",
        type=float,
        default=PDMTrainingConfig.classification_weight,
        help="pdm family: weight of the CE or RCE term (default 1, Algorithm 1)",
    )
    train.add_argument(
        "--siamese-weight",
        type=float,
        default=PDMTrainingConfig.siamese_weight,
        help="siamese-rvl, pdm: weight of the Siamese cosine loss (default 1, Algorithm 1; "
        "the recipe uses 0.1 on Fashion-MNIST, see results/pdm/README.md)",
    )
    train.add_argument(
        "--warmup-epochs",
        type=int,
        default=PDMTrainingConfig.warmup_epochs,
        help="siamese-rvl, pdm: epochs of the classification loss alone before the Siamese "
        "and RVL terms join (default 0, Algorithm 1)",
    )
    train.add_argument("--n-train", type=int, help="train on the first N samples only")
    train.add_argument(
        "--denoiser-epochs", type=int, help="DIM family: denoiser epochs (default: --epochs)"
    )
    train.add_argument(
        "--pgd-epsilon", type=float, default=0.3, help="madry: PGD L-inf epsilon (default 0.3)"
    )
    train.add_argument("--pgd-steps", type=int, default=40, help="madry: PGD steps (default 40)")
    train.add_argument(
        "--pgd-step-size", type=float, default=0.01, help="madry: PGD step size (default 0.01)"
    )
    train.add_argument("--data-root", type=Path, help="a data directory searched first")
    _common(train, out_default=None)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="robustness of saved models under an attack suite (resumable)",
        description="Evaluate saved models on the first N samples of a split (or --indices). "
        "minimal mode: every attack of the suite looks for the smallest adversarial per sample "
        "(accuracy at each norm's threshold, per-norm worst case, median distance). fixed mode: "
        "one norm and epsilon, attacks in order on the samples still robust. Results are "
        "appended to --out as they are computed; rerunning the same command skips finished "
        "work; another configuration or other samples in that --out are refused (see "
        "--replace). Writes report.md and report.json to --out, and in minimal mode "
        "accuracy_vs_epsilon.png.",
    )
    evaluate.add_argument(
        "--model",
        dest="models",
        action="append",
        type=Path,
        required=True,
        metavar="DIR",
        help="saved model directory (repeatable)",
    )
    evaluate.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        help="dataset (default: the one the first model was trained on)",
    )
    evaluate.add_argument("--split", default="test", help="split to evaluate (default: test)")
    evaluate.add_argument(
        "--n", type=int, help="number of samples (default: 1000, or every one --indices lists)"
    )
    evaluate.add_argument(
        "--indices",
        type=Path,
        metavar="FILE",
        help="sample indices to use (JSON list or one per line)",
    )
    evaluate.add_argument(
        "--suite", default="quick", choices=sorted(SUITES), help="attack suite (default: quick)"
    )
    evaluate.add_argument(
        "--attacks",
        metavar="ID[,ID...]",
        help="run only these attacks of the suite, e.g. --suite quick --attacks linf-pgd "
        "(the suite is then named quick[linf-pgd]: a configuration of its own, so give it its "
        "own --out or pass --replace)",
    )
    evaluate.add_argument(
        "--mode", default="minimal", choices=("minimal", "fixed"), help="minimal (default) or fixed"
    )
    evaluate.add_argument("--norm", choices=sorted(NORM_ALIASES), help="fixed mode: the norm")
    evaluate.add_argument("--eps", type=float, help="fixed mode: the epsilon")
    evaluate.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="NORM=VALUE",
        help="override a reporting threshold, e.g. --threshold Linf=0.1 (repeatable); defaults "
        "per dataset: MNIST-like L0 12, L1 8, L2 1.5, Linf 0.3; CIFAR-like L2 0.5, Linf 8/255",
    )
    evaluate.add_argument(
        "--detector",
        type=Path,
        metavar="DIR",
        help="a saved detector for the (single) --model: reports ROC AUC and TPR at 5%% and 1%% "
        "FPR of each attack's successful adversarials (gray-box, minimal mode)",
    )
    evaluate.add_argument(
        "--grid-points",
        type=int,
        default=8,
        help="epsilons per fixed-epsilon attack in minimal mode (default: 8)",
    )
    evaluate.add_argument("--batch-size", type=int, default=100, help="attack batch size")
    evaluate.add_argument(
        "--replace",
        action="store_true",
        help="when --out holds models evaluated under another configuration (suite, samples, "
        "mode, thresholds, seed), start its run file afresh for this one instead of refusing "
        "(the records stay and are reused where they match)",
    )
    evaluate.add_argument("--data-root", type=Path, help="a data directory searched first")
    _common(evaluate, out_default="runs/evaluate")
    evaluate.set_defaults(handler=_evaluate)

    report = commands.add_parser(
        "report",
        help="render evaluation runs as one table",
        description="Render one or more evaluation runs side by side (one column per model, "
        "attacks grouped by norm, the DIM paper's Table 1 layout) with 95%% Wilson intervals, "
        "sanity flags and timings; optionally an accuracy-vs-epsilon plot.",
    )
    report.add_argument(
        "runs",
        metavar="RUN",
        nargs="+",
        type=Path,
        help="run directories (each holds the run.json that `evaluate --out` wrote)",
    )
    report.add_argument("--format", choices=FORMATS, default="md", help="output format")
    report.add_argument(
        "--partial",
        action="store_true",
        help="report a run still in progress: unfinished attacks are left out and flagged",
    )
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
    reproduce.add_argument(
        "--models",
        type=_comma_list,
        help="only these of the recipe's models, comma-separated (recipes that take `models`)",
    )
    reproduce.add_argument(
        "--datasets",
        type=_comma_list,
        help="only these of the recipe's datasets, comma-separated (recipes that take `datasets`)",
    )
    reproduce.add_argument(
        "--stages",
        type=_comma_list,
        help="only these of the recipe's optional stages, comma-separated (recipes that take "
        "`stages`; the stages a chosen one needs always run)",
    )
    reproduce.add_argument(
        "--norms",
        type=_comma_list,
        help="only these threat models (linf, l2, ...) in the recipe's per-norm stages, "
        "comma-separated (recipes that take `norms`; e.g. one norm per core)",
    )
    reproduce.add_argument(
        "--attack-batch",
        type=int,
        help="samples per batch of the recipe's long attacks (recipes that take `attack_batch`;"
        " speed only, e.g. larger on a GPU)",
    )
    _common(reproduce, out_default="results")
    reproduce.set_defaults(handler=_reproduce)

    demo = commands.add_parser(
        "demo",
        help="train the CNN and DIM on mnist-sample, attack both, print a table",
        description="Train the ABS-paper CNN and DIM (short schedule) on the embedded MNIST "
        "sample (4,000 digits), then evaluate clean accuracy, FGSM and L-inf PGD at 0.3, L2 PGD "
        "and L2 DeepFool at 1.5 on the first N test digits. Writes both models, report.json, "
        "report.md and a plot.",
    )
    demo.add_argument("--n", type=int, default=200, help="test digits to attack (default: 200)")
    demo.add_argument("--epochs", type=int, default=8, help="CNN training epochs (default: 8)")
    demo.add_argument(
        "--dim-epochs",
        type=int,
        default=DIM_DEMO_EPOCHS,
        help=f"DIM internal-model epochs; its denoiser trains half as many "
        f"(default: {DIM_DEMO_EPOCHS})",
    )
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
    check_positive_int(args.epochs, "--epochs")
    if args.n_train is not None:
        check_positive_int(args.n_train, "--n-train")
    images, labels = load_dataset(args.dataset, "train", args.data_root)
    if args.n_train is not None:
        images, labels = images[: args.n_train], labels[: args.n_train]
    options = TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        denoiser_epochs=args.denoiser_epochs,
        device=device,
        progress=not args.quiet,
        arch=args.arch,
        weight_decay=args.weight_decay,
        variance_weight=args.variance_weight,
        classification_weight=args.classification_weight,
        siamese_weight=args.siamese_weight,
        warmup_epochs=args.warmup_epochs,
        pgd=PGDConfig(epsilon=args.pgd_epsilon, steps=args.pgd_steps, step_size=args.pgd_step_size),
        checkpoint=EpochCheckpoint(Path(args.out)),
        num_classes=DATASETS[args.dataset].num_classes,
    ).resolved(args.architecture)  # bad --batch-size or --lr fail here, before any training
    assert options.checkpoint is not None
    if options.checkpoint.path.is_file():
        print(f"resuming the interrupted training saved in {options.checkpoint.path}")
    model, training = train_architecture(args.architecture, images, labels, options)
    test_images, test_labels = load_dataset(args.dataset, "test", args.data_root)
    accuracy = clean_accuracy(model, test_images, test_labels)
    save(
        model,
        args.out,
        dataset=args.dataset,
        training={**training, "train_samples": int(images.shape[0])},
        seed=args.seed,
        metrics={"test_accuracy": accuracy, "test_samples": int(test_images.shape[0])},
    )
    options.checkpoint.remove()
    print(
        f"saved {args.architecture} to {args.out}: test accuracy {100 * accuracy:.2f}% "
        f"(n={test_images.shape[0]})"
    )


def _parse_thresholds(values: Sequence[str], dataset: str, suite: AttackSuite) -> dict[str, float]:
    thresholds: dict[str, float] = {}
    for value in values:
        name, _, number = value.partition("=")
        norm = NORM_ALIASES.get(name.strip())
        if norm is None or not number:
            raise InputError(
                f"--threshold expects NORM=VALUE with NORM in "
                f"{', '.join(sorted(NORM_ALIASES))}, got {value!r}"
            )
        try:
            thresholds[norm] = float(number)
        except ValueError:
            raise InputError(f"--threshold {value!r}: {number!r} is not a number") from None
        if not math.isfinite(thresholds[norm]) or thresholds[norm] <= 0:
            raise InputError(f"--threshold {value!r}: the threshold must be finite and positive")
    for norm in suite.norms():
        if norm not in thresholds:
            thresholds[norm] = default_threshold(dataset, norm)
    return thresholds


def _model_names(directories: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for directory in directories:
        name = directory.resolve().name
        names.append(name if name not in names else f"{name}-{len(names) + 1}")
    return names


def _evaluate(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    suite = get_suite(args.suite)
    if args.attacks is not None:
        suite = suite.restricted_to([name.strip() for name in args.attacks.split(",")])
    if args.n is not None:
        check_positive_int(args.n, "--n")
    if args.mode == "fixed" and (args.norm is None or args.eps is None):
        raise InputError("--mode fixed needs --norm and --eps, e.g. --norm L2 --eps 1.5")
    models = {
        name: load(directory, device=device)
        for name, directory in zip(_model_names(args.models), args.models, strict=True)
    }
    dataset = args.dataset or load_config(args.models[0]).get("dataset")
    if dataset is None:
        raise UserError(f"{args.models[0]} records no dataset; pass --dataset")
    images, labels = load_dataset(dataset, args.split, args.data_root)
    default_n = 0 if args.indices is not None else DEFAULT_EVALUATION_SAMPLES  # 0: all listed
    indices = first_indices(args.n or default_n, images.shape[0], args.indices)
    selection = torch.tensor(indices)
    config = RunConfig(
        dataset=dataset,
        split=args.split,
        indices=indices,
        suite=suite.name,
        suite_version=suite.version,
        mode=args.mode,
        thresholds=_parse_thresholds(args.threshold, dataset, suite),
        seed=args.seed,
        batch_size=args.batch_size,
        grid_points=args.grid_points,
        norm=NORM_ALIASES[args.norm] if args.norm else None,
        epsilon=args.eps,
    )
    detectors = {}
    if args.detector is not None:
        if len(models) != 1:
            raise InputError("--detector pairs with exactly one --model")
        detector = load(args.detector, device=device)
        if not isinstance(detector, Detector):
            raise InputError(f"{args.detector} holds a {type(detector).__name__}, not a Detector")
        detectors = {next(iter(models)): detector}
    run = evaluate_models(
        models,
        images[selection],
        labels[selection],
        suite,
        config,
        args.out,
        detectors=detectors,
        progress=not args.quiet,
        replace=args.replace,
    )
    files = write_reports(run)
    print(files["md"].read_text())
    print(f"wrote {', '.join(str(path) for path in files.values())}")


def _report(args: argparse.Namespace) -> None:
    runs = [load_run(run, partial=args.partial) for run in args.runs]
    text = render(runs, args.format)
    if args.out is None:
        print(text, end="")
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    if args.plot is not None:
        plot_accuracy_curves(runs, args.plot)
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
    for value, flag in ((args.n, "--n"), (args.attack_batch, "--attack-batch")):
        if value is not None:  # checked before a recipe loads data or trains anything
            check_positive_int(value, flag)
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
    sys.modules[spec.name] = module  # dataclasses and pickling look a module up by name
    spec.loader.exec_module(module)
    run: Callable[..., None] | None = getattr(module, "reproduce", None)
    if run is None:
        raise UserError(f"recipe {path} defines no reproduce(...) function")
    options = {
        name: value
        for name, value in (
            ("models", args.models),
            ("datasets", args.datasets),
            ("stages", args.stages),
            ("norms", args.norms),
            ("attack_batch", args.attack_batch),
        )
        if value is not None
    }
    accepted = inspect.signature(run).parameters
    for name in options:
        if name not in accepted:
            raise UserError(f"recipe {path.stem} takes no --{name.replace('_', '-')}")
    run(
        out=args.out,
        device=resolve_device(args.device),
        seed=args.seed,
        progress=not args.quiet,
        n=args.n,
        **options,
    )


def _comma_list(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _demo(args: argparse.Namespace) -> None:
    from advdefense.demo import DemoOptions, run_demo

    result = run_demo(
        DemoOptions(
            out=args.out,
            epochs=args.epochs,
            dim_epochs=args.dim_epochs,
            n=args.n,
            seed=args.seed,
            device=resolve_device(args.device),
            progress=not args.quiet,
        )
    )
    print(result.table)
    models = ", ".join(str(path) for path in result.model_dirs.values())
    print(f"models: {models}  report: {', '.join(str(p) for p in result.files.values())}")
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
