"""PDM (Rozenberg et al.): ResNet, losses, Siamese pairs, KDE/Mahalanobis detectors, training."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import advdefense
import advdefense.nn.resnet  # registers "resnet" (until the registry imports it)
from advdefense.attacks import detector_aware
from advdefense.attacks.detector_aware import (
    CarliniWagnerDetectorAttack,
    OrthogonalPGD,
    class_scores_and_score,
)
from advdefense.defenses.detector import RejectingClassifier, detector_scores
from advdefense.defenses.kde import KDEDetector, gaussian_kde_log_density, select_per_class
from advdefense.defenses.losses import (
    cross_entropy_loss,
    reduce_variance_loss,
    reverse_cross_entropy_loss,
    reverse_labels,
    sample_siamese_partners,
    siamese_cosine_loss,
)
from advdefense.defenses.mahalanobis import MahalanobisDetector
from advdefense.errors import InputError
from advdefense.nn import AbsCNN
from advdefense.nn.resnet import ResNet, ResNetConfig, resnet_config
from advdefense.training.pdm import (
    LOSSES,
    PDMEpochRecord,
    PDMTrainingConfig,
    build_resnet,
    output_for_loss,
    train_pdm,
)

TINY = ResNetConfig(depth=8, in_channels=1, num_classes=3, widths=(4, 8, 8))


def _clustered_images(
    count: int, seed: int, num_classes: int = 3, size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x size x size images whose brightness depends on the class, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % num_classes
    labels = labels[torch.randperm(count, generator=generator)]
    centres = (0.2 + 0.6 * labels.float() / max(num_classes - 1, 1)).view(count, 1, 1, 1)
    noise = 0.15 * torch.randn(count, 1, size, size, generator=generator)
    return (centres + noise).clamp(0.0, 1.0), labels


@pytest.fixture(scope="module")
def tiny_classifier() -> ResNet:
    torch.manual_seed(0)
    model = ResNet(TINY)
    model.train()
    with torch.no_grad():
        model(_clustered_images(64, seed=9)[0])  # move BatchNorm statistics off their init
    return model.eval()


# --- losses --------------------------------------------------------------------------------


def test_reverse_labels_put_zero_on_the_true_class() -> None:
    expected = torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.5, 0.0]])
    assert torch.allclose(reverse_labels(torch.tensor([0, 2]), 3), expected)
    with pytest.raises(InputError, match="num_classes"):
        reverse_labels(torch.tensor([0]), 1)


def test_cross_entropy_and_reverse_cross_entropy_by_hand() -> None:
    # softmax([0, ln 2, 0]) = [1/4, 1/2, 1/4].
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]] * 2)
    labels = torch.tensor([1, 0])
    # CE: -log(1/2) and -log(1/4).
    assert cross_entropy_loss(logits, labels).item() == pytest.approx(1.5 * math.log(2.0))
    # RCE, label 1: -(1/2 log 1/4 + 1/2 log 1/4) = 2 ln 2; label 0: -(1/2 log 1/2 + 1/2 log
    # 1/4) = 1.5 ln 2; mean 1.75 ln 2.
    rce = reverse_cross_entropy_loss(logits, labels)
    assert rce.item() == pytest.approx(1.75 * math.log(2.0))
    # Uniform logits: every reverse target sees log(1/K).
    uniform = reverse_cross_entropy_loss(torch.zeros(4, 5), torch.tensor([0, 1, 2, 4]))
    assert uniform.item() == pytest.approx(math.log(5.0))
    with pytest.raises(InputError, match="labels"):
        reverse_cross_entropy_loss(logits, torch.tensor([1, 3]))


def test_minimizing_rce_puts_the_lowest_logit_on_the_true_class() -> None:
    """Pang et al. 2018: after RCE training, argmax(-Z) is the prediction."""
    labels = torch.tensor([0, 1, 2, 3])
    logits = torch.zeros(4, 4, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=1.0)
    for _ in range(50):
        optimizer.zero_grad()
        reverse_cross_entropy_loss(logits, labels).backward()
        optimizer.step()
    assert torch.equal((-logits).argmax(1), labels)
    assert torch.equal(logits.argmin(1), labels)


def test_siamese_cosine_loss_by_hand() -> None:
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    second = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    # cosines 1, 0, 1/sqrt(2)
    same = torch.tensor([1.0, 0.0, 1.0])
    expected = (0.0 + 0.0 + (1.0 - 1.0 / math.sqrt(2.0))) / 3
    assert siamese_cosine_loss(first, second, same).item() == pytest.approx(expected)
    flipped = (1.0 + 1.0 + 1.0 / math.sqrt(2.0)) / 3
    assert siamese_cosine_loss(first, second, 1.0 - same).item() == pytest.approx(flipped)
    with pytest.raises(InputError, match="same_class"):
        siamese_cosine_loss(first, second, torch.ones(2))


def test_reduce_variance_loss_by_hand() -> None:
    embeddings = torch.tensor(
        [[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 3.0], [0.0, 6.0], [5.0, 5.0]],
        requires_grad=True,
    )
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    # class 0: centroid (1, 0), distances 1, 1 -> 1; class 1: centroid (0, 3), distances
    # 3, 0, 3 -> 2; class 2: a single member -> 0. Mean over the 3 classes: 1.
    loss = reduce_variance_loss(embeddings, labels)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert embeddings.grad is not None
    assert torch.isfinite(embeddings.grad).all()  # zero distances give a zero gradient
    assert torch.equal(embeddings.grad[5], torch.zeros(2))


# --- Siamese pairs -------------------------------------------------------------------------


@pytest.mark.parametrize("probability", [0.5, 0.2])
def test_siamese_partner_proportions(probability: float) -> None:
    generator = torch.Generator().manual_seed(0)
    pool = torch.repeat_interleave(torch.arange(5), torch.tensor([10, 20, 30, 40, 50]))
    anchors = torch.randint(0, 5, (20_000,), generator=generator)
    partners = sample_siamese_partners(anchors, pool, probability, generator)
    same = partners.same_class.bool()
    assert torch.equal(same, pool[partners.indices] == anchors)
    assert abs(same.float().mean().item() - probability) < 0.015
    # different-class partners: their class is uniform over the 4 other classes
    others = pool[partners.indices[~same]]
    fractions = torch.bincount(others, minlength=5).float() / others.numel()
    assert torch.allclose(fractions, torch.full((5,), 0.2), atol=0.02)
    # within a class, members are drawn uniformly
    members = partners.indices[pool[partners.indices] == 4] - 100
    counts = torch.bincount(members, minlength=50).float()
    assert counts.min() > 0.5 * counts.mean()


def test_siamese_partner_edge_rules() -> None:
    generator = torch.Generator().manual_seed(1)
    # one class only: every partner is a same-class partner
    single_class = sample_siamese_partners(
        torch.zeros(50, dtype=torch.long), torch.zeros(7, dtype=torch.long), 0.5, generator
    )
    assert torch.equal(single_class.same_class, torch.ones(50))
    # a class with one member pairs with that member
    pool = torch.tensor([0, 0, 0, 1])
    partners = sample_siamese_partners(torch.ones(200, dtype=torch.long), pool, 0.5, generator)
    same = partners.same_class.bool()
    assert same.any() and (~same).any()
    assert torch.equal(partners.indices[same], torch.full((int(same.sum()),), 3))
    assert (pool[partners.indices[~same]] == 0).all()
    with pytest.raises(InputError, match=r"classes \[2\]"):
        sample_siamese_partners(torch.tensor([2]), pool, 0.5, generator)
    with pytest.raises(InputError, match="same_class_probability"):
        sample_siamese_partners(torch.tensor([0]), pool, 1.5, generator)


# --- ResNet --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_resnet20_shapes(version: int, shape: tuple[int, int, int]) -> None:
    model = ResNet(ResNetConfig(depth=20, version=version, in_channels=shape[0])).eval()
    images = torch.rand(2, *shape)
    with torch.no_grad():
        assert model(images).shape == (2, 10)
        assert model.embed(images).shape == (2, 64)
    if shape[0] == 3:  # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters
        assert sum(p.numel() for p in model.parameters()) == 269_722


def test_resnet_depth_and_names() -> None:
    for depth in (0, 2, 7, 21, 27):
        with pytest.raises(InputError, match=r"depth must be 6n \+ 2"):
            ResNetConfig(depth=depth)
    with pytest.raises(InputError, match=r"depth must be 6n \+ 2"):
        ResNetConfig(depth=20.0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="version"):
        ResNetConfig(version=3)
    with pytest.raises(InputError, match="output"):
        ResNetConfig(output="probabilities")
    with pytest.raises(InputError, match="input_mean"):
        ResNetConfig(in_channels=3, input_mean=(0.5, 0.5))
    assert resnet_config("resnet56").blocks_per_stage == 9
    assert resnet_config("resnet32-v2", in_channels=1).version == 2
    with pytest.raises(InputError, match="resnetDEPTH"):
        resnet_config("vgg16")
    with pytest.raises(InputError, match=r"6n \+ 2"):
        resnet_config("resnet21")


def test_negated_output_and_gradients() -> None:
    torch.manual_seed(0)
    plain = ResNet(TINY).eval()
    negated = ResNet(replace(TINY, output="negated")).eval()
    negated.load_state_dict(plain.state_dict())
    images = torch.rand(3, 1, 8, 8, requires_grad=True)
    embedding = plain.embed(images)
    assert torch.allclose(negated(images), -plain(images))
    assert torch.allclose(plain(images), plain.logits_from_embedding(embedding))
    plain(images)[:, 0].sum().backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_resnet_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ResNet(ResNetConfig(depth=20, version=2, in_channels=1, output="negated"))
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 1, 28, 28))
    model.eval()
    advdefense.save(model, tmp_path / "resnet", dataset="mnist-sample", seed=0)
    loaded = advdefense.load(tmp_path / "resnet")
    assert isinstance(loaded, ResNet)
    assert loaded.config == model.config
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


# --- KDE detector --------------------------------------------------------------------------


def test_select_per_class_caps_and_seeds() -> None:
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 9)
    first = select_per_class(labels, 3, 4, torch.Generator().manual_seed(3))
    again = select_per_class(labels, 3, 4, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert torch.equal(torch.bincount(labels[first]), torch.tensor([4, 2, 4]))
    with pytest.raises(InputError, match="class 3"):
        select_per_class(labels, 4, 4, torch.Generator())


def test_kde_log_density_is_finite_far_from_the_support() -> None:
    support = torch.zeros(1, 3, dtype=torch.float64)
    query = torch.tensor([[1000.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    bandwidth = 0.1
    log_density = gaussian_kde_log_density(
        query, torch.tensor([0]), support, torch.tensor([0]), bandwidth
    )
    expected = -(1000.0**2) / (2 * bandwidth**2) - 1.5 * math.log(2 * math.pi * bandwidth**2)
    assert log_density.item() == pytest.approx(expected, rel=1e-12)
    log_density.sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()
    assert query.grad[0, 0].item() == pytest.approx(-1000.0 / bandwidth**2)


@pytest.fixture(scope="module")
def kde(tiny_classifier: ResNet) -> KDEDetector:
    train_images, train_labels = _clustered_images(90, seed=1)
    held_images, held_labels = _clustered_images(45, seed=2)
    return KDEDetector.fit(
        tiny_classifier,
        train_images,
        train_labels,
        held_images,
        held_labels,
        max_samples_per_class=20,
        seed=5,
    )


def test_kde_support_and_bandwidth_selection(kde: KDEDetector, tiny_classifier: ResNet) -> None:
    train_images, train_labels = _clustered_images(90, seed=1)
    held_images, held_labels = _clustered_images(45, seed=2)
    config = kde.config
    assert config.class_counts == (20, 20, 20)
    assert config.classifier_architecture == "resnet"
    chosen = select_per_class(train_labels, 3, 20, torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected_support = tiny_classifier.embed(train_images[chosen])
    assert torch.allclose(kde.support, expected_support, atol=1e-6)
    grid, log_likelihoods = config.bandwidth_grid, config.bandwidth_log_likelihoods
    assert len(grid) == len(log_likelihoods) == 17
    assert config.bandwidth == grid[int(np.argmax(log_likelihoods))]
    # one grid value recomputed directly: mean log N-mixture density of the true class
    with torch.no_grad():
        held = tiny_classifier.embed(held_images).double().numpy()
    support = kde.support.double().numpy()
    support_labels = kde.support_labels.numpy()
    index = len(grid) // 2
    bandwidth = grid[index]
    direct = [
        np.log(
            np.mean(
                multivariate_normal(mean=np.zeros(support.shape[1]), cov=bandwidth**2).pdf(
                    support[support_labels == label] - point
                )
            )
        )
        for point, label in zip(held, held_labels.numpy(), strict=True)
    ]
    assert log_likelihoods[index] == pytest.approx(np.mean(direct), rel=1e-8)


def test_kde_scores_match_scipy(kde: KDEDetector, tiny_classifier: ResNet) -> None:
    queries, _ = _clustered_images(12, seed=3)
    with torch.no_grad():
        scores = kde.score(queries)
        embeddings = tiny_classifier.embed(queries).double().numpy()
        predicted = tiny_classifier(queries).argmax(1).numpy()
    support = kde.support.double().numpy()
    support_labels = kde.support_labels.numpy()
    cov = kde.bandwidth**2 * np.eye(support.shape[1])
    expected = [
        -np.log(
            np.mean(
                [
                    multivariate_normal(mean=centre, cov=cov).pdf(point)
                    for centre in support[support_labels == label]
                ]
            )
        )
        for point, label in zip(embeddings, predicted, strict=True)
    ]
    assert scores.dtype == torch.float64
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-9)


def test_a_wider_kde_shares_the_support_and_scores_at_its_bandwidth(kde: KDEDetector) -> None:
    queries, _ = _clustered_images(12, seed=4)
    wider = kde.with_bandwidth(3.0 * kde.bandwidth)
    assert wider.classifier is kde.classifier and wider.support is kde.support
    assert wider.bandwidth == 3.0 * kde.bandwidth and wider.threshold is None
    with torch.no_grad():
        embeddings = kde.classifier.embed(queries)
        classes = kde.classifier(queries).argmax(1)
        expected = -gaussian_kde_log_density(
            embeddings, classes, kde.support, kde.support_labels, 3.0 * kde.bandwidth
        )
        torch.testing.assert_close(wider.score(queries), expected)
        assert not torch.allclose(wider.score(queries), kde.score(queries))


def test_a_restricted_kde_sums_the_kept_points_over_the_full_counts(kde: KDEDetector) -> None:
    queries, _ = _clustered_images(12, seed=5)
    keep = torch.arange(kde.support.shape[0]) % 3 != 0
    subset = kde.restricted(keep)
    with torch.no_grad():
        embeddings = kde.classifier.embed(queries).double()
        classes = kde.classifier(queries).argmax(1)
        support = kde.support.double()
        squared = torch.cdist(embeddings, support).square()
        kernels = torch.exp(-squared / (2 * kde.bandwidth**2))
        own = kde.support_labels[None, :] == classes[:, None]
        kept_sum = (kernels * (own & keep[None, :])).sum(1)
        counts = kde.class_counts[classes].double()
        dimension = support.shape[1]
        normalizer = (2 * math.pi * kde.bandwidth**2) ** (dimension / 2)
        expected = -torch.log(kept_sum / counts / normalizer)
        torch.testing.assert_close(subset.score(queries), expected)
        assert (subset.score(queries) >= kde.score(queries) - 1e-9).all()
    assert subset.classifier is kde.classifier and subset.threshold is None


def test_a_restriction_must_keep_every_class_and_be_a_mask(kde: KDEDetector) -> None:
    drops_class_0 = kde.support_labels != 0
    with pytest.raises(InputError, match=r"class\(es\) \[0\]"):
        kde.restricted(drops_class_0)
    with pytest.raises(InputError, match="boolean mask over the"):
        kde.restricted(torch.ones(3, dtype=torch.bool))


def test_support_scores_are_each_points_score_under_its_own_class(kde: KDEDetector) -> None:
    expected = -gaussian_kde_log_density(
        kde.support, kde.support_labels, kde.support, kde.support_labels, kde.bandwidth
    )
    torch.testing.assert_close(kde.support_scores(chunk=7), expected)


def test_kde_gradient_is_finite_and_non_zero(kde: KDEDetector) -> None:
    images = _clustered_images(4, seed=4)[0].requires_grad_(True)
    kde.score(images).sum().backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all()
    assert (images.grad.flatten(1).abs().sum(1) > 0).all()


def test_attack_steps_share_one_forward_pass(
    kde: KDEDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A detector on this very classifier gives scores and score from one embedding; another
    module with the same weights takes two passes; the attack's result is the same."""
    images = _clustered_images(6, seed=8)[0]
    classifier = kde.classifier
    twin = copy.deepcopy(classifier)
    embeddings: list[int] = []
    for model in (classifier, twin):
        embed = model.embed
        monkeypatch.setattr(model, "embed", lambda x, embed=embed: embeddings.append(1) or embed(x))
    shared = class_scores_and_score(classifier, kde, images)
    assert len(embeddings) == 1
    separate = class_scores_and_score(twin, kde, images)
    assert len(embeddings) == 3
    assert torch.equal(shared[0], separate[0]) and torch.equal(shared[1], separate[1])
    assert torch.equal(shared[1], kde.score(images))
    labels = classifier(images).argmax(1)
    attack = CarliniWagnerDetectorAttack(steps=4, binary_search_steps=2, classifier_steps=3)
    threshold = float(kde.score(images).median())
    one = attack(classifier, kde, images, labels, threshold=threshold)
    two = attack(twin, kde, images, labels, threshold=threshold)
    assert torch.equal(one.adversarials, two.adversarials) and torch.equal(one.success, two.success)
    orthogonal = OrthogonalPGD(norm="l2", steps=3)
    one = orthogonal(classifier, kde, images, labels, 1.0, threshold=threshold)
    two = orthogonal(twin, kde, images, labels, 1.0, threshold=threshold)
    assert torch.equal(one.adversarials, two.adversarials)


def test_kde_scores_under_given_classes_and_the_attack_scores_its_target(
    kde: KDEDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Carlini & Wagner's KDE_t: a score under the target class whatever the prediction (the
    detector's own score stays the predicted class's), used by the targeted C&W-wb."""
    images = _clustered_images(6, seed=8)[0]
    classifier = kde.classifier
    with torch.no_grad():
        predicted = classifier(images).argmax(1)
        embedding = classifier.embed(images)
    others = (predicted + 1) % 3
    _, own = class_scores_and_score(classifier, kde, images)
    _, under = class_scores_and_score(classifier, kde, images, others)
    _, twin_under = class_scores_and_score(copy.deepcopy(classifier), kde, images, others)
    assert torch.equal(own, kde.score(images))
    assert torch.allclose(under, -kde.log_density(embedding, others))
    assert torch.equal(under, twin_under) and not torch.allclose(under, own)

    scored: list[torch.Tensor] = []  # the classes of every scoring under given classes
    original = detector_aware.class_scores_and_score

    def spy(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if len(args) > 3 and args[3] is not None:
            scored.append(args[3])
        return original(*args)

    monkeypatch.setattr(detector_aware, "class_scores_and_score", spy)
    threshold = float(kde.score(images).median())
    attack = CarliniWagnerDetectorAttack(steps=2, binary_search_steps=1, classifier_steps=0)
    attack(classifier, kde, images, predicted, targets=others, threshold=threshold)
    assert scored and all(torch.equal(classes, others) for classes in scored)
    scored.clear()
    own_score = replace(attack, detector_class="predicted")
    own_score(classifier, kde, images, predicted, targets=others, threshold=threshold)
    attack(classifier, kde, images, predicted, threshold=threshold)  # untargeted: no target
    assert not scored
    with pytest.raises(InputError, match="detector_class"):
        CarliniWagnerDetectorAttack(detector_class="label")  # type: ignore[arg-type]


def test_kde_threshold_hits_the_requested_rate(kde: KDEDetector) -> None:
    kde = copy.deepcopy(kde)
    held_out, _ = _clustered_images(1000, seed=6)
    fresh, _ = _clustered_images(1000, seed=7)
    threshold = kde.calibrate(held_out, 0.05)
    assert kde.threshold == threshold and kde.false_positive_rate == 0.05
    assert kde.is_rejected(held_out).float().mean().item() == pytest.approx(0.05)
    assert 0.02 <= kde.is_rejected(fresh).float().mean().item() <= 0.08
    # the composed model rejects exactly what the detector rejects
    rejecting = RejectingClassifier(kde.classifier, kde).eval()
    with torch.no_grad():
        outputs = rejecting(fresh[:200])
    assert outputs.shape == (200, 4)
    assert torch.equal(outputs.argmax(1) == 3, kde.is_rejected(fresh[:200]))


def test_kde_save_load_round_trip(kde: KDEDetector, tmp_path: Path) -> None:
    kde = copy.deepcopy(kde)
    held_out, _ = _clustered_images(100, seed=8)
    kde.calibrate(held_out, 0.1)
    advdefense.save(kde, tmp_path / "kde", training={"bandwidth": kde.bandwidth})
    loaded = advdefense.load(tmp_path / "kde")
    assert isinstance(loaded, KDEDetector)
    assert loaded.config.bandwidth == kde.bandwidth
    assert loaded.config.class_counts == kde.config.class_counts
    assert loaded.threshold == kde.threshold
    assert torch.equal(detector_scores(loaded, held_out), detector_scores(kde, held_out))


def test_kde_needs_a_classifier_with_an_embedding() -> None:
    images, labels = _clustered_images(6, seed=1)
    with pytest.raises(InputError, match=r"embed\(\) method"):
        KDEDetector.fit(AbsCNN(), images, labels, images, labels)


# --- Mahalanobis detector ------------------------------------------------------------------


def test_mahalanobis_matches_numpy(tiny_classifier: ResNet, tmp_path: Path) -> None:
    train_images, train_labels = _clustered_images(90, seed=1)
    detector = MahalanobisDetector.fit(tiny_classifier, train_images, train_labels, ridge=1e-3)
    queries, _ = _clustered_images(10, seed=3)
    with torch.no_grad():
        train = tiny_classifier.embed(train_images).double().numpy()
        points = tiny_classifier.embed(queries).double().numpy()
        scores = detector.score(queries).numpy()
    labels = train_labels.numpy()
    means = np.stack([train[labels == label].mean(0) for label in range(3)])
    centred = train - means[labels]
    covariance = centred.T @ centred / len(train)
    dimension = covariance.shape[0]
    regularized = covariance + 1e-3 * np.trace(covariance) / dimension * np.eye(dimension)
    precision = np.linalg.inv(regularized)
    expected = [
        min(float((point - mean) @ precision @ (point - mean)) for mean in means)
        for point in points
    ]
    np.testing.assert_allclose(scores, expected, rtol=1e-7)
    held_out, _ = _clustered_images(200, seed=6)
    detector.calibrate(held_out, 0.05)
    assert detector.is_rejected(held_out).float().mean().item() == pytest.approx(0.05)
    advdefense.save(detector, tmp_path / "mahalanobis")
    loaded = advdefense.load(tmp_path / "mahalanobis")
    assert isinstance(loaded, MahalanobisDetector)
    assert torch.equal(detector_scores(loaded, queries), detector_scores(detector, queries))


# --- training ------------------------------------------------------------------------------


def test_output_follows_the_loss() -> None:
    assert [output_for_loss(loss) for loss in LOSSES] == ["logits", "negated", "logits", "negated"]
    with pytest.raises(InputError, match="loss"):
        PDMTrainingConfig(loss="focal")
    with pytest.raises(InputError, match="lr_milestones"):
        PDMTrainingConfig(lr_milestones=(0.75, 0.5))
    model = ResNet(TINY)  # output="logits"
    images, labels = _clustered_images(8, seed=0)
    with pytest.raises(InputError, match="output='negated'"):
        train_pdm(model, images, labels, PDMTrainingConfig(loss="pdm", epochs=1), progress=False)


def test_tiny_pdm_run_reduces_its_loss() -> None:
    images, labels = _clustered_images(96, seed=0)
    config = PDMTrainingConfig(loss="pdm", epochs=5, batch_size=24, learning_rate=0.05, seed=1)
    model = build_resnet("resnet8", "pdm", in_channels=1, num_classes=3, seed=1)
    model, history = train_pdm(model, images, labels, config, progress=False)
    records = history.epochs
    assert all(isinstance(record, PDMEpochRecord) for record in records)
    first, last = records[0], records[-1]
    assert isinstance(first, PDMEpochRecord) and isinstance(last, PDMEpochRecord)
    assert last.loss < first.loss
    assert first.siamese_loss > 0 and first.variance_loss > 0
    assert last.learning_rate == pytest.approx(0.05 * 0.1**2)  # both milestones passed
    assert not model.training
    assert model.config.output == "negated"


@pytest.mark.filterwarnings("ignore:.*near chance:UserWarning")  # one epoch on 24 images
@pytest.mark.parametrize("loss", ["ce", "rce", "siamese-rvl"])
def test_each_loss_trains_and_is_seeded(loss: str) -> None:
    images, labels = _clustered_images(24, seed=0)
    config = PDMTrainingConfig(loss=loss, epochs=1, batch_size=12, learning_rate=0.05)
    states = []
    for _ in range(2):
        model = build_resnet("resnet8", loss, in_channels=1, num_classes=3, seed=2)
        model, history = train_pdm(model, images, labels, config, progress=False)
        record = history.epochs[0]
        assert isinstance(record, PDMEpochRecord)
        assert math.isfinite(record.loss)
        assert (record.siamese_loss > 0) == (loss == "siamese-rvl")
        states.append(model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key])


def test_warmup_trains_the_classification_term_alone_first() -> None:
    with pytest.raises(InputError, match="warmup_epochs"):
        PDMTrainingConfig(epochs=3, warmup_epochs=3)
    with pytest.raises(InputError, match="warmup_epochs"):
        PDMTrainingConfig(warmup_epochs=-1)
    config = PDMTrainingConfig(epochs=3, warmup_epochs=2, siamese_weight=0.5)
    assert config.for_epoch(2).siamese_weight == 0 and config.for_epoch(2).variance_weight == 0
    assert config.for_epoch(3) is config

    # One warm-up epoch of a two-epoch run is the same as one epoch without the pair terms: the
    # partner draws and the learning rate (no milestone passed yet) are identical.
    images, labels = _clustered_images(48, seed=0)
    common = {"loss": "pdm", "batch_size": 12, "learning_rate": 0.05, "seed": 3}
    warm = PDMTrainingConfig(epochs=2, warmup_epochs=1, lr_milestones=(0.9,), **common)
    plain = PDMTrainingConfig(
        epochs=1, siamese_weight=0.0, variance_weight=0.0, lr_milestones=(0.9,), **common
    )

    def trained(config: PDMTrainingConfig) -> tuple[ResNet, list[PDMEpochRecord]]:
        model = build_resnet("resnet8", "pdm", in_channels=1, num_classes=3, seed=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a tiny run may end near chance
            model, history = train_pdm(model, images, labels, config, progress=False)
        return model, [r for r in history.epochs if isinstance(r, PDMEpochRecord)]

    _, warm_records = trained(warm)
    _, plain_records = trained(plain)
    assert warm_records[0].loss == pytest.approx(plain_records[0].loss, rel=1e-6)
    # After the warm-up the pair terms count: the total exceeds the classification term.
    second = warm_records[1]
    assert second.loss > second.classification_loss + 0.1 * second.siamese_loss


def test_a_retrain_departing_from_its_reference_warns_at_that_epoch() -> None:
    """The epoch whose training accuracy differs from the earlier run's is named, once."""
    images, labels = _clustered_images(48, seed=0)
    config = PDMTrainingConfig(loss="ce", epochs=3, batch_size=12, learning_rate=0.05, seed=4)

    def train(reference: tuple[float, ...]) -> list[str]:
        model = build_resnet("resnet8", "ce", in_channels=1, num_classes=3, seed=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, history = train_pdm(
                model, images, labels, config, progress=False, reference_accuracies=reference
            )
        departures = [
            str(w.message) for w in caught if "the run this one repeats" in str(w.message)
        ]
        accuracies.extend(r.accuracy for r in history.epochs)
        return departures

    accuracies: list[float] = []
    assert train(()) == []
    first = tuple(accuracies)
    assert train(first) == []  # the same run again: no departure
    shifted = (first[0], first[1] + 0.5, first[2] + 0.5)
    departures = train(shifted)
    assert len(departures) == 1 and departures[0].startswith("epoch 2:")
