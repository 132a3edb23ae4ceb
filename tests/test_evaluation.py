"""The evaluation harness: minimal and fixed modes, re-checks, resume, sanity flags, reports."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import eagerpy as ep
import foolbox as fb
import numpy as np
import pytest
import torch
from torch import nn

from advdefense.attacks import get_attack
from advdefense.attacks.catalog import AttackEntry
from advdefense.attacks.suites import AttackSuite
from advdefense.defenses.detector import Detector
from advdefense.errors import InputError, UserError
from advdefense.evaluation import runner
from advdefense.evaluation.detection import robust_under_rejection
from advdefense.evaluation.metrics import wilson_interval
from advdefense.evaluation.report import plot_accuracy_curves, render, report_json, write_reports
from advdefense.evaluation.robustness import clean_accuracy, predict
from advdefense.evaluation.run import (
    RunConfig,
    archive_before_resize,
    evaluate_models,
    first_indices,
    load_run,
)
from advdefense.evaluation.runner import run_fixed, run_minimal
from advdefense.evaluation.sanity import model_flags
from advdefense.evaluation.store import ResultStore, model_fingerprint
from advdefense.evaluation.summary import ModelSummary, summarize_fixed, summarize_minimal
from advdefense.modes import attack_mode, evaluation_mode
from advdefense.registry import register_model

THRESHOLDS = {"l2": 1.5, "linf": 0.3}


@dataclass(frozen=True)
class _NoConfig:
    pass


class Brightness(nn.Module):
    """Class 1 when the mean pixel exceeds 0.5, else class 0: easy to reason about."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))
        self.dropout = nn.Dropout(0.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        score = self.scale * (images.flatten(1).mean(1) - 0.5)
        return torch.stack([-score, score], dim=1)


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    levels = torch.linspace(0.05, 0.95, n)
    images = levels.view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    images += 0.01 * torch.rand(images.shape, generator=generator) - 0.005
    images = images.clamp(0, 1)
    labels = (levels > 0.5).long()
    labels[:3] = 1 - labels[:3]  # three clean mistakes
    return images, labels


def _suite(*attack_ids: str) -> AttackSuite:
    return AttackSuite("test", "1", tuple(get_attack(a) for a in attack_ids), "test suite")


DETERMINISTIC = _suite("fgsm", "l2-deepfool")
QUICKISH = _suite("fgsm", "linf-pgd", "l2-pgd", "l2-deepfool")


def test_predict_and_clean_accuracy() -> None:
    images, labels = _data()
    model = Brightness()
    assert torch.equal(predict(model, images, batch_size=7), (images.mean((1, 2, 3)) > 0.5).long())
    assert clean_accuracy(model, images, labels) == pytest.approx(37 / 40)


def test_evaluation_mode_restores_each_submodule() -> None:
    model = Brightness().train()
    model.dropout.eval()
    with evaluation_mode(model):
        assert not model.training and not model.dropout.training
    assert model.training and not model.dropout.training


def test_attack_mode_freezes_parameters_and_restores_them() -> None:
    model = Brightness().train()
    model.scale.requires_grad_(True)
    frozen_before = nn.Linear(2, 2).requires_grad_(False)
    model.extra = frozen_before
    with pytest.raises(RuntimeError, match="inside"), attack_mode(model):
        assert not model.training
        assert not any(parameter.requires_grad for parameter in model.parameters())
        raise RuntimeError("inside")
    assert model.training and model.scale.requires_grad
    assert not any(parameter.requires_grad for parameter in frozen_before.parameters())


def test_frozen_parameters_give_foolbox_the_same_input_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    images = ep.astensor(torch.rand(5, 1, 6, 6))
    labels = ep.astensor(torch.tensor([0, 1, 2, 0, 1]))

    def gradient() -> torch.Tensor:
        foolbox_model = fb.PyTorchModel(model, bounds=(0.0, 1.0))

        def loss(inputs: ep.Tensor) -> ep.Tensor:
            return ep.crossentropy(foolbox_model(inputs), labels).sum()

        return ep.value_and_grad(loss, images)[1].raw

    trained = gradient()
    assert all(parameter.grad is not None for parameter in model.parameters())
    model.zero_grad(set_to_none=True)
    with attack_mode(model):
        frozen = gradient()
    assert torch.equal(frozen, trained)
    assert all(parameter.grad is None for parameter in model.parameters())


def test_attacks_leave_no_weight_gradients(tmp_path: Path) -> None:
    model = Brightness()
    arguments = (model, *_data(), DETERMINISTIC, ResultStore(tmp_path))
    run_minimal(*arguments, model_name="b", thresholds=THRESHOLDS, progress=False)
    assert model.scale.grad is None and model.scale.requires_grad
    run_fixed(*arguments, model_name="b", norm="linf", epsilon=0.1, progress=False)
    assert model.scale.grad is None and model.scale.requires_grad


def test_minimal_mode_sanity(tmp_path: Path) -> None:
    images, labels = _data()
    model = Brightness().train()
    store = ResultStore(tmp_path)
    keys = run_minimal(
        model,
        images,
        labels,
        QUICKISH,
        store,
        model_name="bright",
        thresholds=THRESHOLDS,
        batch_size=16,
        grid_points=5,
        progress=False,
    )
    assert model.training, "the caller's mode must be restored"
    assert len(keys) == 4 * 3 and len(store) == 12  # 4 attacks x 3 batches
    summary = summarize_minimal(
        store, keys, model="bright", indices=range(40), thresholds=THRESHOLDS
    )
    assert summary.clean_accuracy == pytest.approx(37 / 40)
    for attack in summary.attacks.values():
        # epsilon 0 reproduces clean accuracy: distance 0 exactly for the clean mistakes
        assert int((attack.distances == 0).sum()) == 3
        assert attack.accuracy <= summary.clean_accuracy
        assert attack.forward_calls > 0 and attack.seconds > 0
    for norm, worst in summary.norms.items():
        per_attack = [a.accuracy for a in summary.attacks.values() if a.norm == norm]
        assert worst.accuracy <= min(per_attack)
        accuracies = [accuracy for _, accuracy in worst.curve()]
        assert all(b <= a for a, b in itertools.pairwise(accuracies)), "never rises with eps"
        assert accuracies[0] == pytest.approx(summary.clean_accuracy)
    # DeepFool is unbounded: it breaks every sample of this model
    assert np.isfinite(summary.attacks["l2-deepfool"].distances).all()
    assert summary.minimal_accuracy == min(a.accuracy for a in summary.attacks.values())


def _minimal_arguments(batch_size: int) -> dict[str, Any]:
    """run_minimal's keyword arguments for model "b" of the resume tests."""
    return {
        "model_name": "b",
        "thresholds": THRESHOLDS,
        "batch_size": batch_size,
        "progress": False,
    }


def test_rerun_skips_finished_work(tmp_path: Path) -> None:
    images, labels = _data()
    arguments = _minimal_arguments(batch_size=16)
    keys = run_minimal(
        Brightness(), images, labels, DETERMINISTIC, ResultStore(tmp_path), **arguments
    )
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    again = run_minimal(
        Brightness(), images, labels, DETERMINISTIC, ResultStore(tmp_path), **arguments
    )
    assert again == keys
    assert (tmp_path / "records.jsonl").read_text().splitlines() == lines
    other_seed = run_minimal(
        Brightness(),
        images,
        labels,
        DETERMINISTIC,
        ResultStore(tmp_path),
        **{**arguments, "seed": 1},
    )
    assert set(other_seed).isdisjoint(keys)


def test_attacks_with_object_parameters_are_recorded(tmp_path: Path) -> None:
    images, labels = _data()
    suite = _suite("l2-inversion", "l1-inversion")  # Foolbox LpDistance objects as parameters
    with ResultStore(tmp_path) as store:
        keys = run_minimal(
            Brightness(),
            images,
            labels,
            suite,
            store,
            model_name="b",
            thresholds={"l2": 1.5, "l1": 8.0},
            progress=False,
        )
        records = [store.get(key) for key in keys]
    assert [r["parameters"] for r in records if r] == [{"distance": "l2"}, {"distance": "l1"}]
    assert keys[0] != keys[1]


def test_store_drops_a_torn_last_line(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        store.append({"key": "a", "value": 1}, torch.zeros(2, 1, 2, 2))
        store.append({"key": "b", "value": 2})
    with (tmp_path / "records.jsonl").open("ab") as handle:
        handle.write(b'{"key": "c", "val')
    assert [r["key"] for r in ResultStore(tmp_path, writable=False).records()] == ["a", "b"]
    with ResultStore(tmp_path) as reopened:
        assert [r["key"] for r in reopened.records()] == ["a", "b"]
        assert (tmp_path / "records.jsonl").read_bytes().endswith(b"}\n")
        reopened.append({"key": "c", "value": 3})
    reader = ResultStore(tmp_path, writable=False)
    assert [r["key"] for r in reader.records()] == ["a", "b", "c"]
    adversarials = reader.adversarials("a")
    assert adversarials is not None and adversarials.shape == (2, 1, 2, 2)


def test_store_keeps_parts_of_a_record_until_it_is_written(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        assert store.part("k", "sigmoid-10") is None
        store.save_part("k", "sigmoid-10", {"epsilon_0": torch.ones(2, 3)}, {"error": None})
        store.save_part("k", "bpda/identity", {}, {"error": "ValueError: x", "seconds": 1.5})
        store.save_part("other", "sigmoid-10", {"epsilon_0": torch.zeros(1)}, {"n": 1})
    reader = ResultStore(tmp_path, writable=False)  # parts outlive the process that saved them
    saved = reader.part("k", "sigmoid-10")
    assert saved is not None and saved[1] == {"error": None}
    assert torch.equal(saved[0]["epsilon_0"], torch.ones(2, 3))
    assert reader.part("k", "bpda/identity") == ({}, {"error": "ValueError: x", "seconds": 1.5})
    with pytest.raises(UserError, match="read-only"):
        reader.save_part("k", "x", {}, {})
    with ResultStore(tmp_path) as store:
        store.append({"key": "k"})
        assert store.part("k", "sigmoid-10") is None and store.part("k", "bpda/identity") is None
        assert store.part("other", "sigmoid-10") is not None  # another record's parts stay


_KILLABLE_RUN = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from advdefense.attacks import get_attack
    from advdefense.attacks.suites import AttackSuite
    from advdefense.evaluation.runner import run_minimal
    from advdefense.evaluation.store import ResultStore

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(20.0))
        def forward(self, x):
            time.sleep(0.002)
            s = self.scale * (x.flatten(1).mean(1) - 0.5)
            return torch.stack([-s, s], 1)

    levels = torch.linspace(0.05, 0.95, 60)
    images = levels.view(60, 1, 1, 1).expand(60, 1, 4, 4).clone()
    labels = (levels > 0.5).long()
    suite = AttackSuite("t", "1", (get_attack("fgsm"), get_attack("l2-deepfool")), "t")
    run_minimal(Slow(), images, labels, suite, ResultStore(sys.argv[1]), model_name="slow",
                thresholds={"l2": 1.5, "linf": 0.3}, batch_size=4, progress=False)
""")


def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_KILLABLE_RUN)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    process = subprocess.Popen([sys.executable, str(script), str(killed)])
    records = killed / "records.jsonl"
    deadline = time.monotonic() + 600  # generous: the machine may be busy
    while process.poll() is None and time.monotonic() < deadline:
        if records.exists() and records.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = ResultStore(killed, writable=False)
    assert 5 <= len(partial) < 30, "the run must have been killed mid-way"
    subprocess.run([sys.executable, str(script), str(killed)], check=True)
    subprocess.run([sys.executable, str(script), str(clean)], check=True)
    resumed_lines = records.read_text().splitlines()
    keys = [json.loads(line)["key"] for line in resumed_lines]
    assert len(keys) == len(set(keys)) == 30  # 2 attacks x 15 batches, none lost or doubled
    clean_records = {r["key"]: r for r in ResultStore(clean, writable=False).records()}
    for record in ResultStore(killed, writable=False).records():
        assert record["distances"] == clean_records[record["key"]]["distances"]


def test_fixed_mode_matches_minimal_mode(tmp_path: Path) -> None:
    images, labels = _data()
    suite = _suite("fgsm", "linf-pgd")
    store = ResultStore(tmp_path)
    keys = run_minimal(
        Brightness(),
        images,
        labels,
        suite,
        store,
        model_name="b",
        thresholds={"linf": 0.1},
        batch_size=16,
        grid_points=4,
        progress=False,
    )
    minimal = summarize_minimal(store, keys, model="b", indices=range(40), thresholds={"linf": 0.1})
    fixed_keys = run_fixed(
        Brightness(),
        images,
        labels,
        _suite("fgsm"),
        store,
        model_name="b",
        norm="linf",
        epsilon=0.1,
        batch_size=16,
        progress=False,
    )
    clean_correct = [bool(c) for c in predict(Brightness(), images) == labels]
    fixed = summarize_fixed(
        store,
        fixed_keys,
        model="b",
        indices=range(40),
        clean_correct=clean_correct,
        norm="linf",
        epsilon=0.1,
    )
    assert fixed.robust_accuracy == pytest.approx(minimal.attacks["fgsm"].accuracy)
    assert fixed.broken_by.count("clean") == 3
    assert 0 < fixed.robust_accuracy < fixed.clean_accuracy


def test_fixed_mode_attacks_only_what_is_still_robust(tmp_path: Path) -> None:
    images, labels = _data()
    store = ResultStore(tmp_path)
    keys = run_fixed(
        Brightness(),
        images,
        labels,
        _suite("fgsm", "l2-deepfool", "linf-pgd"),
        store,
        model_name="b",
        norm="linf",
        epsilon=0.1,
        batch_size=50,
        progress=False,
    )
    first, second = (store.get(key) for key in keys)
    assert first is not None and second is not None
    assert second["attack"] == "linf-pgd"  # the L2 attack is not part of an L-inf evaluation
    survivors = [i for i, b in zip(first["indices"], first["broken"], strict=True) if not b]
    assert second["indices"] == survivors


class _LyingAttack:
    """Claims success with adversarials outside the budget and outside [0, 1]."""

    def __call__(
        self,
        model: Any,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        epsilons: list[float | None],
        **_: Any,
    ) -> tuple[Any, Any, torch.Tensor]:
        fake = [1.5 - images for _ in epsilons]
        return fake, fake, torch.ones(len(epsilons), images.shape[0], dtype=torch.bool)


def test_adversarials_are_rechecked_not_trusted(tmp_path: Path) -> None:
    images, labels = _data()
    liar = AttackEntry("liar", "linf", _LyingAttack, MappingProxyType({}), "test double")
    store = ResultStore(tmp_path)
    keys = run_fixed(
        Brightness(),
        images,
        labels,
        AttackSuite("t", "1", (liar,), "t"),
        store,
        model_name="b",
        norm="linf",
        epsilon=0.01,
        progress=False,
    )
    record = store.get(keys[0])
    assert record is not None and not any(record["broken"])


def test_bad_arguments(tmp_path: Path) -> None:
    images, labels = _data()
    store = ResultStore(tmp_path)
    with pytest.raises(InputError, match="no threshold given for norm"):
        run_minimal(
            Brightness(),
            images,
            labels,
            QUICKISH,
            store,
            model_name="b",
            thresholds={"l2": 1.5},
            progress=False,
        )
    with pytest.raises(InputError, match="labels has 39 entries"):
        run_minimal(
            Brightness(),
            images,
            labels[1:],
            QUICKISH,
            store,
            model_name="b",
            thresholds=THRESHOLDS,
            progress=False,
        )
    with pytest.raises(InputError, match=r"labels must lie in \[0, 1\], got values in \[0, 7\]"):
        run_minimal(  # Brightness has 2 classes: label 7 would count every sample as broken
            Brightness(),
            images,
            labels.clamp(max=1) * 7,
            QUICKISH,
            store,
            model_name="b",
            thresholds=THRESHOLDS,
            progress=False,
        )
    with pytest.raises(InputError, match="has no l1 attack"):
        run_fixed(
            Brightness(),
            images,
            labels,
            QUICKISH,
            store,
            model_name="b",
            norm="l1",
            epsilon=1.0,
            progress=False,
        )
    with pytest.raises(InputError, match="exceeds the 40 samples"):
        first_indices(41, 40)
    indices_file = tmp_path / "indices.txt"
    indices_file.write_text("3\n1\n2\n")
    assert first_indices(2, 40, indices_file) == (3, 1)
    indices_file.write_text("[1, 1]")
    with pytest.raises(InputError, match="distinct"):
        first_indices(2, 40, indices_file)


class _Binarized(Brightness):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward((images > 0.5).float())


class _Noisy(Brightness):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images) + torch.randn(images.shape[0], 2)


class _Softmax(Brightness):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images).softmax(1)


def test_sanity_flags() -> None:
    images, labels = _data()
    assert model_flags(Brightness().eval(), images, labels) == []
    assert any("training mode" in f for f in model_flags(Brightness().train(), images, labels))
    assert any("zero input gradients" in f for f in model_flags(_Binarized(), images, labels))
    assert any("randomized output" in f for f in model_flags(_Noisy(), images, labels))
    assert any("probabilities" in f for f in model_flags(_Softmax(), images, labels))


def test_wilson_interval() -> None:
    low, high = wilson_interval(95, 100)
    assert low == pytest.approx(0.8882, abs=1e-3)
    assert high == pytest.approx(0.9785, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def _config(mode: str = "minimal", **extra: Any) -> RunConfig:
    return RunConfig(
        dataset="mnist-sample",
        split="test",
        indices=tuple(range(40)),
        suite="test",
        suite_version="1",
        mode=mode,  # type: ignore[arg-type]
        thresholds=THRESHOLDS,
        batch_size=20,
        grid_points=3,
        **extra,
    )


def test_run_report_formats_and_plot(tmp_path: Path) -> None:
    images, labels = _data()
    models = {"bright": Brightness().eval(), "binary": _Binarized().eval()}
    run = evaluate_models(
        models, images, labels, DETERMINISTIC, _config(), tmp_path / "run", progress=False
    )
    assert report_json([load_run(tmp_path / "run")]) == report_json([run])
    document = report_json([run])
    assert {"dataset", "n", "seed", "suite", "models"} <= set(document)
    bright = document["models"]["bright"]
    assert set(bright) >= {"clean_accuracy", "attacks", "norms", "minimal_accuracy", "flags"}
    assert set(bright["norms"]) == {"L2", "Linf"}
    assert set(bright["attacks"]["fgsm"]) >= {"norm", "threshold", "accuracy", "median_distance"}
    assert bright["flags"] == []
    assert any("zero input gradients" in flag for flag in document["models"]["binary"]["flags"])
    markdown = render([run], "md")
    assert "| clean accuracy | 92.5% [" in markdown
    assert markdown.index("**L2 attacks**") < markdown.index("**Linf attacks**")
    assert "all L2 attacks: median / accuracy" in markdown and "minimal accuracy" in markdown
    assert "n = 40, seed = 0" in markdown
    assert render([run], "csv").splitlines()[0] == ",bright,binary"
    assert "<table>" in render([run], "html")
    with pytest.raises(InputError, match="unknown format"):
        render([run], "pdf")
    plot = plot_accuracy_curves([run], tmp_path / "plot.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fixed = evaluate_models(
        {"bright": Brightness().eval(), "binary": _Binarized().eval()},
        images,
        labels,
        DETERMINISTIC,
        _config("fixed", norm="linf", epsilon=0.1),
        tmp_path / "fixed",
        progress=False,
    )
    assert "robust accuracy" in render([fixed], "md")
    # fixed mode keeps the model checks too (biCNN's zero gradients must not go unsaid)
    flags = report_json([load_run(tmp_path / "fixed")])["models"]
    assert flags["bright"]["flags"] == []
    assert any("zero input gradients" in flag for flag in flags["binary"]["flags"])
    assert "binary: " in render([fixed], "md").split("Flags:")[1]
    with pytest.raises(InputError, match="cannot mix"):
        render([run, fixed], "md")
    with pytest.raises(UserError, match="not an evaluation run"):
        load_run(tmp_path)


def test_fixed_report_merges_runs_of_one_model_per_sample(tmp_path: Path) -> None:
    from advdefense.evaluation.run import RunResult
    from advdefense.evaluation.summary import FixedSummary

    config = _config("fixed", norm="linf", epsilon=0.1)
    samples = len(config.indices)

    def run(name: str, broken: dict[int, str], fingerprint: str) -> RunResult:
        broken_by: list[str | None] = [broken.get(i) for i in range(samples)]
        attacks = {attack: 1.0 for attack in broken.values()}
        summary = FixedSummary("m", "linf", 0.1, samples, 1.0, broken_by, attacks, fingerprint)
        return RunResult(tmp_path / name, config, [summary], {})

    pgd = run("pgd", {0: "linf-pgd", 1: "linf-pgd"}, "f1")
    longer = run("long", {1: "linf-pgd", 2: "linf-pgd-long"}, "f1")
    other_weights = run("other", {3: "linf-pgd"}, "f2")
    row = next(
        line
        for line in render([pgd, longer, other_weights], "md").splitlines()
        if line.startswith("| robust against every run")
    )
    # Samples 0, 1 and 2 fall in one run or the other: 37 of 40 robust in both.
    assert row.split(" | ")[1:] == ["92.5% [80.1, 97.4]", "92.5% [80.1, 97.4]", "— |"]
    # one model in two runs: a column (and a JSON entry) each, named by run
    models = report_json([pgd, longer])["models"]
    assert sorted(models) == ["m (long)", "m (pgd)"]
    merged = models["m (pgd)"]
    assert merged["robust_accuracy_over_runs"] == 37 / 40 and merged["runs_merged"] == 2
    assert models["m (long)"]["robust_accuracy"] == 38 / 40
    header = render([pgd, longer], "md").splitlines()[0]
    assert header == "|  | m (pgd) | m (long) |"
    assert "robust against every run" not in render([pgd, other_weights], "md")
    # A wrapper without weights of its own (biCNN) shares its model's fingerprint: not merged.
    wrapper = run("wrapper", {5: "linf-pgd"}, "f1")
    wrapper.summaries[0] = dataclasses.replace(wrapper.summaries[0], model="wrapped")
    assert "robust against every run" not in render([pgd, wrapper], "md")


def test_fixed_mode_flags_attack_errors_and_solver_stalls(tmp_path: Path) -> None:
    from advdefense.evaluation.sanity import fixed_result_flags
    from advdefense.evaluation.summary import summarize_fixed

    with ResultStore(tmp_path) as store:
        for key, error, stalled in [
            ("k1", "TypeError: no gradient", None),
            ("k2", None, "solver did not return [batch positions [1]]"),
            ("k3", None, None),
        ]:
            attack = "linf-pgd" if key == "k1" else "linf-brendel-bethge"
            broken = [key == "k3", False]
            record = {"key": key, "attack": attack, "seconds": 1.0, "indices": [0, 1]}
            store.append({**record, "broken": broken, "error": error, "solver_stalls": stalled})
        summary = summarize_fixed(
            store,
            ["k1", "k2", "k3"],
            model="m",
            indices=[0, 1],
            clean_correct=[True, True],
            norm="linf",
            epsilon=0.1,
        )
    assert summary.broken_by == ["linf-brendel-bethge", None]
    assert fixed_result_flags(summary) == [
        "linf-pgd raised on some batches (counted as not broken; rerunning the command retries "
        "a batch it raised on everywhere): TypeError: no gradient",
        "linf-brendel-bethge: solver did not return [batch positions [1]]",
    ]


@pytest.mark.parametrize(
    ("attacks", "long_breaks", "flagged"),
    [
        (("linf-pgd", "linf-pgd-long"), 2, True),
        (("linf-pgd", "linf-pgd-long"), 1, False),  # within max(1, 1% of n)
        (("linf-pgd-long", "linf-pgd"), 2, False),  # the long run did not follow the short one
    ],
)
def test_fixed_mode_flags_an_unconverged_pgd(
    tmp_path: Path, attacks: tuple[str, str], long_breaks: int, flagged: bool
) -> None:
    """In fixed mode the long rerun attacks what the shorter one left robust: every sample it
    breaks counts against convergence (DESIGN.md §3.5)."""
    from advdefense.evaluation.sanity import fixed_result_flags
    from advdefense.evaluation.summary import summarize_fixed

    breaks = {"linf-pgd": [0, 1, 2], "linf-pgd-long": list(range(3, 3 + long_breaks))}
    with ResultStore(tmp_path) as store:
        for attack in attacks:
            broken = [index in breaks[attack] for index in range(10)]
            store.append(
                {"key": attack, "attack": attack, "seconds": 1.0, "indices": list(range(10))}
                | {"broken": broken}
            )
        summary = summarize_fixed(
            store,
            list(attacks),
            model="m",
            indices=list(range(10)),
            clean_correct=[True] * 10,
            norm="linf",
            epsilon=0.3,
        )
    expected = (
        "linf-pgd has not converged: linf-pgd-long (5x the steps, 5 restarts) breaks 2 more of "
        "10 samples within the threshold; the worst case counts both, but give the other "
        "iterative attacks more steps too"
    )
    assert fixed_result_flags(summary) == ([expected] if flagged else [])


def test_a_model_has_one_writer_at_a_time(tmp_path: Path) -> None:
    """Two stores may write one directory, each for models of its own; a model claimed by one
    is refused to the other until the first closes."""
    with ResultStore(tmp_path) as first:
        first.claim("m")
        first.append({"key": "a"})
        second = ResultStore(tmp_path)
        with pytest.raises(UserError, match=r"m is being evaluated into .* by another process"):
            second.claim("m")
        second.claim("n")
        second.append({"key": "b"})
        first.append({"key": "c"})
        reader = ResultStore(tmp_path, writable=False)
        assert {"a", "b", "c"} <= {record["key"] for record in reader.records()}
        with pytest.raises(UserError, match="read-only"):
            reader.append({"key": "d"})
        with pytest.raises(UserError, match="read-only"):
            reader.claim("o")
        second.close()
    with ResultStore(tmp_path) as store:
        store.claim("m")  # freed by close
        assert len(store) == 3


_CONCURRENT_RUN = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from advdefense.attacks import get_attack
    from advdefense.attacks.suites import AttackSuite
    from advdefense.evaluation.run import RunConfig, evaluate_models

    class Slow(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(scale))
        def forward(self, x):
            time.sleep(self.pause)
            s = self.scale * (x.flatten(1).mean(1) - 0.5)
            return torch.stack([-s, s], 1)

    directory, name, scale, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    Slow.pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.002
    levels = torch.linspace(0.05, 0.95, n)
    images = levels.view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    labels = (levels > 0.5).long()
    suite = AttackSuite("t", "1", (get_attack("fgsm"), get_attack("l2-deepfool")), "t")
    config = RunConfig(dataset="toy", split="test", indices=tuple(range(n)), suite="t",
                       suite_version="1", mode="minimal",
                       thresholds={"l2": 1.5, "linf": 0.3}, batch_size=4, grid_points=3)
    evaluate_models({name: Slow(scale)}, images, labels, suite, config, directory,
                    progress=False)
""")


def test_two_processes_evaluate_two_models_into_one_run(tmp_path: Path) -> None:
    """Run concurrently, two models land in one run file with the records a lone run writes."""
    script = tmp_path / "run.py"
    script.write_text(_CONCURRENT_RUN)
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    models = (("steep", "20"), ("gentle", "5"))
    processes = [
        subprocess.Popen([sys.executable, str(script), str(shared), name, scale, "60"])
        for name, scale in models
    ]
    assert all(process.wait() == 0 for process in processes)
    for name, scale in models:
        subprocess.run([sys.executable, str(script), str(alone), name, scale, "60"], check=True)
    run = load_run(shared)
    assert sorted(s.model for s in run.summaries) == ["gentle", "steep"]
    lines = (shared / "records.jsonl").read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines]  # no torn or interleaved line
    assert len(keys) == len(set(keys)) == 60  # 2 models x 2 attacks x 15 batches
    lone = {r["key"]: r for r in ResultStore(alone, writable=False).records()}
    for record in ResultStore(shared, writable=False).records():
        assert record["distances"] == lone[record["key"]]["distances"]


def test_another_configuration_is_refused_while_a_run_goes_on(tmp_path: Path) -> None:
    """A run of other samples would start the run file afresh under a running evaluation."""
    script = tmp_path / "run.py"
    script.write_text(_CONCURRENT_RUN)
    slow = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run"), "a", "20", "60", "1"]
    )
    try:
        deadline = time.monotonic() + 600  # generous: the machine may be busy
        while not (tmp_path / "run" / "run.json").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow.poll() is None, "the slow run ended before the check"
        other = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "run"), "b", "20", "40"],
            capture_output=True,
            text=True,
        )
        assert slow.poll() is None, "the slow run ended before the check"
        assert other.returncode != 0 and "another configuration" in other.stderr
        same = subprocess.run(  # the same configuration shares the run: another model joins
            [sys.executable, str(script), str(tmp_path / "run"), "c", "20", "60"],
            capture_output=True,
            text=True,
        )
        assert same.returncode == 0, same.stderr
    finally:
        slow.kill()
        slow.wait()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert len(run["config"]["indices"]) == 60 and set(run["models"]) == {"a", "c"}


def test_models_accumulate_in_one_run(tmp_path: Path) -> None:
    images, labels = _data()
    for name in ("first", "second"):
        evaluate_models(
            {name: Brightness().eval()},
            images,
            labels,
            DETERMINISTIC,
            _config(),
            tmp_path,
            progress=False,
        )
    assert [s.model for s in load_run(tmp_path).summaries] == ["first", "second"]


def test_a_run_moved_to_another_n_keeps_its_models_in_an_archive(tmp_path: Path) -> None:
    images, labels = _data()
    large = _config()
    run_dir, small = tmp_path / "run", dataclasses.replace(large, indices=tuple(range(20)))
    records = run_dir / "records.jsonl"

    def evaluate(name: str, config: RunConfig) -> int:
        """Evaluates ``name``; returns how many records that added."""
        model = Brightness().eval()
        model.scale.data.fill_({"first": 20.0, "second": 10.0}[name])
        before = len(records.read_text().splitlines()) if records.is_file() else 0
        count = config.n
        evaluate_models(
            {name: model},
            images[:count],
            labels[:count],
            DETERMINISTIC,
            config,
            run_dir,
            progress=False,
            replace=True,  # as the recipes do once archive_before_resize kept the old run
        )
        return len(records.read_text().splitlines()) - before

    per_batch = evaluate("first", small)  # n = 20 is one batch of 20
    assert per_batch > 0
    evaluate("second", small)
    assert archive_before_resize(run_dir, small) is None  # same n: nothing to keep
    assert archive_before_resize(run_dir, dataclasses.replace(large, seed=1)) is None
    archive = archive_before_resize(run_dir, large)
    assert archive == tmp_path / "run-n20"
    assert evaluate("first", large) == per_batch  # the first batch is reused, not redone
    assert [(s.model, s.n) for s in load_run(run_dir).summaries] == [("first", 40)]
    assert [(s.model, s.n) for s in load_run(archive).summaries] == [("first", 20), ("second", 20)]
    # back at n = 20 for one model, then at 40 again: the n = 20 archive merges, loses nothing
    assert archive_before_resize(run_dir, small) == tmp_path / "run-n40"
    assert evaluate("second", small) == 0
    assert archive_before_resize(run_dir, large) == archive
    assert [s.model for s in load_run(archive).summaries] == ["first", "second"]


def test_a_killed_model_does_not_block_the_next_one(tmp_path: Path) -> None:
    images, labels = _data()
    arguments = (images, labels, DETERMINISTIC, _config(), tmp_path)
    evaluate_models({"killed": Brightness().eval()}, *arguments, progress=False)
    run_file = tmp_path / "run.json"
    document = json.loads(run_file.read_text())
    document["models"]["killed"]["complete"] = False  # as if its process had been killed
    run_file.write_text(json.dumps(document))
    result = evaluate_models({"next": _Binarized().eval()}, *arguments, progress=False)
    assert [s.model for s in result.summaries] == ["killed", "next"]
    with pytest.raises(UserError, match="has not finished"):
        load_run(tmp_path)
    # a model killed before its first batch finished every attack is left out, with a warning
    store_lines = (tmp_path / "records.jsonl").read_text().splitlines()
    killed_keys = set(document["models"]["killed"]["keys"])
    kept = [line for line in store_lines if json.loads(line)["key"] not in killed_keys]
    (tmp_path / "records.jsonl").write_text("".join(line + "\n" for line in kept))
    with pytest.warns(UserWarning, match="killed left out"):
        result = load_run(tmp_path, partial=True)
    assert [s.model for s in result.summaries] == ["next"]
    with warnings.catch_warnings():  # a skipped model is not read, so it warns of nothing
        warnings.simplefilter("error")
        result = load_run(tmp_path, partial=True, skip_models=("killed",))
    assert [s.model for s in result.summaries] == ["next"]
    assert load_run(tmp_path, partial=True, skip_models=("killed", "next")).summaries == []


@register_model("test-gray-detector")
class GrayDetector(Detector):
    """Suspicious when the mean pixel is near 0.5, where Brightness's adversarials land."""

    config_class = _NoConfig

    def __init__(self, config: _NoConfig | None = None) -> None:
        super().__init__()
        self.config = config or _NoConfig()

    def score(self, images: torch.Tensor) -> torch.Tensor:
        return -(images.flatten(1).mean(1) - 0.5).abs()


def _evaluate_gray(run_dir: Path, detector: Detector) -> Any:
    """The Brightness model's DETERMINISTIC run on ``_data()``, with ``detector``."""
    images, labels = _data()
    return evaluate_models(
        {"bright": Brightness().eval()},
        images,
        labels,
        DETERMINISTIC,
        _config(),
        run_dir,
        detectors={"bright": detector},
        progress=False,
    )


def test_detection_in_a_run(tmp_path: Path) -> None:
    images, labels = _data()
    detector = GrayDetector()
    detector.calibrate(images, 0.05)
    run = _evaluate_gray(tmp_path, detector)
    detection = {d.attack_id: d for d in run.summaries[0].detection}  # type: ignore[union-attr]
    assert set(detection) == {"fgsm", "l2-deepfool"}
    deepfool = detection["l2-deepfool"]
    assert deepfool.auc > 0.95 and deepfool.pairs > 20
    assert 0 <= deepfool.tpr[0.01] <= deepfool.tpr[0.05] <= 1
    # DeepFool breaks every sample; the detector catches the adversarials near 0.5 but also
    # rejects the clean images nearest 0.5, so robust accuracy under rejection is in between.
    robust = deepfool.robust_accuracy_at_threshold
    assert robust is not None and 0 < robust <= 37 / 40
    # cross-check with the per-sample definition in advdefense.evaluation.detection
    reader = ResultStore(tmp_path, writable=False)
    adversarial_images = images.clone()
    for record in reader.records():
        if record["attack"] == "l2-deepfool":
            stored = reader.adversarials(record["key"])
            assert stored is not None
            for row, index in enumerate(record["indices"]):
                if record["distances"][row] <= 1.5 + 1e-4:
                    adversarial_images[index] = stored[row]
    expected = robust_under_rejection(
        Brightness().eval(), detector, images, labels, adversarial_images
    )
    assert robust == pytest.approx(float(expected.float().mean()))
    document = report_json([run])["models"]["bright"]["detection"]
    assert document["l2-deepfool"]["auc"] == deepfool.auc
    assert document["l2-deepfool"]["robust_accuracy_at_threshold"] == robust
    rejected = document["l2-deepfool"]["clean_false_rejection_rate"]
    assert rejected == document["fgsm"]["clean_false_rejection_rate"] and 0 < rejected < 1
    markdown = render([run], "md")
    assert f"robust with rejection {100 * robust:.1f}%" in markdown
    assert f"| clean false rejections at the threshold | {100 * rejected:.1f}% |" in markdown
    assert "Detection (gray-box" in render([run], "md")
    files = write_reports(run)
    assert files["roc-bright"].read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(InputError, match="unknown models"):
        evaluate_models(
            {"a": Brightness()},
            images,
            labels,
            DETERMINISTIC,
            _config(),
            tmp_path,
            detectors={"b": detector},
            progress=False,
        )


def _without_adversarials(run_dir: Path) -> None:
    """What a fresh checkout holds: the committed records, not their adversarials."""
    for path in (run_dir / "adversarials").iterdir():
        path.unlink()


def test_a_finished_detection_run_stands_without_its_adversarials(tmp_path: Path) -> None:
    images, _ = _data()
    detector = GrayDetector()
    detector.calibrate(images, 0.05)
    _evaluate_gray(tmp_path, detector)
    records = (tmp_path / "records.jsonl").read_text()
    run_file = (tmp_path / "run.json").read_text()
    _without_adversarials(tmp_path)
    reader = ResultStore(tmp_path, writable=False)
    key = next(iter(reader.records()))["key"]
    assert reader.lost(key)
    with pytest.raises(UserError, match=r"is missing .* run the evaluation again"):
        reader.adversarials(key)
    # rerunning the finished stage redoes nothing and keeps its detection scores
    _evaluate_gray(tmp_path, detector)
    assert (tmp_path / "records.jsonl").read_text() == records
    assert (
        json.loads((tmp_path / "run.json").read_text())["models"] == json.loads(run_file)["models"]
    )
    # a recalibrated detector is another detector: its scores are computed again, on
    # adversarials redone where they were lost
    detector.calibrate(images, 0.2)
    run = _evaluate_gray(tmp_path, detector)
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2 * len(
        records.splitlines()
    )
    redone = {d.attack_id: d.pairs for d in run.summaries[0].detection}  # type: ignore[union-attr]
    before = json.loads(run_file)["models"]["bright"]["detection"]["attacks"]
    assert redone == {attack: len(entry["scores"]) for attack, entry in before.items()}


def test_an_unfinished_run_redoes_lost_adversarials_only_where_needed(tmp_path: Path) -> None:
    images, labels = _data()
    arguments = _minimal_arguments(batch_size=20)
    suite = _suite("fgsm", "l2-deepfool", "l2-pgd")
    with ResultStore(tmp_path) as store:  # the first batch finished, then the checkout is new
        first = run_minimal(Brightness(), images[:20], labels[:20], suite, store, **arguments)
    _without_adversarials(tmp_path)
    with ResultStore(tmp_path) as store:
        keys = run_minimal(Brightness(), images, labels, suite, store, **arguments)
        assert keys[:3] == first and all(store.lost(key) for key in first)
        assert not any(store.lost(key) for key in keys[3:])
    # the second batch needed nothing of the first; a detector needs every adversarial
    with ResultStore(tmp_path) as store:
        run_minimal(Brightness(), images, labels, suite, store, keep_adversarials=True, **arguments)
        assert not any(store.lost(key) for key in keys)
    # an attack still to run that starts from nothing redoes nothing
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    kept = [r for r in records if r["key"] != keys[5]]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    _without_adversarials(tmp_path)
    with ResultStore(tmp_path) as store:
        run_minimal(Brightness(), images, labels, suite, store, **arguments)
        assert [store.lost(key) for key in keys] == [True] * 5 + [False]


def test_lost_adversarials_are_redone_just_before_an_attack_starts_from_them(
    tmp_path: Path,
) -> None:
    images, labels = _data(20)
    arguments = {**_minimal_arguments(batch_size=20), "thresholds": {**THRESHOLDS, "l0": 12.0}}
    suite = _suite("fgsm", "l2-deepfool", "l2-pgd", "l0-pointwise-x10")
    with ResultStore(tmp_path / "whole") as store:
        whole = run_minimal(Brightness(), images, labels, suite, store, **arguments)
    uninterrupted = {
        r["attack"]: r for r in ResultStore(tmp_path / "whole", writable=False).records()
    }
    # a fresh checkout of a batch interrupted after its first two attacks: their records
    # without adversarials
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    first_two = (tmp_path / "whole" / "records.jsonl").read_text().splitlines()[:2]
    (resumed / "records.jsonl").write_text("".join(line + "\n" for line in first_two))
    with ResultStore(resumed) as store:
        assert run_minimal(Brightness(), images, labels, suite, store, **arguments) == whole
    appended = [json.loads(line) for line in (resumed / "records.jsonl").read_text().splitlines()]
    # l2-pgd starts from nothing and runs first; Pointwise starts from every earlier attack,
    # so the two lost records are redone just before it
    assert [r["attack"] for r in appended[2:]] == [
        "l2-pgd",
        "fgsm",
        "l2-deepfool",
        "l0-pointwise-x10",
    ]
    for record in appended[2:]:
        for field in ("distances", "adversarial_labels", "started"):
            assert record[field] == uninterrupted[record["attack"]][field], field


def test_model_fingerprint_tracks_weights() -> None:
    model = Brightness()
    before = model_fingerprint(model)
    assert model_fingerprint(Brightness()) == before
    with torch.no_grad():
        model.scale.add_(1)
    assert model_fingerprint(model) != before


def test_result_flags_tolerate_noise_but_catch_unreliable_attacks() -> None:
    from advdefense.evaluation.sanity import result_flags
    from advdefense.evaluation.summary import AttackResult, ModelSummary

    def summary_with(grid_success: tuple[int, ...]) -> ModelSummary:
        distances = np.full(1000, np.inf)
        attack = AttackResult(
            "noise",
            "l2",
            1.5,
            distances,
            np.zeros(1000, dtype=np.int64),
            1.0,
            1,
            0,
            (0.5, 1.0, 1.5),
            grid_success,
        )
        return ModelSummary("m", 1000, 1.0, {"noise": attack}, {})

    assert result_flags(summary_with((44, 43, 46))) == []
    flags = result_flags(summary_with((300, 120, 310)))
    assert len(flags) == 1 and "raw success fell" in flags[0]


def _attack_result(attack_id: str, norm: str, broken: int, n: int = 200) -> Any:
    """An AttackResult breaking the first ``broken`` of ``n`` samples within threshold 1.0."""
    from advdefense.evaluation.summary import AttackResult

    distances = np.full(n, np.inf)
    distances[:broken] = 0.5
    return AttackResult(attack_id, norm, 1.0, distances, np.zeros(n, dtype=np.int64), 1.0, 1, 0)


def test_result_flags_catch_single_step_and_black_box_beating_iterative_white_box() -> None:
    from advdefense.evaluation.sanity import result_flags
    from advdefense.evaluation.summary import ModelSummary

    def flags_for(*results: Any) -> list[str]:
        attacks = {result.attack_id: result for result in results}
        return result_flags(ModelSummary("m", 200, 1.0, attacks, {}))

    healthy = (_attack_result("linf-pgd", "linf", 120), _attack_result("linf-fgsm", "linf", 60))
    assert flags_for(*healthy) == []
    # FGSM breaking 40 samples more than PGD: the iterative attack is failing.
    (flag,) = flags_for(_attack_result("linf-pgd", "linf", 60), _attack_result("fgsm", "linf", 100))
    assert flag.startswith("linf: fgsm (single step) leaves 50.0%") and "linf-pgd" in flag
    # Within the tolerance of max(1 sample, 1% of n) = 2 samples: no flag.
    assert flags_for(_attack_result("l2-pgd", "l2", 60), _attack_result("l2-fgm", "l2", 62)) == []
    assert flags_for(_attack_result("l2-pgd", "l2", 60), _attack_result("l2-fgm", "l2", 63)) != []
    # Compared with the strongest iterative attack of the norm, not each one.
    assert not flags_for(
        _attack_result("l2-deepfool", "l2", 20),
        _attack_result("l2-ddn", "l2", 150),
        _attack_result("l2-fgm", "l2", 100),
    )
    # A noise attack beating every gradient attack: the gradients mislead them.
    (flag,) = flags_for(_attack_result("l2-ddn", "l2", 50), _attack_result("l2-gn", "l2", 90))
    assert flag.startswith("l2: l2-gn (black box)") and "white-box attack, l2-ddn" in flag
    # Attacks refining others' adversarials (Boundary, Pointwise) are not black-box evidence,
    # and norms are compared separately.
    assert not flags_for(
        _attack_result("l2-ddn", "l2", 50),
        _attack_result("l2-boundary", "l2", 90),
        _attack_result("linf-additive-uniform-noise", "linf", 90),
    )


def test_result_flags_catch_pgd_that_has_not_converged() -> None:
    from advdefense.evaluation.sanity import result_flags
    from advdefense.evaluation.summary import ModelSummary

    def flags_for(short: int, long: int) -> list[str]:
        attacks = {
            "l2-pgd": _attack_result("l2-pgd", "l2", short),
            "l2-pgd-long": _attack_result("l2-pgd-long", "l2", long),
        }
        return result_flags(ModelSummary("m", 200, 1.0, attacks, {}))

    assert flags_for(100, 102) == []  # within max(1, 1% of 200) samples
    (flag,) = flags_for(100, 130)
    assert flag.startswith("l2-pgd has not converged: l2-pgd-long") and "30 more of 200" in flag


def test_attack_kinds_in_the_catalogue() -> None:
    from advdefense.attacks.catalog import ATTACKS

    assert ATTACKS["fgsm"].single_step and ATTACKS["l2-fgm"].single_step
    assert not ATTACKS["linf-pgd"].single_step and ATTACKS["linf-pgd"].uses_gradients
    assert ATTACKS["l2-gn"].black_box and ATTACKS["l0-salt-and-pepper"].black_box
    assert not ATTACKS["l2-boundary"].black_box and not ATTACKS["l2-boundary"].uses_gradients
    assert not ATTACKS["l2-carlini-wagner"].black_box


def test_planned_keys_match_the_run(tmp_path: Path) -> None:
    from advdefense.evaluation.runner import plan_minimal_keys

    images, labels = _data()
    with ResultStore(tmp_path) as store:
        keys = run_minimal(
            Brightness(),
            images,
            labels,
            QUICKISH,
            store,
            model_name="b",
            thresholds=THRESHOLDS,
            batch_size=16,
            grid_points=3,
            progress=False,
        )
    assert (
        plan_minimal_keys(
            Brightness(), QUICKISH, range(40), thresholds=THRESHOLDS, grid_points=3, batch_size=16
        )
        == keys
    )


def _evaluate_bright(directory: Path) -> None:
    images, labels = _data()
    evaluate_models(
        {"b": Brightness().eval()},
        images,
        labels,
        DETERMINISTIC,
        _config(),
        directory,
        progress=False,
    )


def test_partial_report_of_an_unfinished_run(tmp_path: Path) -> None:
    _evaluate_bright(tmp_path)
    # Make it look like the process died during the last attack: drop its records.
    run_file = tmp_path / "run.json"
    payload = json.loads(run_file.read_text())
    payload["models"]["b"]["complete"] = False
    run_file.write_text(json.dumps(payload))
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["attack"] != "l2-deepfool"]
    (tmp_path / "records.jsonl").write_text("\n".join(kept) + "\n")
    with pytest.raises(UserError, match="has not finished"):
        load_run(tmp_path)
    summary = load_run(tmp_path, partial=True).summaries[0]
    assert isinstance(summary, ModelSummary)
    assert summary.pending == ["l2-deepfool"] and set(summary.attacks) == {"fgsm"}
    assert any("incomplete run" in flag for flag in summary.flags)
    # resuming completes it
    _evaluate_bright(tmp_path)
    assert set(load_run(tmp_path).summaries[0].attacks) == {"fgsm", "l2-deepfool"}  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["minimal", "fixed"])
def test_a_finished_model_whose_records_are_gone(tmp_path: Path, mode: str) -> None:
    """A fresh checkout keeps run.json but not the records: partial reports leave the model out."""
    images, labels = _data()
    extra: dict[str, Any] = {"norm": "linf", "epsilon": 0.1} if mode == "fixed" else {}
    arguments = (images, labels, DETERMINISTIC, _config(mode, **extra), tmp_path)
    evaluate_models({"b": Brightness().eval()}, *arguments, progress=False)
    expected = _without_timings(load_run(tmp_path).summaries)
    (tmp_path / "records.jsonl").unlink()
    with pytest.raises(UserError, match="missing"):
        load_run(tmp_path)
    with pytest.warns(UserWarning, match="b left out of the partial report"):
        assert load_run(tmp_path, partial=True).summaries == []
    evaluate_models({"b": Brightness().eval()}, *arguments, progress=False)  # restores it
    assert _without_timings(load_run(tmp_path).summaries) == expected


def _without_timings(value: Any) -> Any:
    """``value`` as plain data (dataclasses included) with every wall-time field dropped."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list | tuple):
        return [_without_timings(item) for item in value]
    return value


def test_markdown_helpers() -> None:
    from advdefense.evaluation.markdown import markdown_table, percent_with_interval

    assert markdown_table(["a", "b"], [["1", "2"], ["3", "4"]]) == [
        "| a | b |",
        "|---|---|",
        "| 1 | 2 |",
        "| 3 | 4 |",
    ]
    assert percent_with_interval(0, 0) == "—"
    assert percent_with_interval(0, 200) == "0.0 [0, 2]"  # Wilson: [0, 1.88%]
    assert percent_with_interval(90, 200) == "45.0 [38, 52]"
    # bounds round outwards, to the first digit that keeps them off 0 or 100 where they are not
    assert percent_with_interval(0, 1000) == "0.0 [0, 0.4]"  # Wilson: [0, 0.38%]
    assert percent_with_interval(1, 1000) == "0.1 [0.01, 0.6]"  # [0.018%, 0.56%]
    assert percent_with_interval(1000, 1000) == "100.0 [99.6, 100]"  # [99.62%, 100]
    assert percent_with_interval(999, 1000) == "99.9 [99.4, 99.99]"  # [99.44%, 99.982%]
    assert percent_with_interval(3, 12) == "25.0 [8, 54]"  # [8.9%, 53.2%]: not [9, 53]


# A run directory never hands back results computed on something else, and a refused or failed
# command loses nothing: other samples, other configurations, a newly given detector, an attack
# that crashed.


def _evaluate_into(
    run_dir: Path, images: torch.Tensor, labels: torch.Tensor, **options: Any
) -> Any:
    config = options.pop("config", _config())
    return evaluate_models(
        {"bright": Brightness().eval()},
        images,
        labels,
        DETERMINISTIC,
        config,
        run_dir,
        progress=False,
        **options,
    )


def test_records_are_not_reused_for_other_samples(tmp_path: Path) -> None:
    images, labels = _data()
    _evaluate_into(tmp_path, images, labels)
    records = (tmp_path / "records.jsonl").read_bytes()
    other = images.flip(0)  # same indices, other images: another split, say
    with pytest.raises(UserError, match="holds records computed on other samples: sample 0"):
        _evaluate_into(tmp_path, other, labels, replace=True)
    assert (tmp_path / "records.jsonl").read_bytes() == records
    # the same samples again: every record is reused
    _evaluate_into(tmp_path, images, labels)
    assert (tmp_path / "records.jsonl").read_bytes() == records


def test_a_store_without_digests_adopts_the_first_samples_it_is_checked_against(
    tmp_path: Path,
) -> None:
    images, labels = _data()
    with ResultStore(tmp_path) as store:
        store.check_samples(range(40), images, labels)
        digests = json.loads((tmp_path / "samples.json").read_text())["digests"]
        assert sorted(digests, key=int) == [str(i) for i in range(40)]
        store.check_samples(range(40, 45), images[:5], labels[:5])  # new indices join
        with pytest.raises(UserError, match="sample 1 "):
            relabelled = labels[:2].clone()
            relabelled[1] = 1 - relabelled[1]
            store.check_samples([0, 1], images[:2], relabelled)


def test_a_refused_command_leaves_the_run_file_alone(tmp_path: Path) -> None:
    images, labels = _data()
    _evaluate_into(tmp_path, images, labels)
    run_file = (tmp_path / "run.json").read_text()
    fixed_l0 = _config("fixed", norm="l0", epsilon=12.0)  # the suite has no L0 attack
    with pytest.raises(InputError, match="has no l0 attack"):
        _evaluate_into(tmp_path, images, labels, config=fixed_l0, replace=True)
    bad_threshold = dataclasses.replace(_config(), thresholds={"linf": -1.0, "l2": 1.5})
    with pytest.raises(InputError, match="finite and positive"):
        _evaluate_into(tmp_path, images, labels, config=bad_threshold, replace=True)
    with pytest.raises(InputError, match="batch_size"):
        _evaluate_into(
            tmp_path, images, labels, config=dataclasses.replace(_config(), batch_size=0)
        )
    assert (tmp_path / "run.json").read_text() == run_file


def test_another_configuration_is_refused_unless_replacing(tmp_path: Path) -> None:
    images, labels = _data()
    _evaluate_into(tmp_path, images, labels)
    seeded = dataclasses.replace(_config(), seed=1)
    with pytest.raises(UserError, match=r"another configuration \(seed 0 -> 1\).*--replace"):
        _evaluate_into(tmp_path, images, labels, config=seeded)
    assert [s.model for s in load_run(tmp_path).summaries] == ["bright"]
    assert load_run(tmp_path).config.seed == 0
    _evaluate_into(tmp_path, images, labels, config=seeded, replace=True)
    assert load_run(tmp_path).config.seed == 1


def test_a_detector_given_after_a_run_without_one_is_evaluated(tmp_path: Path) -> None:
    images, labels = _data()
    _evaluate_into(tmp_path, images, labels)
    assert load_run(tmp_path).summaries[0].detection == []  # type: ignore[union-attr]
    detector = GrayDetector()
    detector.calibrate(images, 0.05)
    run = _evaluate_into(tmp_path, images, labels, detectors={"bright": detector})
    detected = {d.attack_id for d in run.summaries[0].detection}
    assert detected == {"fgsm", "l2-deepfool"}


@pytest.mark.parametrize("mode", ["minimal", "fixed"])
def test_an_attack_that_raised_everywhere_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    images, labels = _data()
    real_run_attack = runner.run_attack

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA out of memory (simulated)")

    config = _config() if mode == "minimal" else _config("fixed", norm="linf", epsilon=0.3)
    monkeypatch.setattr(runner, "run_attack", out_of_memory)
    crashed = _evaluate_into(tmp_path, images, labels, config=config).summaries[0]
    assert any("out of memory" in flag and "retries" in flag for flag in crashed.flags)
    monkeypatch.setattr(runner, "run_attack", real_run_attack)
    retried = _evaluate_into(tmp_path, images, labels, config=config).summaries[0]
    fresh = _evaluate_into(tmp_path / "fresh", images, labels, config=config).summaries[0]
    assert not any("out of memory" in flag for flag in retried.flags)
    if mode == "minimal":
        assert retried.minimal_accuracy == fresh.minimal_accuracy < crashed.minimal_accuracy
    else:
        assert retried.broken_by == fresh.broken_by != crashed.broken_by


def test_an_attack_skipped_for_want_of_a_score_view_is_final(tmp_path: Path) -> None:
    images, labels = _data()
    suite = dataclasses.replace(DETERMINISTIC, entries=(get_attack("linf-internal-all-targets"),))
    with ResultStore(tmp_path) as store:
        arguments = (Brightness().eval(), images, labels, suite, store)
        options: dict[str, Any] = {"model_name": "m", "norm": "linf", "epsilon": 0.3}
        (key,) = run_fixed(*arguments, **options, progress=False)
        assert str(store.get(key)["error"]).startswith("skipped:")  # type: ignore[index]
        assert runner.record_settled(store, key)


def test_runs_side_by_side_show_each_columns_threshold(tmp_path: Path) -> None:
    images, labels = _data()
    at_01 = dataclasses.replace(_config(), thresholds={"linf": 0.1, "l2": 1.5})
    runs = [
        _evaluate_into(tmp_path / "a", images, labels),
        _evaluate_into(tmp_path / "b", images, labels, config=at_01),
    ]
    markdown = render(runs, "md")
    assert "**Linf attacks** (ε by column: 0.3 / 0.1)" in markdown
    assert "**L2 attacks** (ε = 1.5)" in markdown
    assert sorted(report_json(runs)["models"]) == ["bright (a)", "bright (b)"]


def test_only_surrogate_runs_that_pick_among_candidates_change_key() -> None:
    """Records chosen by a surrogate's verdict (restarts, all-targets attacks on biDIM) run
    again since the defended model judges them; every other record keeps its key."""
    from advdefense.defenses.dim import BiDIM
    from advdefense.nn.abs_cnn import AbsCNN

    bidim = runner._context(BiDIM(), "bidim", 0, 100, {})
    plain = runner._context(AbsCNN(), "cnn", 0, 100, {})
    chosen = {"selection": "judged by the defended model"}
    assert runner._selection_fields(bidim, get_attack("linf-pgd-long")) == chosen
    assert runner._selection_fields(bidim, get_attack("l2-dlr-all-targets")) == chosen
    for attack_id in ("linf-pgd", "linf-internal-all-targets", "l0-pointwise-x10"):
        assert runner._selection_fields(bidim, get_attack(attack_id)) == {}
    assert runner._selection_fields(plain, get_attack("linf-pgd-long")) == {}


def test_binarizing_entries_finished_before_the_selection_fix_are_redone(tmp_path: Path) -> None:
    """A complete run.json entry of biDIM without ``surrogate_selection`` was computed with
    surrogate-chosen candidates: the next run redoes it (its new keys); plain models keep theirs."""
    from advdefense.defenses.dim import BiDIM
    from advdefense.evaluation import run as run_module
    from advdefense.nn.abs_cnn import AbsCNN

    store = ResultStore(tmp_path)
    for model, redone in ((BiDIM(), True), (AbsCNN(), False)):
        identity = run_module._identity(model, None)
        before = {"complete": True, "keys": [], "fingerprint": identity["fingerprint"]}
        assert run_module._finished(before, identity, store, DETERMINISTIC) is not redone
        assert run_module._finished({**before, **identity}, identity, store, DETERMINISTIC)


def test_records_chosen_by_a_surrogate_are_flagged(tmp_path: Path) -> None:
    from advdefense.evaluation import run as run_module

    store = ResultStore(tmp_path)
    base = {"model": "bidim", "restarts": 5, "attack_class": "x.LinfProjectedGradientDescentAttack"}
    store.append({**base, "key": "old", "attack": "linf-pgd-long", "targets": ["sigmoid-10"]})
    store.append(
        {
            **base,
            "key": "new",
            "attack": "l2-pgd-long",
            "targets": ["sigmoid-10"],
            "selection": runner.SURROGATE_SELECTION,
        }
    )
    store.append({**base, "key": "plain", "attack": "l1-pgd-long", "targets": ["model"]})
    flags = run_module._surrogate_choice_flags(store, {"keys": ["old", "new", "plain"]})
    assert len(flags) == 1 and flags[0].startswith("linf-pgd-long: ran on surrogates")
    assert run_module.SURROGATE_CHOICE_FLAG in flags[0]
    assert run_module._surrogate_choice_flags(store, {"keys": ["new", "plain"]}) == []


@pytest.mark.parametrize("mode", ["minimal", "fixed"])
def test_an_attack_changed_under_the_same_suite_version_runs_again(
    tmp_path: Path, mode: str
) -> None:
    """A finished model is redone when an attack's parameters changed without a suite version
    bump: its records were computed by another attack than the suite now names."""
    images, labels = _data()
    extra: dict[str, Any] = {"norm": "linf", "epsilon": 0.1} if mode == "fixed" else {}
    suite = _suite("linf-pgd", "l2-deepfool")
    arguments = (images, labels, suite, _config(mode, **extra), tmp_path)
    evaluate_models({"b": Brightness().eval()}, *arguments, progress=False)
    written = len((tmp_path / "records.jsonl").read_text().splitlines())
    evaluate_models({"b": Brightness().eval()}, *arguments, progress=False)  # finished: stands
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == written
    pgd = get_attack("linf-pgd")
    shorter = dataclasses.replace(pgd, parameters={**pgd.parameters, "steps": 5})
    changed = dataclasses.replace(suite, entries=(shorter, *suite.entries[1:]))
    evaluate_models(
        {"b": Brightness().eval()}, images, labels, changed, *arguments[3:], progress=False
    )
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(records) > written
    assert {
        r["parameters"].get("steps") for r in records[written:] if r["attack"] == "linf-pgd"
    } == {5}
    summary = load_run(tmp_path).summaries[0]
    assert summary.model == "b"
