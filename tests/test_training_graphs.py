"""Training steps replayed as CUDA graphs: the same updates as eager training, and portable
checkpoints. The tests that run training on a GPU are skipped without one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from advdefense.defenses.adversarial_training import PGDConfig, train_madry
from advdefense.errors import UserError
from advdefense.nn.abs_cnn import AbsCNN, AbsCNNConfig
from advdefense.nn.madry_cnn import MadryCNN, MadryCNNConfig
from advdefense.training.checkpoint import EpochCheckpoint
from advdefense.training.loop import TrainingConfig, train_classifier


def _digits(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    labels = torch.arange(count) % 4
    images = torch.rand(count, 1, 28, 28, generator=generator) * 0.3
    for index, label in enumerate(labels.tolist()):
        images[index, :, 7 * label : 7 * label + 7] += 0.6  # a bright band per class
    return images.clamp(0, 1), labels


class _InterruptedError(Exception):
    pass


class _CrashAfterFirstEpoch(EpochCheckpoint):
    """Saves like :class:`EpochCheckpoint`, then dies right after the first epoch."""

    def save(self, **kwargs: Any) -> None:
        super().save(**kwargs)
        if kwargs["epochs_done"] == 1:
            raise _InterruptedError


def _train(
    device: torch.device,
    cuda_graph: bool,
    kind: str,
    checkpoint: EpochCheckpoint | None = None,
) -> tuple[nn.Module, list[tuple[float, float]]]:
    """``kind``: "madry" (PGD training of the Madry CNN), "plain" (the same CNN on clean
    images) or "batchnorm" (the ABS CNN, whose BatchNorm updates buffers in each step)."""
    images, labels = _digits(230)  # four batches of 50 replayed, a last one of 30 run eagerly
    torch.manual_seed(0)
    model: nn.Module = (
        AbsCNN(AbsCNNConfig(in_channels=1))
        if kind == "batchnorm"
        else MadryCNN(MadryCNNConfig(in_channels=1))
    )
    config = TrainingConfig(epochs=2, batch_size=50, learning_rate=1e-3, seed=0)
    options: dict[str, Any] = {
        "device": device,
        "progress": False,
        "cuda_graph": cuda_graph,
        "checkpoint": checkpoint,
    }
    if kind == "madry":
        pgd = PGDConfig(epsilon=0.1, steps=5, step_size=0.03)
        history = train_madry(model, images, labels, config, pgd, **options)
    else:
        history = train_classifier(model, images, labels, config, **options)
    return model, [(record.loss, record.accuracy) for record in history.epochs]


@pytest.fixture
def deterministic_cudnn() -> Iterator[None]:
    """Run-to-run identical convolutions: PGD's sign steps turn any rounding into a flip."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["plain", "madry", "batchnorm"])
def test_cuda_graph_training_makes_the_eager_updates(kind: str, deterministic_cudnn: None) -> None:
    device = torch.device("cuda")
    eager, eager_history = _train(device, cuda_graph=False, kind=kind)
    graphed, graphed_history = _train(device, cuda_graph=True, kind=kind)
    for (name, value), other in zip(
        eager.state_dict().items(), graphed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=name)
    assert graphed_history == pytest.approx(eager_history, rel=1e-5)
    assert all(parameter.grad is None for parameter in graphed.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_interrupted_gpu_run_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, deterministic_cudnn: None
) -> None:
    """The PGD random starts draw from the GPU's generator: its state is saved and restored."""
    device = torch.device("cuda")
    whole, whole_history = _train(device, cuda_graph=True, kind="madry")
    with pytest.raises(_InterruptedError):
        _train(device, True, "madry", checkpoint=_CrashAfterFirstEpoch(tmp_path))
    resumed, resumed_history = _train(device, True, "madry", checkpoint=EpochCheckpoint(tmp_path))
    for (name, value), other in zip(
        whole.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed_history == pytest.approx(whole_history, rel=1e-5)


def test_cuda_graph_without_a_gpu_names_the_problem() -> None:
    images, labels = _digits(8)
    model = MadryCNN(MadryCNNConfig(in_channels=1))
    with pytest.raises(UserError, match="cuda_graph needs a CUDA device"):
        train_classifier(
            model,
            images,
            labels,
            TrainingConfig(epochs=1, batch_size=4),
            device=torch.device("cpu"),
            progress=False,
            cuda_graph=True,
        )


def test_a_state_saved_by_a_capturable_optimizer_resumes_on_the_cpu(tmp_path: Path) -> None:
    """A GPU run's Adam is ``capturable``, which Adam refuses on CPU tensors: the restored
    optimizer keeps its own setting, and the run goes on from the saved state."""
    model = MadryCNN(MadryCNNConfig(in_channels=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = _digits(8)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    for group in optimizer.param_groups:
        group["capturable"] = True  # as saved by a CUDA-graph run
    checkpoint = EpochCheckpoint(tmp_path)
    checkpoint.save(
        identity={"run": 1},
        epochs_done=1,
        records=[],
        model=model,
        optimizer=optimizer,
        generator=torch.Generator(),
    )
    resumed_model = MadryCNN(MadryCNNConfig(in_channels=1))
    resumed = torch.optim.Adam(resumed_model.parameters(), lr=1e-3)
    run = checkpoint.restore(
        identity={"run": 1}, model=resumed_model, optimizer=resumed, generator=torch.Generator()
    )
    assert run.epochs_done == 1
    assert all(group["capturable"] is False for group in resumed.param_groups)
    torch.nn.functional.cross_entropy(resumed_model(images), labels).backward()
    resumed.step()  # raises if the saved capturable flag had been restored
    assert all(state["step"] == 2 for state in resumed.state.values())
