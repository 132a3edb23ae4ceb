"""The PDM reproduction recipe: every stage on tiny models and data, resuming, and its tables."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import pytest
import torch

import advdefense
from advdefense.attacks.catalog import AttackEntry, get_attack
from advdefense.attacks.detector_aware import CarliniWagnerDetectorAttack
from advdefense.attacks.suites import get_suite
from advdefense.data import LabeledImages, load_dataset
from advdefense.errors import UserError
from advdefense.evaluation.store import model_fingerprint

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DATASET = "mnist-sample"


def _recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("recipe_pdm", RECIPES / "pdm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _row(text: str, start: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_paper_numbers_cover_the_four_tables() -> None:
    recipe = _recipe()
    paper = json.loads((RECIPES / "pdm.paper.json").read_text())
    assert set(paper["table2"]["rows"]) == set(recipe.TABLE2_ROWS)
    for dataset in ("mnist", "cifar10"):
        assert set(paper["table1"]["accuracy"][dataset]) == set(recipe.MODELS)
        for row in paper["table2"]["rows"].values():
            assert set(row[dataset]) == set(recipe.WHITE_BOX_MODELS)
        assert set(paper["table3"]["distortion"][dataset]) == set(recipe.WHITE_BOX_MODELS)
        assert set(paper["table4"]["auc"][dataset]) == set(recipe.WHITE_BOX_MODELS)
    assert paper["table1"]["accuracy"]["mnist"]["pdm"] == 99.52
    assert paper["table2"]["rows"]["bim-0.1"]["mnist"] == {"ce": 0.945, "rce": 0.92, "pdm": 0.99}
    assert paper["table3"]["distortion"]["cifar10"]["rce"] == 0.019
    assert paper["table4"]["auc"]["mnist"]["pdm"] == 0.99
    assert set(recipe.PAPER_DATASET.values()) == {"mnist", "cifar10"}


def test_graybox_suite_has_the_papers_parameters() -> None:
    suite = get_suite("pdm-graybox")
    assert suite.ids() == (
        "linf-fgsm",
        "linf-basic-iterative",
        "l2-carlini-wagner-10x9",
        "l0-jsma",
        "l2-carlini-wagner-hc-1000x9",
    )
    lean, strong = get_attack("l2-carlini-wagner-10x9"), get_attack("l2-carlini-wagner-hc-1000x9")
    built = lean.build(), strong.build()
    assert [(a.steps, a.binary_search_steps, a.confidence) for a in built] == [
        (10, 9, 0.0),
        (1000, 9, 10.0),
    ]
    assert built[0].initial_const == built[1].initial_const == 0.01
    jsma = get_attack("l0-jsma")
    assert jsma.minimization and jsma.uses_gradients
    assert (jsma.build().max_iterations, jsma.build().gamma, jsma.build().theta) == (100, 1.0, 1.0)
    assert get_attack("linf-basic-iterative").build().steps == 10


def test_per_batch_breakdown_by_hand() -> None:
    recipe = _recipe()

    def batch(indices, success, distances, seconds):
        n = len(indices)
        return {
            "indices": indices,
            "labels": [0] * n,
            "success": success,
            "distances": distances,
            "predictions": [1] * n,
            "clean_scores": [1.0] * n,
            "adversarial_scores": [0.5] * n,
            "seconds": seconds,
        }

    first = {
        "batches": {
            "0": batch([0, 1], [True, False], [2.0, 9.0], 10.0),
            "2": batch([2], [True], [4.0], 3.0),
            "3": batch([5], [False], [7.0], 8.0),  # waiting for its retry: not finished
        }
    }
    retry = {"batches": {"0": batch([1], [True], [6.0], 5.0)}}
    state = {"pixels": 4, "rounds": [first, retry]}
    zeros = ["0"] * (recipe.WHITE_BOX_ROUNDS - 2)
    # d: mean L2 over the successes / sqrt(4 pixels)
    assert recipe.render_batches(state, "pdm") == [
        ["pdm", "0-1", "1", "1", *zeros, "15", "4.00", "6.00", "2.000"],
        ["pdm", "2-2", "1", "0", *zeros, "3", "4.00", "4.00", "2.000"],
        ["**pdm**", "all", "2", "1", *zeros, "18", "4.00", "6.00", "2.000"],
    ]
    assert recipe.render_batches({"rounds": []}, "pdm") == []


def test_detector_attack_summary_by_hand() -> None:
    recipe = _recipe()
    first_round = {
        "samples": [0, 1, 2],
        "batches": {
            "0": {
                "indices": [0, 1],
                "labels": [1, 2],
                "success": [True, False],
                "distances": [2.0, 9.0],
                "predictions": [0, 2],
                "clean_scores": [1.0, 2.0],
                "adversarial_scores": [0.5, 3.0],
            },
            "2": {
                "indices": [2],
                "labels": [0],
                "success": [True],
                "distances": [4.0],
                "predictions": [3],
                "clean_scores": [1.5],
                "adversarial_scores": [2.5],
            },
        },
    }
    retry = {  # sample 1 failed (still classified 2): attacked again, broken
        "samples": [1],
        "batches": {
            "0": {
                "indices": [1],
                "labels": [2],
                "success": [True],
                "distances": [6.0],
                "predictions": [5],
                "clean_scores": [2.0],
                "adversarial_scores": [1.5],
            }
        },
    }
    state = {"pixels": 4, "attacked": [0, 1, 2], "rounds": [first_round, retry]}
    summary = recipe.summarize_detector_attack(state)
    # every sample broken: mean L2 (2 + 6 + 4) / 3 = 4 over sqrt(4 pixels)
    assert summary.distortion == pytest.approx(2.0)
    assert (summary.attacked, summary.done, summary.successes, summary.pairs) == (3, 3, 3, 3)
    assert summary.protocol_successes == 3  # rounds 0 and 1 are the paper's
    # adversarial scores 0.5, 1.5, 2.5 vs clean 1.0, 2.0, 1.5: 0 + (1 + 1/2) + 3 of 9 pairs
    assert summary.auc == pytest.approx(0.5)
    assert summary.rounds == 2
    unused = {"samples": [], "batches": {}}  # a round opened when nothing was left to retry
    assert (
        recipe.summarize_detector_attack({**state, "rounds": [first_round, retry, unused]}).rounds
        == 2
    )
    assert recipe.final_records(state)[1]["round"] == 1
    assert recipe.finished_batches(state) == {"0", "2"}
    # interrupted after round 0: batch "0" still has sample 1 to retry, so it is not reported
    # (its round-0 results are not final); batch "2" broke its only sample and is done
    first_only = {**state, "rounds": [first_round]}
    assert recipe.finished_batches(first_only) == {"2"}
    assert set(recipe.final_records(first_only, include_unfinished=True)) == {0, 1, 2}
    summary = recipe.summarize_detector_attack(first_only)
    assert (summary.done, summary.successes, summary.pairs, summary.rounds) == (1, 1, 1, 1)
    assert summary.distortion == pytest.approx(2.0)
    # a failure that ran every round is final: its batch is finished, the failure reported
    gave_up = {**retry["batches"]["0"], "success": [False], "predictions": [2]}
    exhausted = [first_round] + [{"samples": [1], "batches": {"0": gave_up}}] * (
        recipe.WHITE_BOX_ROUNDS - 1
    )
    summary = recipe.summarize_detector_attack({**state, "rounds": exhausted})
    assert (summary.done, summary.successes, summary.rounds) == (3, 2, recipe.WHITE_BOX_ROUNDS)
    # broken only in the last round (ours, from an accepted training image): in d, not in the
    # paper's rounds' d, which keeps samples 0 and 2, mean L2 (2 + 4) / 2 over sqrt(4)
    assert (summary.protocol_successes, summary.protocol_distortion) == (2, pytest.approx(1.5))
    late = [*exhausted[:-1], {"samples": [1], "batches": {"0": retry["batches"]["0"]}}]
    summary = recipe.summarize_detector_attack({**state, "rounds": late})
    assert (summary.successes, summary.distortion) == (3, pytest.approx(2.0))
    assert (summary.protocol_successes, summary.protocol_distortion) == (2, pytest.approx(1.5))
    # with every test image's clean score kept, the normal group is all attacked ones (a
    # partial run estimates the final AUC): the fooled adversarial 2.5 of the finished batch
    # vs 1.0, 2.0, 1.5 and 3.0 (sample 3 not done yet; sample 4 not attacked): 3 of 4 pairs
    partial = {**first_only, "attacked": [0, 1, 2, 3]}
    partial["clean_scores"] = [1.0, 2.0, 1.5, 3.0, 100.0]
    summary = recipe.summarize_detector_attack(partial)
    assert summary.auc == pytest.approx(3 / 4) and (summary.done, summary.pairs) == (1, 1)
    empty = recipe.summarize_detector_attack({"attacked": [0], "rounds": []})
    assert math.isnan(empty.distortion) and math.isnan(empty.auc) and empty.done == 0
    rounds = [recipe.white_box_round(k) for k in range(recipe.WHITE_BOX_ROUNDS)]
    assert [attack.initial_const for attack in rounds] == [1.0, 1e3, 1e6, 1e3, 1e3, 1e3]
    assert [attack.class_weight for attack in rounds] == [1.0, 1.0, 1.0, 100.0, 100.0, 100.0]
    guides = [recipe.white_box_guide(k) for k in range(recipe.WHITE_BOX_ROUNDS)]
    assert guides == [None, None, None, "smoothed", "dense-support", None]
    assert recipe.WHITE_BOX_STARTS == (5,)


def test_black_box_auc_with_and_without_the_untransferred(tmp_path: Path) -> None:
    """Table 4's AUC keeps the transferred adversarials (as Table 2 keeps the successful);
    "AUC, all" scores every proxy adversarial, transferred or not."""
    recipe = _recipe()
    batch = {
        "indices": [0, 1, 2],
        "labels": [1, 2, 3],
        "success": [True, True, False],  # sample 2 failed on the proxy: in neither AUC
        "distances": [2.0, 4.0, 9.0],
        "predictions": [1, 0, 3],  # sample 0 did not transfer, sample 1 did
        "clean_scores": [1.0, 2.0, 0.0],
        "adversarial_scores": [3.0, 1.5, 5.0],
    }
    failed_again = {field: values[2:] for field, values in batch.items()}  # sample 2's retries

    def finished(first: dict[str, Any]) -> list[dict[str, Any]]:
        """``first`` as round 0, then sample 2 failing every later round (a final failure)."""
        retries = [{"samples": [2], "batches": {"0": failed_again}}] * (recipe.WHITE_BOX_ROUNDS - 1)
        return [{"samples": [0, 1, 2], "batches": {"0": first}}, *retries]

    state = {
        "pixels": 4,
        "attacked": [0, 1, 2],
        "clean_scores": [1.0, 2.0, 0.0],
        "rounds": finished(batch),
    }
    summary = recipe.summarize_detector_attack(state)
    assert (summary.successes, summary.pairs) == (2, 1)
    # transferred: 1.5 vs clean 1.0, 2.0, 0.0 -> 2 of 3; all: 3.0 and 1.5 -> (3 + 2) of 6
    assert summary.auc == pytest.approx(2 / 3)
    assert summary.auc_all == pytest.approx(5 / 6)
    untransferred = {**batch, "predictions": [1, 2, 3]}
    none = recipe.summarize_detector_attack({**state, "rounds": finished(untransferred)})
    assert none.pairs == 0 and math.isnan(none.auc)
    assert none.auc_all == pytest.approx(5 / 6)
    (tmp_path / "runs" / "blackbox").mkdir(parents=True)
    (tmp_path / "runs" / "blackbox" / "ce.json").write_text(json.dumps(state))
    table = recipe.render_table4(tmp_path, "fashion-mnist")
    ce_row = next(line for line in table.splitlines() if line.startswith("| ce"))
    assert "| 0.667 | 0.833 | 0.880 |" in ce_row


def test_tables_render_before_anything_ran(tmp_path: Path) -> None:
    recipe = _recipe()
    recipe.write_tables(tmp_path, "fashion-mnist")
    table1 = (tmp_path / "table1.md").read_text()
    assert _row(table1, "| pdm |")[1:4] == ["not run", "99.52", "—"]
    assert "paper (mnist; the paper does not evaluate fashion-mnist)" in table1
    assert _row((tmp_path / "table2.md").read_text(), "| JSMA |")[1:4] == ["not run", "0.995", "—"]
    assert _row((tmp_path / "table3.md").read_text(), "| rce |")[6] == "0.104"
    assert _row((tmp_path / "table4.md").read_text(), "| pdm |")[8] == "0.990"
    assert not (tmp_path / "fig2_tsne.png").exists()


def _fast(entry: AttackEntry, **parameters: Any) -> AttackEntry:
    return dataclasses.replace(entry, parameters={**entry.parameters, **parameters})


FAST_PARAMETERS = {
    "l2-carlini-wagner-10x9": {"steps": 3, "binary_search_steps": 2},
    "l2-carlini-wagner-hc-1000x9": {"steps": 3, "binary_search_steps": 2},
    "l0-jsma": {"max_iterations": 3},
}


def _tiny(recipe: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the recipe's constants: resnet8, 4 epochs, 300 + 40 images, few attack steps."""

    def small_dataset(name: str, split: str, **_: Any) -> LabeledImages:
        data = load_dataset(name, split)
        count = 300 if split == "train" else 40
        return LabeledImages(data.images[:count], data.labels[:count])

    def fast_entries(attack_ids: Any) -> tuple[AttackEntry, ...]:
        entries = get_suite("pdm-graybox").entries
        return tuple(
            _fast(entry, **FAST_PARAMETERS.get(entry.id, {}))
            for entry in entries
            if entry.id in attack_ids
        )

    monkeypatch.setattr(recipe, "load_dataset", small_dataset)
    monkeypatch.setattr(recipe, "graybox_entries", fast_entries)
    monkeypatch.setattr(recipe, "ARCHITECTURE", "resnet8")
    monkeypatch.setattr(recipe, "PROXY_ARCHITECTURE", "resnet8")
    monkeypatch.setattr(recipe, "EPOCHS", {DATASET: 4})
    monkeypatch.setattr(recipe, "BATCH_SIZE", 16)
    monkeypatch.setattr(recipe, "HELD_OUT", {DATASET: 100})
    monkeypatch.setattr(recipe, "STRONG_N", 6)
    monkeypatch.setattr(recipe, "ADAPTIVE_STEPS", 2)
    monkeypatch.setattr(recipe, "ATTACK_BATCH", 4)
    monkeypatch.setattr(recipe, "WHITE_BOX_BATCH", 2)
    monkeypatch.setattr(
        recipe,
        "WHITE_BOX_ATTACK",
        CarliniWagnerDetectorAttack(
            steps=4, binary_search_steps=2, classifier_steps=4, classifier_binary_search_steps=1
        ),
    )


def _refuse(*_: Any, **__: Any) -> Any:
    raise AssertionError("finished work was redone")


def test_stages_choose_the_work_and_the_detector_attacks_alternate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe()
    _tiny(recipe, monkeypatch)  # 6 strong samples, white-box batches of 2
    ran: list[tuple[str, str]] = []
    limits: list[int | None] = []

    @contextlib.contextmanager
    def recorded(stage: str, setting: Any, name: str) -> Iterator[None]:
        ran.append((stage, name))
        yield

    monkeypatch.setattr(recipe, "_stage", recorded)
    for function in ("_classifier", "_table1_stats", "_detectors", "_graybox", "_adaptive"):
        monkeypatch.setattr(recipe, function, lambda *args: None)
    for function in ("_whitebox", "_blackbox"):
        monkeypatch.setattr(recipe, function, lambda *args: limits.append(args[3]))
    models = ("ce", "rce")
    arguments = (tmp_path, torch.device("cpu"), 0, False, 12, models, (DATASET,))
    recipe.reproduce(*arguments, ("blackbox", "adaptive"))
    always = [(stage, name) for name in models for stage in ("train", "table1", "detectors")]
    adaptive = [("adaptive", name) for name in models]
    assert ran == always + adaptive + [("blackbox", name) for name in models] * 4
    assert limits == [2, 2, 4, 4, 6, 6, None, None]  # a batch of 2 more samples each time
    limits.clear()
    recipe.reproduce(*arguments, ("whitebox",), 4)  # --attack-batch 4
    assert limits == [4, 4, 8, 8, None, None]
    with pytest.raises(UserError, match="--attack-batch must be positive, got 0"):
        recipe.reproduce(*arguments, ("whitebox",), 0)
    ran.clear()
    recipe.reproduce(*arguments, ("whitebox", "blackbox", "graybox"))
    graybox = [("graybox", name) for name in models]
    one_limit = [(stage, name) for stage in ("whitebox", "blackbox") for name in models]
    assert ran == always[:3] + graybox[:1] + always[3:] + graybox[1:] + one_limit * 4
    with pytest.raises(UserError, match=r"unknown stage.*choose from graybox, adaptive"):
        recipe.reproduce(*arguments, ("tables",))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_recipe_runs_every_stage_then_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe()
    _tiny(recipe, monkeypatch)
    models = ("ce", "pdm")
    attacked: list[int] = []  # the defended model of each C&W-wb batch, in order
    chosen: list[tuple[int, list[int]]] = []  # (attacker, samples) of each C&W-wb batch
    attack_batch = recipe._attack_batch

    guides: list[Any] = []

    started: list[tuple[Any, Any, list[int], torch.Tensor]] = []

    def recorded(*args: Any, guide: Any = None, starts: Any = None) -> Any:
        attacked.append(id(args[3]))
        chosen.append((id(args[2][0]), list(args[4])))  # per attacking model
        if guide is not None:
            guides.append((args[2][1], guide))
        if starts is not None:
            started.append((*args[2], list(args[4]), starts))
        return attack_batch(*args, guide=guide, starts=starts)

    monkeypatch.setattr(recipe, "_attack_batch", recorded)
    stages: list[str] = []
    stage = recipe._stage

    def recorded_stage(name: str, *args: Any) -> Any:
        stages.append(name)
        return stage(name, *args)

    monkeypatch.setattr(recipe, "_stage", recorded_stage)
    torch.manual_seed(0)
    recipe.reproduce(tmp_path, torch.device("cpu"), 0, False, 12, models, (DATASET,))
    # JSMA on every model, then C&W-hc on every model, then the white-box and black-box
    # stages batch by batch: per batch limit (3 batches of 2 of the 6 samples, then no
    # limit), the white-box batch of each model, then the black-box batch of each
    last_jsma = len(stages) - stages[::-1].index("graybox-jsma")
    assert last_jsma <= stages.index("graybox-cw-hc")
    last_strong = len(stages) - stages[::-1].index("graybox-cw-hc")
    assert stages[:last_strong].count("graybox-cw-hc") == len(models)
    assert stages[last_strong:] == ["whitebox", "whitebox", "blackbox", "blackbox"] * 4
    # white-box batches alternate between the models, each batch with its retry rounds
    switch = next(k for k, model in enumerate(attacked) if model != attacked[0])
    assert len(attacked) >= 4 and 1 <= switch <= recipe.WHITE_BOX_ROUNDS
    for attacker in {attacker for attacker, _ in chosen}:  # retries follow their batch
        seen: set[int] = set()
        origin: set[int] = set()
        for samples in (samples for who, samples in chosen if who == attacker):
            if seen.isdisjoint(samples):
                origin = set(samples)
            else:
                assert set(samples) <= origin, "a retry came after the next batch"
            seen.update(samples)
    directory = tmp_path / "pdm" / DATASET
    for name in models:
        assert (directory / "models" / name / "config.json").is_file()
        for suffix in ("kde", "mahalanobis", "proxy", "proxy-kde"):
            assert (directory / "models" / f"{name}-{suffix}" / "config.json").is_file()
    training = json.loads((directory / "runs" / "table1" / "pdm.json").read_text())["training"]
    assert training["variance_weight"] == recipe.VARIANCE_WEIGHT
    assert training["arch"] == "resnet8" and training["train_samples"] == 200

    table1 = (directory / "table1.md").read_text()
    ce = _row(table1, "| ce |")
    assert float(ce[1]) >= 0 and ce[2] == "99.33" and ce[4] not in ("not run", "—")
    assert _row(table1, "| rce |")[1] == "not run"
    assert "PDM - CE:" in table1

    table2 = (directory / "table2.md").read_text()
    for row in ("FGSM-0.05", "BIM-0.1", "C&W", "C&W-hc", "JSMA"):
        cells = _row(table2, f"| {row} |")
        assert cells[1] not in ("pending", "not run"), row  # ce
        assert cells[4] == "not run"  # rce was not selected
    fgsm = json.loads((directory / "runs" / "graybox-linf-0.05" / "run.json").read_text())
    assert fgsm["config"]["grid_points"] == 1 and fgsm["config"]["thresholds"] == {"linf": 0.05}
    assert len(fgsm["config"]["indices"]) == 12
    strong = json.loads((directory / "runs" / "graybox-cw-hc" / "run.json").read_text())
    assert len(strong["config"]["indices"]) == 6
    assert strong["config"]["thresholds"] == {"l2": 28.0}
    jsma = json.loads((directory / "runs" / "graybox-jsma" / "run.json").read_text())
    assert len(jsma["config"]["indices"]) == 6 and jsma["config"]["thresholds"] == {"l0": 784.0}
    # a model still being attacked has no detection scores yet: its cells are pending
    jsma_file = directory / "runs" / "graybox-jsma" / "run.json"
    finished = jsma_file.read_text()
    jsma["models"]["ce"].update(complete=False, detection=None)
    jsma_file.write_text(json.dumps(jsma))
    assert _row(recipe.render_table2(directory, DATASET), "| JSMA |")[1] == "pending"
    jsma_file.write_text(finished)
    assert _row(recipe.render_table2(directory, DATASET), "| JSMA |")[1] != "pending"
    mahalanobis = json.loads((directory / "runs" / "graybox-cw" / "mahalanobis.json").read_text())
    assert set(mahalanobis) == set(models)

    table3 = (directory / "table3.md").read_text()
    assert _row(table3, "| ce |")[1] != "not run" and _row(table3, "| rce |")[1] == "not run"
    assert _row(table3, "| pdm | linf |")[2] == "0.300"
    assert _row(table3, "| ce | l2 |")[2] == "1.500"
    whitebox = json.loads((directory / "runs" / "whitebox" / "ce.json").read_text())
    first = whitebox["rounds"][0]
    assert first["samples"] == whitebox["attacked"]
    assert whitebox["evasion"] == "clean-median" and len(whitebox["thresholds"]) == 6
    assert len(whitebox["clean_scores"]) == 6
    clean = [score for batch in first["batches"].values() for score in batch["clean_scores"]]
    (threshold,) = set(whitebox["thresholds"])  # the attacked clean images' (lower) median
    assert threshold == pytest.approx(sorted(clean)[(len(clean) - 1) // 2], rel=1e-9)
    for batch in first["batches"].values():  # a success scores at most that
        scores = zip(batch["success"], batch["adversarial_scores"], strict=True)
        assert all(adversarial <= threshold + 1e-6 for ok, adversarial in scores if ok)
    assert sum(len(batch["indices"]) for batch in first["batches"].values()) == len(
        first["samples"]
    )
    first_batches = {start: batch["indices"] for start, batch in first["batches"].items()}
    for later in whitebox["rounds"][1:]:  # each retry: the failures of one first-round batch
        for start, batch in later["batches"].items():
            assert set(batch["indices"]) <= set(first_batches[start])
    finals = recipe.final_records(whitebox)
    for indices in first_batches.values():  # a failure was retried in every round
        retried = [i for i in indices if not finals[i]["success"]]
        if retried:
            assert len(whitebox["rounds"]) == recipe.WHITE_BOX_ROUNDS
            assert all(finals[i]["round"] == recipe.WHITE_BOX_ROUNDS - 1 for i in retried)
            smoothed, dense, restart = whitebox["rounds"][recipe.WHITE_BOX_GUIDED_ROUND :]
            assert (restart["start"], restart["class_weight"]) == ("nearest-accepted", 100.0)
            assert (smoothed["class_weight"], smoothed["guide_bandwidth_factor"]) == (100.0, 4.0)
            assert (smoothed["guide"], dense["guide"], dense["class_weight"]) == (
                "smoothed",
                "dense-support",
                100.0,
            )
            assert set(whitebox["guide_thresholds"]) == {"4.0"}
    widened = {detector.bandwidth != kde.bandwidth for kde, (detector, _) in guides}
    assert widened == {True, False}, "no sample reached both guided rounds"
    for attacker_kde, (detector, thresholds) in guides:
        if detector.bandwidth != attacker_kde.bandwidth:  # smoothed: 4x, to its clean median
            assert detector.bandwidth == pytest.approx(4.0 * attacker_kde.bandwidth)
            assert len(set(thresholds)) == 1 and math.isfinite(thresholds[0])
            continue
        # dense-support: the support points scoring at most the evasion threshold (the clean
        # median, every sample's), a class without one keeping its densest
        (threshold,) = set(thresholds)
        scores = attacker_kde.support_scores()
        for label in range(attacker_kde.config.num_classes):
            members = attacker_kde.support_labels == label
            dense = attacker_kde.support[members & (scores <= threshold)]
            if len(dense) == 0:
                dense = attacker_kde.support[members][scores[members].argmin()][None]
            torch.testing.assert_close(detector.support[detector.support_labels == label], dense)
        assert detector.class_counts is attacker_kde.class_counts
    assert started, "no sample reached the round that starts at accepted images"
    train = recipe.load_splits(DATASET).train
    pool = train.images[: recipe.WHITE_BOX_START_POOL]
    pool_labels = train.labels[: recipe.WHITE_BOX_START_POOL]
    for attacker, _, indices, images in started:
        # the target's training images, those the attacker classifies as the target if any
        # (every cache draws the same targets: they depend on the labels and the seed only);
        # classified as the recipe does, in the same batches: a near tie can flip with them
        predictions = recipe.predict(attacker, pool)
        for index, image in zip(indices, images, strict=True):
            target = whitebox["targets"][index]
            (row,) = (pool == image).flatten(1).all(1).nonzero().flatten().tolist()
            assert int(pool_labels[row]) == target
            if bool(((pool_labels == target) & (predictions == target)).any()):
                assert int(predictions[row]) == target
    files = list((directory / "runs" / "whitebox" / "adversarials").glob("ce-r*"))
    assert len(files) == sum(len(round_["batches"]) for round_ in whitebox["rounds"])
    table4 = (directory / "table4.md").read_text()
    assert _row(table4, "| pdm |")[1] != "—" and _row(table4, "| pdm |")[8] == "0.990"
    for name in ("setup.md", "fig2_tsne.png", "fig_roc_graybox.png"):
        assert (directory / name).is_file()
    assert "RVL weighted 0.1" in (directory / "setup.md").read_text()

    # a second run loads every model and detector and skips every finished attack, also at
    # another batch size (the caches hold batches of 2)
    records = {
        run: (directory / "runs" / run / "records.jsonl").read_text()
        for run in ("graybox-linf-0.05", "graybox-cw", "graybox-jsma", "graybox-cw-hc")
    }
    caches = {name: directory / "runs" / "whitebox" / f"{name}.json" for name in models}
    originals = {name: json.loads(path.read_text()) for name, path in caches.items()}
    stripped = 0  # rounds written before there were two guides
    for name, original in originals.items():
        older = {key: value for key, value in original.items() if key != "clean_scores"}
        older["attack"] = {k: v for k, v in original["attack"].items() if k != "class_weight"}
        older["rounds"] = [
            {k: v for k, v in round_.items() if (k, v) != ("guide", "smoothed")}
            for round_ in original["rounds"]
        ]
        stripped += sum(round_.get("guide") == "smoothed" for round_ in original["rounds"])
        caches[name].write_text(json.dumps(older))
    assert stripped, "no cache had a smoothed round to strip"
    for name in ("train_architecture", "train_pdm", "_adaptive_attack"):
        monkeypatch.setattr(recipe, name, _refuse)
    monkeypatch.setattr(CarliniWagnerDetectorAttack, "__call__", _refuse)
    monkeypatch.setattr(recipe.KDEDetector, "fit", _refuse)
    monkeypatch.setattr(recipe.MahalanobisDetector, "fit", _refuse)
    monkeypatch.setattr(recipe, "tsne", _refuse)
    recipe.reproduce(
        tmp_path, torch.device("cpu"), 0, False, 12, models, (DATASET,), attack_batch=3
    )
    for run, text in records.items():
        assert (directory / "runs" / run / "records.jsonl").read_text() == text
    assert (directory / "table3.md").read_text() == table3
    assert "(stale)" not in table3 + table4
    # an older cache gets the clean scores of the AUC's normal group, without attacking again
    for name, path in caches.items():
        restored = json.loads(path.read_text())
        assert restored["clean_scores"] == originals[name]["clean_scores"]
        # caches from before class_weight or the second guide keep their rounds
        assert restored["rounds"] == originals[name]["rounds"]

    # a cache computed on earlier weights (a retraining since) is marked in the tables
    for run in ("adaptive", "whitebox", "blackbox"):
        path = directory / "runs" / run / "ce.json"
        state = json.loads(path.read_text())
        state["fingerprint"] = "0" * 64 if run == "adaptive" else f"{'1' * 64}/{'0' * 64}"
        path.write_text(json.dumps(state))
    recipe.write_tables(directory, DATASET)
    table3 = (directory / "table3.md").read_text()
    assert _row(table3, "| ce (stale) |")[1] != "not run"
    assert _row(table3, "| ce (stale) | linf |")[2] == "0.300"
    assert _row(table3, "| pdm | linf |")[2] == "0.300"
    assert table3.count(recipe.STALE_NOTE) == 2
    table4 = (directory / "table4.md").read_text()
    assert _row(table4, "| ce (stale) |") and recipe.STALE_NOTE in table4
    assert "(stale)" not in (directory / "table2.md").read_text()
    cw_file = directory / "runs" / "graybox-cw" / "run.json"
    cw = json.loads(cw_file.read_text())
    cw["models"]["ce"]["fingerprint"] = "0" * 64
    cw_file.write_text(json.dumps(cw))
    recipe.write_tables(directory, DATASET)
    table2 = (directory / "table2.md").read_text()
    assert _row(table2, "| C&W |")[1].endswith(" (stale)") and recipe.STALE_NOTE in table2
    assert not _row(table2, "| C&W-hc |")[1].endswith(" (stale)")
    assert _row(table2, "| C&W | ce (stale) |")

    # the detector's record (committed) carries the fingerprint the caches are checked against,
    # so the check needs no weights; without either, the rows say they are unverified
    record_path = directory / "runs" / "detectors" / "ce-kde.json"
    record = json.loads(record_path.read_text())
    saved = advdefense.load(directory / "models" / "ce-kde")
    assert record["fingerprint"] == model_fingerprint(saved)
    shutil.rmtree(directory / "models" / "ce-kde")
    recipe.write_tables(directory, DATASET)
    assert _row((directory / "table3.md").read_text(), "| ce (stale) |")
    del record["fingerprint"]
    record_path.write_text(json.dumps(record))
    recipe.write_tables(directory, DATASET)
    table3 = (directory / "table3.md").read_text()
    assert _row(table3, "| ce (unverified) | linf |") and _row(table3, "| pdm | linf |")
    assert recipe.UNVERIFIED_NOTE in table3 and recipe.STALE_NOTE not in table3


def test_detector_attack_batches_resume_at_any_size() -> None:
    recipe = _recipe()
    attacked = [0, 2, 3, 5, 6, 7, 9]
    state: dict[str, Any] = {"attacked": attacked, "rounds": []}
    assert recipe._batches(state, 3) == [("0", [0, 2, 3]), ("3", [5, 6, 7]), ("6", [9])]
    # a cache whose first round attacked batches of 2 (one retried): those stay, the rest
    # follows in batches of the new size
    state["rounds"] = [
        {"batches": {"2": {"indices": [3, 5]}, "0": {"indices": [0, 2]}}},
        {"batches": {"2": {"indices": [5]}}},
    ]
    assert recipe._batches(state, 4) == [("0", [0, 2]), ("2", [3, 5]), ("4", [6, 7, 9])]
    assert recipe._batches(state, 1)[2:] == [("4", [6]), ("5", [7]), ("6", [9])]
    # a gap between cached batches (never written by the recipe, but a hand-edited or merged
    # cache may hold one) is attacked too, in batches that stop where the next cached one starts
    state["rounds"] = [{"batches": {"0": {"indices": [0, 2]}, "5": {"indices": [7, 9]}}}]
    assert recipe._batches(state, 2) == [
        ("0", [0, 2]),
        ("2", [3, 5]),
        ("4", [6]),
        ("5", [7, 9]),
    ]


def test_detector_attack_batch_defaults_to_the_device() -> None:
    recipe = _recipe()
    splits = cast(Any, None)
    for device, explicit, expected in (
        ("cpu", None, recipe.WHITE_BOX_BATCH),
        ("cuda", None, recipe.STRONG_N),
        ("cuda", 7, 7),
    ):
        setting = recipe.Setting(
            DATASET, Path("."), splits, 1000, 0, False, torch.device(device), explicit
        )
        assert setting.detector_attack_batch == expected


def test_recipe_rejects_unknown_names(tmp_path: Path) -> None:
    recipe = _recipe()
    with pytest.raises(recipe.UserError, match="unknown model"):
        recipe.reproduce(tmp_path, torch.device("cpu"), 0, False, 10, ("cnn",), (DATASET,))
    with pytest.raises(recipe.UserError, match="unknown dataset"):
        recipe.reproduce(tmp_path, torch.device("cpu"), 0, False, 10, ("ce",), ("svhn",))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_colour_images_take_the_same_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CIFAR-10 on a GPU runs the recipe unchanged: three channels through every model stage."""
    recipe = _recipe()
    _tiny(recipe, monkeypatch)
    generator = torch.Generator().manual_seed(0)

    def colour_dataset(name: str, split: str, **_: Any) -> LabeledImages:
        count = 120 if split == "train" else 8
        images = torch.rand(count, 3, 16, 16, generator=generator)
        return LabeledImages(images, torch.arange(count) % 10)

    monkeypatch.setattr(recipe, "load_dataset", colour_dataset)
    monkeypatch.setattr(recipe, "EPOCHS", {"cifar10": 1})
    monkeypatch.setattr(recipe, "HELD_OUT", {"cifar10": 40})
    splits = recipe.load_splits("cifar10")
    assert [len(part.labels) for part in splits] == [80, 20, 20, 8]
    setting = recipe.Setting(
        "cifar10",
        tmp_path,
        splits,
        8,
        0,
        False,
        torch.device("cpu"),
    )
    classifier = recipe._classifier(setting, "pdm")
    assert classifier.config.in_channels == 3 and classifier.config.output == "negated"
    defended = recipe._detectors(setting, "pdm", classifier)
    thresholds = {}
    for strong in recipe.STRONG_GRAYBOX_RUNS:
        entries = recipe.graybox_entries(strong.attack_ids)
        thresholds.update(recipe._graybox_config(setting, strong, entries).thresholds)
    assert thresholds == {"l0": 768.0, "l2": pytest.approx(math.sqrt(768))}
    recipe._adaptive(setting, "pdm", defended)
    adaptive = json.loads((tmp_path / "runs" / "adaptive" / "pdm.json").read_text())
    assert adaptive["attacks"]["orthogonal-linf"]["epsilon"] == pytest.approx(8 / 255)
    recipe._whitebox(setting, "pdm", defended)
    whitebox = json.loads((tmp_path / "runs" / "whitebox" / "pdm.json").read_text())
    assert whitebox["pixels"] == 16 * 16  # Table 3's n: pixels, not the 768 input values


def test_distortion_scale_counts_pixels_and_names_the_fix_for_old_caches() -> None:
    """§4: d divides by sqrt(pixels per image); a cache without the count says how to add it."""
    recipe = _recipe()
    assert recipe.image_pixels(torch.zeros(2, 3, 32, 32)) == 1024
    assert recipe.distortion_scale({"pixels": 1024}) == 32.0
    with pytest.raises(ValueError, match="--stages whitebox"):
        recipe.distortion_scale({"input_values": 3072})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_pair_model_trained_with_other_term_weights_is_retrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe()
    _tiny(recipe, monkeypatch)
    monkeypatch.setattr(recipe, "EPOCHS", {DATASET: 1})
    setting = recipe.Setting(
        DATASET, tmp_path, recipe.load_splits(DATASET), 12, 0, False, torch.device("cpu")
    )
    recipe._classifier(setting, "pdm")
    training = json.loads((tmp_path / "models" / "pdm" / "config.json").read_text())["training"]
    assert (training["siamese_weight"], training["variance_weight"]) == (
        1.0,
        recipe.VARIANCE_WEIGHT,
    )
    capsys.readouterr()
    recipe._classifier(setting, "pdm")  # as the recipe wants it: loaded, not retrained
    assert "retraining" not in capsys.readouterr().out

    monkeypatch.setattr(recipe, "PAIR_WEIGHTS", {DATASET: recipe.PairWeights(siamese=0.5)})
    recipe._classifier(setting, "pdm")
    assert "trained with siamese_weight=1.0, the recipe trains with siamese_weight=0.5" in (
        capsys.readouterr().out
    )
    training = json.loads((tmp_path / "models" / "pdm" / "config.json").read_text())["training"]
    assert training["siamese_weight"] == 0.5
    assert recipe.training_choices(DATASET, "ce")["siamese_weight"] == 1.0  # CE has no pairs


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_models_follow_the_epochs_and_interrupted_training_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A saved model trained for other epochs than ``EPOCHS`` is retrained; an interrupted
    training resumes from its per-epoch state to the weights of an uninterrupted one."""
    recipe = _recipe()
    _tiny(recipe, monkeypatch)
    setting = recipe.Setting(
        DATASET, tmp_path, recipe.load_splits(DATASET), 12, 0, False, torch.device("cpu")
    )
    uninterrupted = recipe._classifier(setting, "ce")
    saved = json.loads((tmp_path / "models" / "ce" / "config.json").read_text())
    assert saved["training"]["epochs"] == 4 and saved["training"]["seconds"] > 0
    assert (
        recipe._classifier(setting, "ce").state_dict().keys() == uninterrupted.state_dict().keys()
    )

    monkeypatch.setattr(recipe, "EPOCHS", {DATASET: 3})
    save = recipe.EpochCheckpoint.save

    def crash_after_two(self: Any, **kwargs: Any) -> None:
        save(self, **kwargs)
        if kwargs["epochs_done"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(recipe.EpochCheckpoint, "save", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        recipe._classifier(setting, "ce")
    assert "trained with epochs=4, the recipe trains with epochs=3" in capsys.readouterr().out
    state = tmp_path / "models" / "ce" / "training-state.safetensors"
    assert state.is_file()
    monkeypatch.setattr(recipe.EpochCheckpoint, "save", save)
    resumed = recipe._classifier(setting, "ce")
    assert "resuming the interrupted training" in capsys.readouterr().out
    assert not state.exists()
    assert (
        json.loads((tmp_path / "models" / "ce" / "config.json").read_text())["training"]["epochs"]
        == 3
    )

    fresh = tmp_path / "fresh"
    expected = recipe._classifier(dataclasses.replace(setting, directory=fresh), "ce")
    for key, value in expected.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_the_plateau_diagnosis_script_uses_the_recipes_rvl_weight() -> None:
    spec = importlib.util.spec_from_file_location(
        "diagnose_pdm_plateau", RECIPES.parent / "scripts" / "diagnose_pdm_plateau.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    recipe = _recipe()
    assert script.RECIPE_VARIANCE_WEIGHT == recipe.VARIANCE_WEIGHT
    assert script.LOSSES_WITH_PAIRS == recipe.PAIR_LOSSES


def test_a_retrain_is_checked_against_table_1s_recorded_curve(tmp_path: Path) -> None:
    """The curve of the model trained as the recipe wants is the reference; another's is not."""
    recipe = _recipe()
    setting = recipe.Setting(DATASET, tmp_path, None, 10, 0, False, torch.device("cpu"))
    wanted = recipe.training_choices(DATASET, "ce")
    record = {"training": {**wanted, "train_accuracy_per_epoch": [0.5, 0.75]}}
    (tmp_path / "runs" / "table1").mkdir(parents=True)
    (tmp_path / "runs" / "table1" / "ce.json").write_text(json.dumps(record))
    assert recipe._recorded_accuracies(setting, "ce", wanted) == (0.5, 0.75)
    longer = {**wanted, "epochs": wanted["epochs"] + 1}
    assert recipe._recorded_accuracies(setting, "ce", longer) == ()
    assert recipe._recorded_accuracies(setting, "rce", wanted) == ()  # no record


def test_adaptive_worst_cases_are_checked_against_rule_6() -> None:
    recipe = _recipe()
    flagged = recipe._claim_notes("cifar10", [("pdm, worst case", "l2", 1.0, 0.95)])
    assert any(line.startswith("**Flag (DESIGN §3 rule 6):** pdm, worst case:") for line in flagged)
    checked = recipe._claim_notes("cifar10", [("pdm, worst case", "linf", 8 / 255, 0.95)])
    assert not any("**Flag" in line for line in checked)
    assert any("are not checked" in line for line in checked)
