"""Recipes: the DIM reproduction's tables are rebuilt from run directories, next to the paper."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from advdefense.attacks.suites import get_suite
from advdefense.errors import InputError
from advdefense.evaluation.run import RunConfig, evaluate_models

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _recipe(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class MeanPixel(nn.Module):
    """Two classes by mean brightness, on 1 x 4 x 4 images."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        score = self.scale * (images.flatten(1).mean(1) - 0.5)
        return torch.stack([-score, score], dim=1)


def _data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    levels = torch.linspace(0.1, 0.9, n)
    return levels.view(n, 1, 1, 1).expand(n, 1, 4, 4).clone(), (levels >= 0.5).long()


def _run(directory: Path, suite: str, mode: str, n: int, **extra: Any) -> RunConfig:
    thresholds = {"l0": 12.0, "l1": 8.0, "l2": 1.5, "linf": 0.3}
    return RunConfig(
        dataset="toy",
        split="test",
        indices=tuple(range(n)),
        suite=suite,
        suite_version=get_suite(suite).version,
        mode=mode,  # type: ignore[arg-type]
        thresholds=thresholds,
        grid_points=3,
        **extra,
    )


def _toy_dim_setting(directory: Path) -> tuple[ModuleType, Any, dict[str, nn.Module]]:
    """The DIM recipe, a setting on :func:`_data` writing to ``directory``, and two models."""
    recipe = _recipe("dim_mnist")
    images, labels = _data()
    thresholds = {"l0": 12.0, "l1": 8.0, "l2": 1.5, "linf": 0.3}
    setting = recipe.Setting("mnist-sample", directory, images, labels, thresholds, 0, False)
    return recipe, setting, {"cnn": MeanPixel(20.0), "dim": MeanPixel(5.0)}


def test_paper_numbers_cover_both_tables() -> None:
    paper = json.loads((RECIPES / "dim_mnist.paper.json").read_text())
    recipe = _recipe("dim_mnist")
    for table in ("table1", "table2"):
        rows = paper[table]["rows"]
        assert {"l2-carlini-wagner", "linf-pgd", "l0-pointwise-x10", "all-l2"} <= set(rows)
        assert set(recipe.TABLE_COLUMNS[table]) <= set(paper[table]["columns"])
    assert paper["table1"]["rows"]["all-l2"]["dim"] == {"median": 1.9, "accuracy": 66}
    assert paper["table2"]["rows"]["linf-brendel-bethge"]["bidim"] == {"accuracy": 88}


def test_dim_tables_from_partial_runs(tmp_path: Path) -> None:
    recipe, setting, models = _toy_dim_setting(tmp_path)
    images, labels = setting.images, setting.labels
    # stand-in for dim42: the quick suite's attacks fill their rows, the rest stay pending
    for run, suite in (("dim42", "quick"), ("quick", "quick")):
        config = _run(tmp_path, suite, "minimal", 12)
        directory = setting.run_dir(run)
        evaluate_models(models, images, labels, get_suite(suite), config, directory, progress=False)
    for suite in ("quick-adaptive", "convergence"):
        fixed = _run(tmp_path, suite, "fixed", 12, norm="linf", epsilon=0.3)
        directory = setting.run_dir(f"{suite}-linf")
        evaluate_models(models, images, labels, get_suite(suite), fixed, directory, progress=False)
    recipe.write_tables(setting)
    table1 = (tmp_path / "table1.md").read_text()
    pgd_row = next(line for line in table1.splitlines() if line.startswith("| linf-pgd |"))
    cells = [cell.strip() for cell in pgd_row.strip("|").split("|")]
    # cnn: ours, paper (0), difference; 4 of the 12 levels lie more than 0.3 from 0.5
    assert cells[1:4] == ["33.3", "0", "+33.3"]
    assert "not run" in pgd_row  # bicnn and madry did not run
    cw_row = next(line for line in table1.splitlines() if line.startswith("| l2-carlini-wagner"))
    assert "pending" in cw_row
    truth = (tmp_path / "true_robustness.md").read_text()
    cnn_linf = next(line for line in truth.splitlines() if line.startswith("| cnn | linf |"))
    # the per-norm worst case agrees with the per-attack rows (same float tolerance)
    assert [cell.strip() for cell in cnn_linf.strip("|").split("|")][4] == "33.3 [13, 61]"
    dim_linf = next(line for line in truth.splitlines() if line.startswith("| dim | linf |"))
    assert dim_linf.count("not run") == 0
    dim_l2 = next(line for line in truth.splitlines() if line.startswith("| dim | l2 |"))
    assert dim_l2.count("not run") == 2  # no fixed-mode run in L2
    # cnn's all-L-inf cell, ours then the paper's: median distance / accuracy in both tables,
    # but the paper's Table 2 has accuracies only
    cnn_cells = [
        [cell.strip() for cell in line.strip("|").split("|")][1:3]
        for table in ("table1.md", "table2.md")
        for line in (tmp_path / table).read_text().splitlines()
        if line.startswith("| all-linf |")
    ]
    assert cnn_cells == [["0.25 / 33.3", "0.08 / 0"], ["0.25 / 33.3", "0"]]
    # another dataset: the paper's MNIST numbers for orientation, no difference column
    summaries = recipe._minimal_summaries(setting, "dim42")
    other = recipe.render_paper_table("table1", summaries, 12, "fashion-mnist")
    assert "cnn paper (MNIST)" in other and "Δ |" not in other.splitlines()[0]
    assert "the paper never ran fashion-mnist" in other
    # a dim42 run on other weights than the quick stage's is marked stale, without a difference
    run_file = setting.run_dir("dim42") / "run.json"
    payload = json.loads(run_file.read_text())
    payload["models"]["dim"]["fingerprint"] = "0" * 64
    run_file.write_text(json.dumps(payload))
    recipe.write_tables(setting)
    pgd_row = next(
        line
        for line in (tmp_path / "table1.md").read_text().splitlines()
        if line.startswith("| linf-pgd |")
    )
    dim_cells = [cell.strip() for cell in pgd_row.strip("|").split("|")][-3:]
    assert dim_cells[0].endswith("(stale)") and dim_cells[2] == "—"


@pytest.mark.parametrize("name", ["dim_mnist", "cnn_mnist_sample"])
def test_recipes_define_reproduce(name: str) -> None:
    assert callable(_recipe(name).reproduce)


def test_dim_stages_choose_the_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _recipe("dim_mnist")
    ran: list[tuple[str, str]] = []
    monkeypatch.setattr(recipe, "_model", lambda *args: nn.Identity())
    monkeypatch.setattr(recipe, "_latent_figure", lambda *args: None)
    monkeypatch.setattr(recipe, "_timed", lambda stage, _, name, __: ran.append((stage, name)))
    arguments = (tmp_path, torch.device("cpu"), 0, False, 10, ("dim", "cnn"), ("mnist-sample",))
    recipe.reproduce(*arguments, ("dim42", "adaptive"))
    assert ran == [("adaptive", "dim"), ("adaptive", "cnn"), ("dim42", "dim"), ("dim42", "cnn")]
    ran.clear()
    recipe.reproduce(*arguments)  # all four by default
    cheap = ["quick", "adaptive", "convergence"]
    assert [stage for stage, _ in ran] == cheap * 2 + ["dim42"] * 2
    choices = "quick, adaptive, convergence, dim42"
    with pytest.raises(InputError, match=rf"stage\(s\) table1; choose from {choices}"):
        recipe.reproduce(*arguments, ("table1",))
    for count in (0, -3):  # not the default n, nor "all but the last three"
        with pytest.raises(InputError, match=rf"--n must be a positive integer, got {count}"):
            recipe.reproduce(tmp_path, torch.device("cpu"), 0, False, count, ("dim",))


def test_dim_norms_choose_the_fixed_stages_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe("dim_mnist")
    norms_seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(recipe, "_model", lambda *args: nn.Identity())
    monkeypatch.setattr(
        recipe, "_timed", lambda _, setting, *__: norms_seen.append(setting.fixed_norms)
    )
    arguments = (tmp_path, torch.device("cpu"), 0, False, 10, ("dim",), ("mnist-sample",))
    recipe.reproduce(*arguments, ("convergence",), ("l2", "linf"))  # run in FIXED_NORMS' order
    recipe.reproduce(*arguments, ("convergence",), ("l2",))
    recipe.reproduce(*arguments, ("convergence",))
    assert norms_seen == [("linf", "l2"), ("l2",), ("linf", "l2")]
    with pytest.raises(InputError, match=r"norm\(s\) l1; choose from linf, l2"):
        recipe.reproduce(*arguments, ("convergence",), ("l1",))

    runs: list[tuple[str, str | None, float | None]] = []
    monkeypatch.setattr(
        recipe,
        "_evaluate",
        lambda _, run, config, *__: runs.append((run, config.norm, config.epsilon)),
    )
    _, setting, _ = _toy_dim_setting(tmp_path)
    recipe._run_stage("convergence", replace(setting, fixed_norms=("l2",)), "dim", nn.Identity())
    recipe._run_stage("adaptive", setting, "dim", nn.Identity())
    assert runs == [
        ("convergence-l2", "l2", 1.5),
        ("quick-adaptive-linf", "linf", 0.3),
        ("quick-adaptive-l2", "l2", 1.5),
    ]


@pytest.mark.parametrize(("dataset", "epsilon"), [("mnist-sample", 0.3), ("fashion-mnist", 0.1)])
def test_madry_trains_at_the_datasets_linf_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: str, epsilon: float
) -> None:
    """Madry's PGD uses each dataset's L-inf budget, and its training state is resumable."""
    recipe = _recipe("dim_mnist")
    seen: dict[str, Any] = {}

    def fake_training(name: str, images: torch.Tensor, labels: torch.Tensor, options: Any) -> Any:
        seen.update(name=name, options=options)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), {"epochs": options.epochs}

    monkeypatch.setattr(recipe, "train_architecture", fake_training)
    monkeypatch.setattr(recipe.advdefense, "save", lambda *args, **kwargs: None)
    images, labels = _data()
    data = recipe.LabeledImages(images, labels)
    recipe._model("madry", dataset, tmp_path, data, data, torch.device("cpu"), 0)
    options = seen["options"]
    assert seen["name"] == "madry" and options.pgd.epsilon == epsilon
    assert (options.pgd.steps, options.pgd.step_size) == (40, 0.01)
    assert options.checkpoint.directory == tmp_path / "madry"


@pytest.mark.parametrize(("state_kept", "trains"), [(True, True), (False, False)])
def test_a_shorter_saved_madry_continues_only_from_its_kept_state(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    state_kept: bool,
    trains: bool,
) -> None:
    """Madry saved after fewer epochs than the recipe asks for continues when its training state
    is kept (and keeps it again); without the state it is used as saved, and the recipe says so."""
    recipe = _recipe("dim_mnist")
    asked = recipe.MADRY_TRAINING["epochs"]
    directory = tmp_path / "madry"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"training": {"epochs": asked - 10}}))
    state = recipe.EpochCheckpoint(directory).path
    if state_kept:
        state.write_bytes(b"kept")
    trained: list[int] = []

    def fake_training(name: str, images: torch.Tensor, labels: torch.Tensor, options: Any) -> Any:
        trained.append(options.epochs)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), {"epochs": options.epochs}

    saved_model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    monkeypatch.setattr(recipe, "train_architecture", fake_training)
    monkeypatch.setattr(recipe.advdefense, "save", lambda *args, **kwargs: None)
    monkeypatch.setattr(recipe.advdefense, "load", lambda *args, **kwargs: saved_model)
    images, labels = _data()
    data = recipe.LabeledImages(images, labels)
    model = recipe._model("madry", "mnist-sample", tmp_path, data, data, torch.device("cpu"), 0)
    assert trained == ([asked] if trains else [])
    assert (model is saved_model) is not trains
    assert state.is_file() is state_kept  # the state stays for the next extension
    printed = capsys.readouterr().out
    assert (f"continuing to {asked}" in printed) is trains
    assert ("training state is gone" in printed) is not trains


def test_a_saved_madry_with_all_its_epochs_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe("dim_mnist")
    directory = tmp_path / "madry"
    directory.mkdir()
    epochs = recipe.MADRY_TRAINING["epochs"]
    (directory / "config.json").write_text(json.dumps({"training": {"epochs": epochs}}))
    recipe.EpochCheckpoint(directory).path.write_bytes(b"kept")
    saved_model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))

    def no_training(*args: Any) -> Any:
        raise AssertionError("a finished training is not trained again")

    monkeypatch.setattr(recipe, "train_architecture", no_training)
    monkeypatch.setattr(recipe.advdefense, "load", lambda *args, **kwargs: saved_model)
    images, labels = _data()
    data = recipe.LabeledImages(images, labels)
    assert recipe._model("madry", "mnist-sample", tmp_path, data, data, torch.device("cpu"), 0) is (
        saved_model
    )


def test_dim_latent_figure_follows_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from advdefense.data import LabeledImages
    from advdefense.defenses.dim import DIM

    recipe = _recipe("dim_mnist")
    drawn: list[int] = []

    def plot(codes: torch.Tensor, labels: torch.Tensor, path: Path, seed: int) -> Path:
        drawn.append(seed)
        path.write_bytes(b"png")
        return path

    monkeypatch.setattr(recipe, "plot_latent_tsne", plot)
    torch.manual_seed(0)
    dim = DIM().eval()
    test = LabeledImages(torch.rand(6, 1, 28, 28), torch.arange(6))
    setting = recipe.Setting("toy", tmp_path, test.images, test.labels, {}, 0, False)
    recipe._latent_figure(setting, dim, test)
    recipe._latent_figure(setting, dim, test)
    assert drawn == [0]  # same model, images and seed: kept
    with torch.no_grad():
        next(dim.parameters()).add_(0.01)
    recipe._latent_figure(setting, dim, test)  # retrained: redrawn
    recipe._latent_figure(recipe.Setting("toy", tmp_path, *test, {}, 1, False), dim, test)
    assert drawn == [0, 0, 1]
    record = json.loads((tmp_path / "fig3_latent_tsne.json").read_text())
    assert record["seed"] == 1 and record["test_samples"] == 6
    recipe._latent_figure(setting, nn.Identity(), test)  # not an internal-model classifier
    assert drawn == [0, 0, 1]


def test_dim_tables_keep_models_not_yet_rerun_at_a_new_n(tmp_path: Path) -> None:
    recipe, setting, models = _toy_dim_setting(tmp_path)
    for name, model in models.items():
        recipe._evaluate(setting, "quick", _run(tmp_path, "quick", "minimal", 6), name, model)
    recipe._evaluate(setting, "quick", _run(tmp_path, "quick", "minimal", 12), "dim", models["dim"])
    assert (tmp_path / "runs" / "quick-n6" / "report.md").is_file()
    quick = recipe._minimal_summaries(setting, "quick")
    assert {name: summary.n for name, summary in quick.items()} == {"cnn": 6, "dim": 12}
    recipe.write_tables(setting)
    truth = (tmp_path / "true_robustness.md").read_text()
    assert "| cnn (n = 6) | linf |" in truth  # still reported, at its own n
    assert "| dim | linf |" in truth  # at the setting's n = 12
    # a later command at another n (dim42 at 200 after quick at 1,000) relabels nothing: the
    # table names the n its runs used
    recipe._evaluate(setting, "quick", _run(tmp_path, "quick", "minimal", 12), "cnn", models["cnn"])
    # both are at n = 12 now: the archive at 6 is not even read, so its records may be gone (a
    # checkout without them) without a warning to rerun a run no command reruns
    (tmp_path / "runs" / "quick-n6" / "records.jsonl").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recipe.write_tables(setting)
    recipe.write_tables(replace(setting, images=setting.images[:6], labels=setting.labels[:6]))
    truth = (tmp_path / "true_robustness.md").read_text()
    assert "| cnn | linf |" in truth and "| dim | linf |" in truth
    assert "first n = 12 test samples" in truth


def test_dim_tables_do_not_merge_stages_of_a_retrained_model(tmp_path: Path) -> None:
    """After a retrain, the stages still on the old weights are marked stale and left out of the
    worst case, which would otherwise mix two models."""
    recipe, setting, models = _toy_dim_setting(tmp_path)
    for run, suite in (("dim42", "quick"), ("quick", "quick")):
        config = _run(tmp_path, suite, "minimal", 12)
        for name, model in models.items():
            recipe._evaluate(setting, run, config, name, model)
    for suite in ("quick-adaptive", "convergence"):
        fixed = _run(tmp_path, suite, "fixed", 12, norm="linf", epsilon=0.3)
        for name, model in models.items():
            recipe._evaluate(setting, f"{suite}-linf", fixed, name, model)
    retrained = MeanPixel(2.0)  # so gentle a slope that no level is robust at 0.3
    recipe._evaluate(setting, "quick", _run(tmp_path, "quick", "minimal", 12), "cnn", retrained)
    recipe.write_tables(setting)
    rows = {
        tuple(cells[:2]): cells
        for line in (tmp_path / "true_robustness.md").read_text().splitlines()
        if line.startswith("| ")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    cnn = rows[("cnn", "linf")]
    assert all(cnn[column].endswith("(stale)") for column in (4, 6, 7))
    assert not cnn[5].endswith("(stale)")
    assert cnn[8] == cnn[5] + "*"  # the worst case is the quick stage alone, marked incomplete
    dim = rows[("dim", "linf")]
    assert "stale" not in " ".join(dim) and not dim[8].endswith("*")


def test_dim_tables_ignore_an_archive_of_earlier_weights(tmp_path: Path) -> None:
    recipe, setting, models = _toy_dim_setting(tmp_path)
    for name, model in models.items():
        recipe._evaluate(setting, "quick", _run(tmp_path, "quick", "minimal", 12), name, model)
    retrained = MeanPixel(2.0)
    recipe._evaluate(setting, "quick", _run(tmp_path, "quick", "minimal", 6), "cnn", retrained)
    assert (tmp_path / "runs" / "quick-n12" / "report.md").is_file()
    quick = recipe._minimal_summaries(setting, "quick")
    # dim only ran at 12 (archive); cnn's 12 are of its earlier weights, so its 6 are shown
    assert {name: summary.n for name, summary in quick.items()} == {"cnn": 6, "dim": 12}


def test_a_retrain_into_other_weights_is_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe("dim_mnist")
    trained = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    monkeypatch.setattr(recipe, "train_architecture", lambda *args: (trained, {"epochs": 1}))
    monkeypatch.setattr(recipe.advdefense, "save", lambda *args, **kwargs: None)
    images, labels = _data()
    data = recipe.LabeledImages(images, labels)
    fingerprint = recipe.model_fingerprint(trained)
    for run, weights in (("quick", "0123456789abcdef"), ("dim42", fingerprint)):
        (tmp_path / "runs" / run).mkdir(parents=True)
        run_file = {"models": {"cnn": {"fingerprint": weights}}}
        (tmp_path / "runs" / run / "run.json").write_text(json.dumps(run_file))
    recipe._model("cnn", "fashion-mnist", tmp_path / "models", data, data, torch.device("cpu"), 0)
    printed = capsys.readouterr().out
    assert f"cnn: retrained bit for bit ({fingerprint[:8]}…, the weights dim42 name)" in printed
    assert "older weights (01234567… in quick) stay marked stale" in printed
    (tmp_path / "runs" / "dim42" / "run.json").write_text(
        json.dumps({"models": {"cnn": {"fingerprint": "fedcba9876543210"}}})
    )
    recipe._model("cnn", "fashion-mnist", tmp_path / "models", data, data, torch.device("cpu"), 0)
    printed = capsys.readouterr().out
    assert "not the ones its runs name (01234567…, fedcba98… in dim42, quick)" in printed
    assert "OMP_NUM_THREADS" in printed
    for run in ("quick", "dim42"):
        (tmp_path / "runs" / run / "run.json").write_text(
            json.dumps({"models": {"cnn": {"fingerprint": fingerprint}}})
        )
    recipe._model("cnn", "fashion-mnist", tmp_path / "models", data, data, torch.device("cpu"), 0)
    printed = capsys.readouterr().out
    assert "cnn: test accuracy" in printed
    assert "bit for bit" not in printed and "not the ones" not in printed


def test_dim_worst_case_on_dim42_samples_and_on_every_sample(tmp_path: Path) -> None:
    """dim42 runs on the first 200 of 1,000: one worst case on those 200 (every stage ran on
    them), one on all 1,000 with dim42 counting on its 200."""
    recipe, setting, models = _toy_dim_setting(tmp_path)
    cnn = models["cnn"]
    recipe._evaluate(setting, "dim42", _run(tmp_path, "quick", "minimal", 6), "cnn", cnn)
    recipe._evaluate(setting, "quick", _run(tmp_path, "quick", "minimal", 12), "cnn", cnn)
    recipe.write_tables(setting)
    truth = (tmp_path / "true_robustness.md").read_text()
    row = next(line for line in truth.splitlines() if line.startswith("| cnn | linf |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # levels beyond 0.3 of 0.5: 2 of dim42's 6, 4 of the 12
    assert cells[4] == "33.3 [9, 71]" and cells[5] == "33.3 [13, 61]"
    assert cells[8:] == ["33.3 [9, 71]*", "33.3 [13, 61]*"]  # no fixed-mode stage yet
