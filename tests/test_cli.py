"""The advdefense command: every subcommand end to end on small real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import advdefense
from advdefense.cli import main
from advdefense.defenses.dim import DIM
from advdefense.nn import AbsCNN

SUBCOMMANDS = ("datasets", "train", "evaluate", "report", "reproduce", "demo")


@pytest.fixture(autouse=True)
def _isolated_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVDEFENSE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ADVDEFENSE_MIRROR", raising=False)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_complete_help(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "advdefense.cli", command, "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: advdefense " + command in result.stdout
    if command not in ("datasets", "report"):
        for flag in ("--device", "--seed", "--out", "--quiet"):
            assert flag in result.stdout


def test_datasets_list_and_verify(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "datasets")
    assert code == 0
    for name in ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "mnist-sample"):
        assert name in out
    code, out, _ = _run(capsys, "datasets", "verify")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if not line.startswith(" ")}
    assert "found" in lines["mnist-sample"]
    assert "missing" in lines["cifar10"] and "data/cifar10" in lines["cifar10"]
    assert "datasets found" in out


def test_user_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cases = [
        ("train", "cnn", "--dataset", "mnist-sample", "--epochs", "0", "--out", str(tmp_path)),
        ("evaluate", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")),
        ("report", str(tmp_path / "no-run")),
        ("reproduce", "no-such-recipe", "--recipes", str(tmp_path)),
        ("evaluate", "--model", str(tmp_path), "--mode", "fixed", "--out", str(tmp_path / "r")),
        ("evaluate", "--model", str(tmp_path), "--n", "0", "--out", str(tmp_path / "r")),
    ]
    train = ("train", "cnn", "--dataset", "mnist-sample", "--epochs", "1", "--out", str(tmp_path))
    for flags, problem in [
        (("--batch-size", "0"), "batch_size (--batch-size) must be a positive integer"),
        (("--lr", "0"), "learning_rate (--lr) must be finite and positive"),
        (("--n-train", "-3990"), "--n-train must be a positive integer"),
    ]:
        code, _, err = _run(capsys, *train, *flags)
        assert code == 2 and problem in err, err
        assert not (tmp_path / "config.json").exists()
    for argv in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 2, argv
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err


def test_bad_flag_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "advdefense.cli", "train", "resnet9000", "--dataset", "mnist"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr and "Traceback" not in result.stderr


def test_pickle_checkpoint_is_a_user_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    torch.save(AbsCNN().state_dict(), tmp_path / "model.pt")
    code, _, err = _run(
        capsys,
        "evaluate",
        "--model",
        str(tmp_path / "model.pt"),
        "--dataset",
        "mnist-sample",
        "--out",
        str(tmp_path / "run"),
    )
    assert code == 2 and "pickle-based checkpoint" in err


def test_missing_dataset_names_files_and_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADVDEFENSE_MIRROR", "http://127.0.0.1:9/")  # discard port: refused
    code, _, err = _run(
        capsys,
        "train",
        "cnn",
        "--dataset",
        "svhn",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "m"),
        "--quiet",
    )
    assert code == 2
    assert "train_32x32.mat" in err and str(tmp_path / "data") in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_train_evaluate_report_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model_dir = tmp_path / "cnn"
    code, out, err = _run(
        capsys,
        "train",
        "cnn",
        "--dataset",
        "mnist-sample",
        "--epochs",
        "1",
        "--n-train",
        "600",
        "--seed",
        "1",
        "--out",
        str(model_dir),
        "--quiet",
    )
    assert code == 0, err
    assert "saved cnn" in out and "test accuracy" in out
    config = json.loads((model_dir / "config.json").read_text())
    assert config["dataset"] == "mnist-sample" and config["seed"] == 1
    assert config["training"]["epochs"] == 1 and config["training"]["train_samples"] == 600
    assert 0.5 < config["metrics"]["test_accuracy"] <= 1.0
    assert isinstance(advdefense.load(model_dir), AbsCNN)

    run_dir = tmp_path / "run"
    evaluate = ["evaluate", "--model", str(model_dir), "--n", "12", "--suite", "quick"]
    evaluate += ["--threshold", "Linf=0.1", "--grid-points", "2", "--batch-size", "6"]
    code, out, err = _run(capsys, *evaluate, "--out", str(run_dir), "--quiet")
    assert code == 0, err
    report = json.loads((run_dir / "report.json").read_text())
    assert report["n"] == 12 and report["dataset"] == "mnist-sample"
    assert report["suite"] == "quick"
    cnn = report["models"]["cnn"]
    assert cnn["norms"]["Linf"]["threshold"] == 0.1 and cnn["norms"]["L2"]["threshold"] == 1.5
    assert (run_dir / "accuracy_vs_epsilon.png").is_file()
    assert "| clean accuracy |" in out
    lines = (run_dir / "records.jsonl").read_text()

    code, out, err = _run(capsys, *evaluate, "--out", str(run_dir), "--quiet")
    assert code == 0, err
    assert (run_dir / "records.jsonl").read_text() == lines, "a rerun must skip finished work"

    fixed_dir = tmp_path / "fixed"
    code, out, err = _run(
        capsys,
        "evaluate",
        "--model",
        str(model_dir),
        "--n",
        "20",
        "--suite",
        "quick",
        "--mode",
        "fixed",
        "--norm",
        "L2",
        "--eps",
        "1.5",
        "--out",
        str(fixed_dir),
        "--quiet",
    )
    assert code == 0, err
    assert "robust accuracy" in out

    pgd_dir = tmp_path / "pgd"
    pgd_only = ["evaluate", "--model", str(model_dir), "--n", "20", "--suite", "quick"]
    pgd_only += ["--attacks", "linf-pgd", "--mode", "fixed", "--norm", "Linf", "--eps", "0.1"]
    code, out, err = _run(capsys, *pgd_only, "--out", str(pgd_dir), "--quiet")
    assert code == 0, err
    assert json.loads((pgd_dir / "report.json").read_text())["suite"] == "quick[linf-pgd]"
    records = (pgd_dir / "records.jsonl").read_text().splitlines()
    assert records and {json.loads(line)["attack"] for line in records} == {"linf-pgd"}
    code, _, err = _run(capsys, *pgd_only[:7], "--attacks", "cw", "--out", str(pgd_dir))
    assert code == 2 and "suite 'quick' has no attack 'cw'" in err

    code, out, _ = _run(
        capsys,
        "report",
        str(run_dir),
        "--format",
        "csv",
        "--out",
        str(tmp_path / "table.csv"),
        "--plot",
        str(tmp_path / "p.png"),
    )
    assert code == 0
    assert (tmp_path / "table.csv").read_text().startswith(",cnn")
    assert (tmp_path / "p.png").is_file()
    code, out, _ = _run(capsys, "report", str(run_dir), "--format", "html")
    assert code == 0 and "<table>" in out
    code, _, err = _run(capsys, "report", str(run_dir), str(fixed_dir))
    assert code == 2 and "cannot mix" in err
    code, _, err = _run(capsys, *evaluate, "--detector", str(model_dir), "--out", str(run_dir))
    assert code == 2 and "holds a AbsCNN, not a Detector" in err

    # refused commands leave the run as it was
    run_file = (run_dir / "run.json").read_text()
    for flags, problem in [
        (("--threshold", "L2=-1"), "the threshold must be finite and positive"),
        (("--batch-size", "0"), "batch_size (--batch-size) must be a positive integer"),
        (("--indices", str(tmp_path / "missing.txt")), "missing.txt: cannot read it"),
        (("--seed", "5"), "under another configuration (seed 0 -> 5)"),
        (("--split", "train"), "under another configuration (split 'test' -> 'train')"),
        (("--split", "train", "--replace"), "holds records computed on other samples"),
    ]:
        code, _, err = _run(capsys, *evaluate, *flags, "--out", str(run_dir), "--quiet")
        assert code == 2 and problem in err, err
        assert (run_dir / "run.json").read_text() == run_file


PDM_WEIGHTS = ["--arch", "resnet8", "--classification-weight", "2", "--siamese-weight", "0.1"]


@pytest.mark.parametrize(
    ("architecture", "extra", "recorded"),
    [
        ("madry", ["--pgd-steps", "2", "--pgd-epsilon", "0.1"], {}),
        ("dim", ["--denoiser-epochs", "1"], {"denoiser_epochs": 1}),
        ("dn-singleim", [], {}),
        ("pdm", PDM_WEIGHTS, {"classification_weight": 2.0, "siamese_weight": 0.1}),
    ],
)
def test_train_other_architectures(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    architecture: str,
    extra: list[str],
    recorded: dict[str, float],
) -> None:
    code, _, err = _run(
        capsys,
        "train",
        architecture,
        "--dataset",
        "mnist-sample",
        "--epochs",
        "1",
        "--n-train",
        "128",
        "--out",
        str(tmp_path / "m"),
        "--quiet",
        *extra,
    )
    assert code == 0, err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    expected = {"madry": "madry-cnn", "dim": "dim", "dn-singleim": "dn-singleim", "pdm": "resnet"}
    assert config["architecture"] == expected[architecture]
    assert config["training"]["train_samples"] == 128
    assert {key: config["training"][key] for key in recorded} == recorded
    model = advdefense.load(tmp_path / "m")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_a_pdm_family_model_has_every_class_of_its_dataset(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Three training images hold fewer than ten labels; the model still has ten outputs."""
    argv = ["train", "ce", *PDM_WEIGHTS[:2], "--dataset", "mnist-sample", "--epochs", "1"]
    code, _, err = _run(capsys, *argv, "--n-train", "3", "--out", str(tmp_path), "--quiet")
    assert code == 0, err
    assert advdefense.load(tmp_path)(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_reproduce_lists_and_runs_a_recipe(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "marker.py").write_text(
        "from pathlib import Path\n"
        "def reproduce(out, device, seed, progress, n):\n"
        "    Path(out).mkdir(parents=True, exist_ok=True)\n"
        "    (Path(out) / 'done.txt').write_text(f'{device} {seed} {progress} {n}')\n"
    )
    code, out, _ = _run(capsys, "reproduce", "--recipes", str(recipes))
    assert code == 0 and "marker" in out
    code, _, err = _run(
        capsys,
        "reproduce",
        "marker",
        "--recipes",
        str(recipes),
        "--device",
        "cpu",
        "--seed",
        "4",
        "--n",
        "12",
        "--quiet",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0, err
    assert (tmp_path / "o" / "done.txt").read_text() == "cpu 4 False 12"
    for flag, value in (
        ("--models", "a"),
        ("--stages", "a"),
        ("--norms", "l2"),
        ("--attack-batch", "5"),
    ):
        code, _, err = _run(capsys, "reproduce", "marker", "--recipes", str(recipes), flag, value)
        assert code == 2 and f"takes no {flag}" in err, flag
    # a count below one is refused before the recipe runs (dim_mnist once read --n 0 as its
    # default and --n -3 as "all but the last three")
    marker = ("reproduce", "marker", "--recipes", str(recipes))
    for flag, value in (("--n", "0"), ("--n", "-3"), ("--attack-batch", "0")):
        out_dir = tmp_path / f"refused{flag}{value}"
        code, _, err = _run(capsys, *marker, flag, value, "--out", str(out_dir))
        assert code == 2 and f"{flag} must be a positive integer, got {value}" in err, err
        assert not out_dir.exists()


def test_reproduce_passes_models_datasets_stages_norms_and_attack_batch(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "picky.py").write_text(
        "from pathlib import Path\n"
        "def reproduce(out, device, seed, progress, n, models=('x',), datasets=None,\n"
        "              stages=('all',), norms=('linf',), attack_batch=None):\n"
        "    Path(out).mkdir(parents=True, exist_ok=True)\n"
        "    (Path(out) / 'done.txt').write_text(\n"
        "        f'{models} {datasets} {stages} {norms} {attack_batch}')\n"
    )
    arguments = ("reproduce", "picky", "--recipes", str(recipes), "--out", str(tmp_path / "o"))
    code, _, err = _run(capsys, *arguments, "--models", "dim, bidim", "--datasets", "mnist")
    assert code == 0, err
    done = tmp_path / "o" / "done.txt"
    assert done.read_text() == "('dim', 'bidim') ('mnist',) ('all',) ('linf',) None"
    code, _, err = _run(capsys, *arguments, "--stages", "whitebox,blackbox", "--attack-batch", "7")
    assert code == 0, err
    assert done.read_text() == "('x',) None ('whitebox', 'blackbox') ('linf',) 7"
    code, _, err = _run(capsys, *arguments, "--norms", "l2")
    assert code == 0, err
    assert done.read_text() == "('x',) None ('all',) ('l2',) None"
    with pytest.raises(SystemExit) as exit_info:
        main([*arguments, "--models", ","])
    assert exit_info.value.code == 2 and "comma-separated" in capsys.readouterr().err


def test_cuda_without_gpu_is_a_user_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present, so --device cuda is valid here")
    code, _, err = _run(
        capsys,
        "train",
        "cnn",
        "--dataset",
        "mnist-sample",
        "--epochs",
        "1",
        "--device",
        "cuda",
        "--out",
        str(tmp_path),
    )
    assert code == 2 and "no CUDA GPU" in err


@pytest.mark.slow
def test_demo_meets_its_acceptance_bar(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = _run(capsys, "demo", "--out", str(tmp_path / "demo"), "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "demo" / "run" / "report.json").read_text())
    cnn, dim = report["models"]["cnn"], report["models"]["dim"]
    assert cnn["clean_accuracy"] >= 0.95
    assert dim["clean_accuracy"] >= 0.8
    for model in (cnn, dim):
        assert set(model["attacks"]) == {"fgsm", "linf-pgd", "l2-pgd", "l2-deepfool"}
        assert model["flags"] == []
    assert "| clean accuracy |" in out


def test_demo_trains_saves_and_attacks_both_models(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "demo"
    args = ("demo", "--out", str(out), "--quiet", "--n", "6", "--epochs", "1", "--dim-epochs", "1")
    code, printed, err = _run(capsys, *args)
    assert code == 0, err
    assert isinstance(advdefense.load(out / "models" / "cnn"), AbsCNN)
    dim = advdefense.load(out / "models" / "dim")
    assert isinstance(dim, DIM)
    training = json.loads((out / "models" / "dim" / "config.json").read_text())["training"]
    assert (training["denoiser_epochs"], training["internal_epochs"]) == (1, 1)
    report = json.loads((out / "run" / "report.json").read_text())
    assert set(report["models"]) == {"cnn", "dim"}
    assert "models:" in printed and str(out / "models" / "dim") in printed
    code, _, err = _run(capsys, "demo", "--out", str(out), "--quiet", "--dim-epochs", "0")
    assert code == 2 and "dim_epochs" in err
