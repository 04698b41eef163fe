"""TensorBoard beside MLflow: MLflow keeps one number per epoch to compare runs; TensorBoard shows
one run's inside: per-step curves, weight and gradient histograms, what the augmented input looks
like and the model's graph. ``make tensorboard`` serves logs/tensorboard."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from imageclf.training.debugging import is_sampled
from imageclf.training.observers import TrainingObserver

log = logging.getLogger(__name__)

# Images of the first augmented batch shown as a grid (a look, not a statistic), and the batch
# the graph is traced with (the graph does not depend on the batch size).
GRID_IMAGES = 64
GRAPH_BATCH = 2


class TensorBoardObserver(TrainingObserver):
    """Writes one run into ``log_dir``: ``step/<scalar>`` every step, ``epoch/<metric>`` every
    epoch, ``weights/<param>`` and ``gradients/<param>`` histograms every ``every`` steps, the
    image grid ``input/augmented_batch`` and the graph at the start.

    Images are shown as the model receives them: float in [0, 1] (the model's input contract;
    the dataset normalisation is the model's first layer), so no de-normalisation is needed.
    """

    def __init__(self, log_dir: Path, every: int) -> None:
        self.log_dir = Path(log_dir)
        self.every = every
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self._histograms = 0
        self._closed = False

    def on_train_start(self, model: nn.Module, images: torch.Tensor) -> None:
        shown = images[:GRID_IMAGES].detach().float().cpu().clamp(0, 1)
        nrow = max(1, int(math.sqrt(len(shown))))
        self.writer.add_image("input/augmented_batch", make_grid(shown, nrow=nrow, padding=1), 0)
        self.add_graph(model, images[:GRAPH_BATCH])

    def add_graph(self, model: nn.Module, images: torch.Tensor) -> None:
        """The traced graph, without side effects on training: eval mode (batch norm keeps its
        running statistics, dropout draws nothing), no gradients, every RNG state restored, each
        module's mode put back. A model that cannot be traced costs a warning, not the run."""
        modes = {m: m.training for m in model.modules()}
        cuda = torch.cuda.is_available()
        cpu_state = torch.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if cuda else None
        model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # torch 2.14 marks torch.jit.trace (what add_graph uses) deprecated.
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self.writer.add_graph(model, images.detach())
        except Exception as exc:  # tracing is best effort: never fail training over a picture
            log.warning("TensorBoard: could not trace %s for its graph: %s", type(model), exc)
        finally:
            for module, mode in modes.items():
                module.train(mode)
            torch.set_rng_state(cpu_state)
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)

    def after_backward(self, step: int, model: nn.Module) -> None:
        if not is_sampled(step, self.every, first=self._histograms == 0):
            return
        self._histograms += 1
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            self.writer.add_histogram(f"weights/{name}", param.detach().float().cpu(), step)
            if param.grad is not None:
                self.writer.add_histogram(
                    f"gradients/{name}", param.grad.detach().float().cpu(), step
                )

    def on_step_end(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(f"step/{key}", float(value), step)

    def on_epoch_end(self, epoch: int, scalars: Mapping[str, float], model: nn.Module) -> None:
        for key, value in scalars.items():
            if isinstance(value, int | float):  # numbers only: a label or None has no curve
                self.writer.add_scalar(f"epoch/{key}", float(value), epoch)
        self.writer.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.writer.close()
