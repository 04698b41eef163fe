"""The observers a training run gets, from its parameters: one place that wires them."""

from __future__ import annotations

from imageclf.config import TrainParams
from imageclf.paths import ProjectPaths
from imageclf.training.debugging import ActivationStats, GradientFlow
from imageclf.training.observers import Observers, TrainingObserver


def build_observers(cfg: TrainParams, paths: ProjectPaths, run_name: str) -> Observers:
    """Gradient flow and activation statistics always (sampled every ``log_every_steps``: their
    cost is a few reductions per sampled step, and the reports are what a failed run needs
    first); TensorBoard when ``train.tensorboard``, into ``logs/tensorboard/<run_name>``.

    TensorBoard comes last, so it is closed after the others have written to it."""
    every = cfg.log_every_steps
    writer = None
    observers: list[TrainingObserver] = []
    board = None
    if cfg.tensorboard:
        from imageclf.training.tensorboard import TensorBoardObserver

        board = TensorBoardObserver(paths.tensorboard / run_name, every)
        writer = board.writer
    observers.append(
        GradientFlow(every, paths.gradient_flow_plot, paths.gradient_flow_report, writer)
    )
    observers.append(ActivationStats(every, paths.activation_stats_report, writer))
    if board is not None:
        observers.append(board)
    return Observers(observers)
